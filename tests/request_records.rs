//! What a sidecar records of each request, as its users see it: the access log line
//! (`--access-log`, text or JSON) and the generation lookup (`--generations N`,
//! `GET /api/v1/generation?id=`), for a fallback, a stream, a caller that leaves, and a refusal.

mod common;

use common::*;
use serde_json::Value;

const PROMPT: &str = "the zebra crossing prompt";

/// The JSON access lines a sidecar has written so far.
fn access_lines(sidecar: &Sidecar) -> Vec<Value> {
    sidecar
        .process
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "sideyard::access")
        .collect()
}

/// The access line of the request whose `x-request-id` is `id`, once written.
async fn access_line(sidecar: &Sidecar, id: &str) -> Value {
    let mut found = None;
    eventually_or_explain(
        &format!("the access line of {id}"),
        || {
            found = access_lines(sidecar).into_iter().find(|l| l["request_id"] == id);
            std::future::ready(found.is_some())
        },
        || sidecar.process.log(),
    )
    .await;
    found.unwrap_or_default()
}

async fn lookup(sidecar: &Sidecar, key: Option<&str>, id: &str) -> Reply {
    read(send_as(sidecar.api, key, "GET", &format!("/api/v1/generation?id={id}"), "").await).await
}

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model, "stream": stream, "stream_options": {"include_usage": stream},
        "messages": [{"role": "user", "content": PROMPT}],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fallback_is_one_access_line_and_one_generation_with_both_attempts() {
    let up = ScriptedUpstream::start().await;
    let pricing = "pricing: {prompt: '2', completion: '4'}";
    let config = route_yaml(
        "chat",
        "fallback: {when: [5xx]}",
        &[
            &format!("{{name: bad, baseUrl: \"{}\", model: bad-model, {pricing}}}", up.url("status-500")),
            &format!("{{name: good, baseUrl: \"{}\", model: good-model, {pricing}}}", up.url("ok")),
        ],
    ) + &budget_yaml("team", "sk-team", "limit: \"10\"")
        + &budget_yaml("other", "sk-other", "limit: \"10\"");
    // Other lines at `warn` only: the access lines are asked for by their own flag.
    let args = ["--access-log", "--log-format", "json", "--log", "warn,sideyard::sidecar=info", "--generations", "5"];
    let sidecar = Sidecar::start_with(&config, &args, &[]);

    let headers = [("authorization", "Bearer sk-team"), ("x-request-id", "req-fallback")];
    let reply =
        read(send_with(sidecar.api, "POST", "/v1/chat/completions", &headers, &chat("chat", false)).await).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let cost = reply.json()["usage"]["cost"].clone();
    assert!(cost.as_f64().is_some_and(|c| c > 0.0), "the answer is priced: {}", reply.body);
    let generation = reply.header("x-sideyard-generation-id").to_string();
    assert!(generation.starts_with("gen-"), "every recorded answer names its record: {:?}", reply.headers);

    let line = access_line(&sidecar, "req-fallback").await;
    assert_eq!(line["path"], "/v1/chat/completions");
    assert_eq!(line["model"], "chat");
    assert_eq!(line["route"], "default/chat");
    assert_eq!(line["upstream_target"], "good");
    assert_eq!(line["provider_model"], "good-model");
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["failed"], serde_json::json!(["bad: 5xx (500)"]));
    assert_eq!(line["fallback_reason"], "5xx");
    assert_eq!(line["status"], 200);
    assert_eq!(line["prompt_tokens"], 3);
    assert_eq!(line["completion_tokens"], 1);
    assert_eq!(line["cost"].as_str().and_then(|c| c.parse::<f64>().ok()), cost.as_f64(), "{line}");
    assert_eq!(line["budget"], "default/team");
    assert_eq!(line["finish_reason"], "stop");
    assert_eq!(line["generation_id"], generation.as_str());
    assert!(line["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{line}");
    assert!(line["ttfb_ms"].as_f64().is_some(), "{line}");
    let text = line.to_string();
    assert!(!text.contains("sk-team") && !text.contains("zebra"), "no key and no prompt in the line: {text}");

    let found = lookup(&sidecar, Some("sk-team"), &generation).await;
    assert_eq!(found.status, 200, "{}", found.body);
    let data = &found.json()["data"];
    assert_eq!(data["id"], generation.as_str());
    assert_eq!(data["upstream_id"], "chatcmpl-ok");
    assert_eq!(data["model"], "chat");
    assert_eq!(data["provider_name"], "good", "a target without `provider` is its own");
    assert_eq!(data["total_cost"], cost, "the cost the answer carried, as the same exact number");
    assert_eq!((data["tokens_prompt"].clone(), data["tokens_completion"].clone()), (3.into(), 1.into()));
    assert_eq!(data["finish_reason"], "stop");
    assert_eq!(data["streamed"], false);
    let attempts = data["provider_responses"].as_array().expect("the attempts");
    assert_eq!(attempts.len(), 2, "{data}");
    assert_eq!((attempts[0]["target"].clone(), attempts[0]["status"].clone()), ("bad".into(), 500.into()));
    assert_eq!(attempts[0]["reason"], "5xx");
    assert_eq!((attempts[1]["target"].clone(), attempts[1]["status"].clone()), ("good".into(), 200.into()));
    assert_eq!(attempts[1]["reason"], Value::Null);
    assert_eq!(data["sideyard"]["attempts"], 2);
    assert_eq!(data["sideyard"]["fallback_reason"], "5xx");
    assert_eq!(data["sideyard"]["budget"], "default/team");
    assert!(!found.body.contains("sk-team") && !found.body.contains("zebra"), "{}", found.body);

    let by_answer = lookup(&sidecar, Some("sk-team"), "chatcmpl-ok").await;
    assert_eq!(by_answer.json()["data"]["id"], generation.as_str(), "the answer's own id finds it too");

    // Only the key that made the request finds it.
    let other = lookup(&sidecar, Some("sk-other"), &generation).await;
    assert_eq!(other.status, 404, "{}", other.body);
    assert_eq!(other.json()["error"]["code"], "generation_not_found");
    assert_eq!(lookup(&sidecar, None, &generation).await.status, 404);
    let unnamed = read(send_as(sidecar.api, Some("sk-team"), "GET", "/api/v1/generation", "").await).await;
    assert_eq!(unnamed.status, 400, "{}", unnamed.body);
    assert!(unnamed.body.contains("?id="), "{}", unnamed.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_is_recorded_when_it_ends_and_a_caller_that_leaves_is_marked_cancelled() {
    let mock = |chunks: u32, interval: &str| {
        format!(
            "{{name: mock, api: mock, baseUrl: 'mock://local?chunks={chunks}&chunk-interval={interval}', pricing: {{prompt: '1', completion: '1'}}}}"
        )
    };
    let config = route_yaml("short", "", &[&mock(3, "1ms")]) + &route_yaml("long", "", &[&mock(200, "20ms")]);
    let sidecar = Sidecar::start_with(&config, &["--access-log", "--log-format", "json", "--generations", "2"], &[]);

    let headers = [("x-request-id", "req-stream")];
    let response = send_with(sidecar.api, "POST", "/v1/chat/completions", &headers, &chat("short", true)).await;
    assert_eq!(response.status(), 200);
    let generation = response.headers()["x-sideyard-generation-id"].to_str().unwrap().to_string();
    let events = sse_data(&rest(&mut response.into_body()).await);
    let usage: Value = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|e| e["usage"].is_object())
        .map(|e| e["usage"].clone())
        .expect("a usage chunk");

    let line = access_line(&sidecar, "req-stream").await;
    assert_eq!(line["streamed"], true);
    assert_eq!(line["end"], "answered");
    assert_eq!(line["completion_tokens"], usage["completion_tokens"]);
    assert_eq!(line["finish_reason"], "stop");
    // A request without a key is found by a caller without one.
    let data = lookup(&sidecar, None, &generation).await.json()["data"].clone();
    assert_eq!(data["streamed"], true);
    assert_eq!(data["cancelled"], false);
    assert_eq!(data["tokens_completion"], usage["completion_tokens"]);
    assert_eq!(data["total_cost"], usage["cost"], "what the usage chunk said it cost");
    assert!(data["latency"].as_u64() <= data["generation_time"].as_u64(), "{data}");

    // The caller reads one chunk and leaves.
    let headers = [("x-request-id", "req-left")];
    let response = send_with(sidecar.api, "POST", "/v1/chat/completions", &headers, &chat("long", true)).await;
    let left = response.headers()["x-sideyard-generation-id"].to_str().unwrap().to_string();
    let mut body = response.into_body();
    assert!(next_chunk(&mut body).await.is_some());
    drop(body);
    let line = access_line(&sidecar, "req-left").await;
    assert_eq!(line["end"], "caller_left");
    let data = lookup(&sidecar, None, &left).await.json()["data"].clone();
    assert_eq!(data["cancelled"], true);
    assert_eq!(data["sideyard"]["end"], "caller_left");

    // A refusal is recorded too, and the store keeps only the last two.
    let headers = [("x-request-id", "req-unknown")];
    let reply =
        read(send_with(sidecar.api, "POST", "/v1/chat/completions", &headers, &chat("nope", false)).await).await;
    assert_eq!(reply.status, 404);
    let line = access_line(&sidecar, "req-unknown").await;
    assert_eq!((line["status"].clone(), line["model"].clone()), (404.into(), "nope".into()));
    assert_eq!(line["route"], Value::Null, "no route took it");
    let refused = lookup(&sidecar, None, reply.header("x-sideyard-generation-id")).await;
    assert_eq!(refused.json()["data"]["sideyard"]["status"], 404);
    assert_eq!(lookup(&sidecar, None, &generation).await.status, 404, "the oldest of three was forgotten");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_flags_nothing_is_recorded_and_the_lookup_says_how_to_turn_it_on() {
    let config = route_yaml("chat", "", &["{name: mock, api: mock, baseUrl: 'mock://local'}"]);
    let sidecar = Sidecar::start_with(&config, &["--log-format", "json"], &[]);
    let reply = post(sidecar.api, "/v1/chat/completions", &chat("chat", false)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-sideyard-generation-id"), "", "no record, no id");
    let off = lookup(&sidecar, None, "anything").await;
    assert_eq!(off.status, 404);
    assert_eq!(off.json()["error"]["code"], "generations_off");
    assert!(off.body.contains("--generations"), "{}", off.body);
    // The lookup was served after the request, so the request's line would be in the log by now.
    assert!(access_lines(&sidecar).is_empty(), "{}", sidecar.process.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_text_access_line_has_the_same_fields() {
    let config = route_yaml("chat", "", &["{name: mock, api: mock, baseUrl: 'mock://local'}"]);
    let sidecar = Sidecar::start_with(&config, &["--access-log"], &[]);
    let headers = [("x-request-id", "req-text")];
    let reply =
        read(send_with(sidecar.api, "POST", "/v1/chat/completions", &headers, &chat("chat", false)).await).await;
    assert_eq!(reply.status, 200);
    let mut line = String::new();
    eventually_or_explain(
        "the text access line",
        || {
            line = sidecar.process.log().lines().find(|l| l.contains("req-text")).unwrap_or_default().to_string();
            std::future::ready(!line.is_empty())
        },
        || sidecar.process.log(),
    )
    .await;
    for field in [
        "sideyard::access",
        "route=\"default/chat\"",
        "upstream_target=\"mock\"",
        "status=200",
        "attempts=1",
        "finish_reason=\"stop\"",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_genai_metrics_count_each_answer_s_tokens_and_times() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml("json", "", &[&format!("{{name: up, baseUrl: \"{}\", model: m-json}}", up.url("ok"))])
        + &route_yaml(
            "stream",
            "",
            &[
                "{name: mock, api: mock, provider: acme, model: m-stream, baseUrl: 'mock://local?chunks=4&chunk-interval=1ms'}",
            ],
        );
    let sidecar = Sidecar::start(&config);
    for _ in 0..2 {
        assert_eq!(post(sidecar.api, "/v1/chat/completions", &chat("json", false)).await.status, 200);
    }
    let response = send(sidecar.api, "POST", "/v1/chat/completions", &chat("stream", true)).await;
    let events = sse_data(&rest(&mut response.into_body()).await);
    let usage = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|e| e["usage"].as_object().cloned())
        .expect("a usage chunk");

    let metrics = get(sidecar.admin, "/metrics").await.body;
    let json = r#"gen_ai_operation_name="chat",gen_ai_provider_name="up",gen_ai_request_model="json",gen_ai_response_model="m-json",route="default/json",target="up""#;
    let stream = r#"gen_ai_operation_name="chat",gen_ai_provider_name="acme",gen_ai_request_model="stream",gen_ai_response_model="m-stream",route="default/stream",target="mock""#;
    // The scripted answer reports 3 prompt and 1 completion tokens.
    assert_eq!(metric(&metrics, &format!("gen_ai_client_token_usage_sum{{{json},gen_ai_token_type=\"input\"}}")), 6);
    assert_eq!(metric(&metrics, &format!("gen_ai_client_token_usage_sum{{{json},gen_ai_token_type=\"output\"}}")), 2);
    assert_eq!(
        metric(&metrics, &format!("gen_ai_client_token_usage_bucket{{{json},gen_ai_token_type=\"input\",le=\"4\"}}")),
        2
    );
    assert_eq!(
        metric(&metrics, &format!("gen_ai_client_token_usage_bucket{{{json},gen_ai_token_type=\"input\",le=\"1\"}}")),
        0
    );
    assert_eq!(metric(&metrics, &format!("gen_ai_client_operation_duration_seconds_count{{{json}}}")), 2);
    assert_eq!(
        metric(&metrics, &format!("gen_ai_client_operation_time_to_first_chunk_seconds_count{{{json}}}")),
        0,
        "not a stream"
    );
    let output = usage["completion_tokens"].as_u64().expect("completion tokens");
    assert_eq!(
        metric(&metrics, &format!("gen_ai_client_token_usage_sum{{{stream},gen_ai_token_type=\"output\"}}")),
        output
    );
    assert_eq!(metric(&metrics, &format!("gen_ai_client_operation_duration_seconds_count{{{stream}}}")), 1);
    assert_eq!(metric(&metrics, &format!("gen_ai_client_operation_time_to_first_chunk_seconds_count{{{stream}}}")), 1);
    assert_eq!(metric(&metrics, &format!("gen_ai_server_time_per_output_token_seconds_count{{{stream}}}")), 1);
    assert!(metrics.contains("# TYPE gen_ai_client_token_usage histogram"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_passed_through_gets_its_access_line_too() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml("chat", "", &[&format!("{{name: up, baseUrl: \"{}\", model: m}}", up.url("ok"))]);
    let sidecar = Sidecar::start_with(&config, &["--access-log", "--log-format", "json"], &[]);
    let headers = [("x-request-id", "req-moderation")];
    let body = r#"{"model":"chat","input":"the zebra crossing prompt"}"#;
    let reply = read(send_with(sidecar.api, "POST", "/v1/moderations", &headers, body).await).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(up.hits("ok"), 1, "passed through to the route's target");
    let line = access_line(&sidecar, "req-moderation").await;
    assert_eq!((line["method"].clone(), line["path"].clone()), ("POST".into(), "/v1/moderations".into()));
    assert_eq!((line["model"].clone(), line["route"].clone()), ("chat".into(), "default/chat".into()));
    assert_eq!((line["upstream_target"].clone(), line["status"].clone()), ("up".into(), 200.into()));
    assert!(!line.to_string().contains("zebra"), "{line}");

    // Refused before any target: an unknown path is a request too.
    let headers = [("x-request-id", "req-nowhere")];
    let reply = read(send_with(sidecar.api, "GET", "/nowhere", &headers, "").await).await;
    assert_eq!(reply.status, 404);
    let line = access_line(&sidecar, "req-nowhere").await;
    assert_eq!(
        (line["method"].clone(), line["path"].clone(), line["status"].clone()),
        ("GET".into(), "/nowhere".into(), 404.into())
    );
}
