//! `POST /v1/messages`, Anthropic's API served by the sidecar: passed through to `api: anthropic`
//! targets with only `model` rewritten (and the version and betas they accept), translated to
//! OpenAI-compatible targets and back, streaming both ways; errors in Anthropic's shape,
//! `fallbacks`, `x-api-key` as the caller's key, and the same metering as chat completions.

mod common;

use common::*;
use serde_json::Value;

const KEY: &str = "sk-team-a-0123456789";

/// `POST /v1/messages` with Anthropic SDK headers (`x-api-key` when a key is given).
async fn messages(addr: std::net::SocketAddr, key: Option<&str>, extra: &[(&str, &str)], body: &str) -> Reply {
    let mut headers = vec![("anthropic-version", "2023-06-01")];
    headers.extend(key.map(|key| ("x-api-key", key)));
    headers.extend_from_slice(extra);
    read(send_with(addr, "POST", "/v1/messages", &headers, body).await).await
}

/// A Messages request for `model` with one user turn and the `extra` fields.
fn ask(model: &str, extra: &str) -> String {
    format!(r#"{{"model":"{model}","max_tokens":64,"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
}

/// The `(event name, data)` pairs of a Messages stream.
fn events(body: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let name = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or_default().to_string();
        let data = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
        out.push((name, serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"))));
    }
    out
}

fn text_of(events: &[(String, Value)]) -> String {
    events.iter().filter_map(|(_, d)| d["delta"]["text"].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anthropic_target_gets_the_request_as_sent_with_the_version_and_the_betas_it_accepts() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "claude",
        "",
        &[&format!(
            "{{name: claude, api: anthropic, baseUrl: '{}', model: claude-upstream, credentials: {{env: ANTHROPIC_KEY}}, anthropicBetas: [prompt-caching-2024-07-31, context-1m-2025-08-07]}}",
            up.url("anthropic-answer-tools")
        )],
    ) + &route_yaml(
        "stream",
        "",
        &[&format!("{{name: claude, api: anthropic, baseUrl: '{}'}}", up.url("anthropic-stream-thinking"))],
    );
    let sidecar = Sidecar::start_with(&config, &[], &[("ANTHROPIC_KEY", "sk-ant-upstream")]);

    let body = r#"{"model":"claude","max_tokens":300,"system":[{"type":"text","text":"Manual...","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"text","text":"Weather?","cache_control":{"type":"ephemeral","ttl":"1h"}}]}],"tools":[{"name":"weather","input_schema":{"type":"object"},"cache_control":{"type":"ephemeral"}}]}"#;
    let betas = [("anthropic-beta", "prompt-caching-2024-07-31, files-api-2025-04-14,context-1m-2025-08-07")];
    let reply = messages(sidecar.api, Some("sk-caller-key"), &betas, body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let sent = &up.recorded("anthropic-answer-tools")[0];
    assert_eq!(sent.path, "/anthropic-answer-tools/v1/messages");
    let expected = body.replace(r#""model":"claude""#, r#""model":"claude-upstream""#);
    assert_eq!(String::from_utf8_lossy(&sent.body), expected, "byte for byte but the model");
    assert_eq!(sent.headers["x-api-key"], "sk-ant-upstream", "the target's key, never the caller's");
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert_eq!(sent.headers["anthropic-beta"], "prompt-caching-2024-07-31,context-1m-2025-08-07");

    let golden: Value =
        serde_json::from_slice(&std::fs::read("tests/testdata/anthropic/answers/tools.messages.json").unwrap())
            .unwrap();
    let mut answer = reply.json();
    assert_eq!(answer["usage"]["cost"], serde_json::json!(0));
    answer["usage"].as_object_mut().unwrap().remove("cost");
    assert_eq!(answer, golden, "the answer as the provider gave it, with its cost");

    // A stream passes through event for event; the cost joins the last usage.
    let reply = messages(sidecar.api, None, &[], &ask("stream", r#","stream":true"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let got = events(&reply.body);
    let sent = events(&std::fs::read_to_string("tests/testdata/anthropic/streams/thinking.events").unwrap());
    assert_eq!(got.len(), sent.len());
    for ((got_name, mut got), (name, data)) in got.into_iter().zip(sent) {
        assert_eq!(got_name, name);
        if name == "message_delta" {
            assert_eq!(got["usage"]["cost"], serde_json::json!(0), "{got}");
            got["usage"].as_object_mut().unwrap().remove("cost");
        }
        assert_eq!(got, data);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_openai_target_serves_messages_translated_both_ways() {
    let config = route_yaml(
        "gpt",
        "",
        &["{name: gpt, api: mock, model: gpt-upstream, baseUrl: 'mock://local?chunks=4&chunk-interval=1ms'}"],
    );
    let sidecar = Sidecar::start(&config);

    let reply = messages(sidecar.api, None, &[], &ask("gpt", "")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["role"], "assistant");
    assert_eq!(answer["content"], serde_json::json!([{"type": "text", "text": "Hello from the Sideyard"}]));
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["usage"]["output_tokens"], 4);
    assert!(answer["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let reply = messages(sidecar.api, None, &[], &ask("gpt", r#","stream":true"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.header("content-type").starts_with("text/event-stream"));
    let got = events(&reply.body);
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(text_of(&got), "Hello from the Sideyard");
    let delta = &got[7].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 4);
    assert_eq!(delta["usage"]["cost"], serde_json::json!(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_come_in_anthropic_s_shape_with_the_same_statuses() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "limited",
        "fallback: {when: []}",
        &[&format!("{{name: gpt, baseUrl: '{}'}}", up.url("status-429"))],
    ) + &route_yaml("gpt", "", &["{name: gpt, api: mock}"]);
    let sidecar = Sidecar::start(&config);
    let error_of = |reply: &Reply| {
        let body = reply.json();
        assert_eq!(body["type"], "error", "{body}");
        (body["error"]["type"].as_str().unwrap().to_string(), body["error"]["message"].as_str().unwrap().to_string())
    };

    let reply = messages(sidecar.api, None, &[], &ask("nope", "")).await;
    assert_eq!(reply.status, 404);
    let (kind, message) = error_of(&reply);
    assert_eq!(kind, "not_found_error");
    assert!(message.contains("\"nope\""), "{message}");

    let reply =
        messages(sidecar.api, None, &[], r#"{"model":"gpt","messages":[{"role":"user","content":"hi"}]}"#).await;
    assert_eq!(reply.status, 400);
    assert_eq!(error_of(&reply), ("invalid_request_error".into(), "max_tokens: Field required".into()));

    let reply = messages(sidecar.api, None, &[], "{not json").await;
    assert_eq!(reply.status, 400);
    assert_eq!(error_of(&reply).0, "invalid_request_error");

    // A tool result without its call is named before anything is sent.
    let orphan = r#"{"model":"gpt","max_tokens":9,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_X","content":"42"}]}]}"#;
    let reply = messages(sidecar.api, None, &[], orphan).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    let (kind, message) = error_of(&reply);
    assert_eq!(kind, "invalid_request_error");
    assert!(message.starts_with("messages[0].content[0].tool_use_id: "), "{message}");

    let reply = messages(sidecar.api, None, &[], &ask("limited", "")).await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert_eq!(reply.header("retry-after"), "7");
    assert_eq!(error_of(&reply), ("rate_limit_error".into(), "upstream says 429".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn fallbacks_name_the_routes_to_try_next() {
    let config =
        route_yaml("down", "", &["{name: down, api: mock, baseUrl: 'mock://local?fail-rate=1&fail-status=529'}"])
            + &route_yaml(
                "claude",
                "",
                &["{name: claude, api: anthropic, baseUrl: 'mock://local?chunk-interval=1ms'}"],
            );
    let sidecar = Sidecar::start(&config);
    let reply = messages(sidecar.api, None, &[], &ask("down", r#","fallbacks":["claude"]"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "claude");
    assert_eq!(reply.json()["model"], "claude", "the answer names the route that served it");

    let reply = messages(sidecar.api, None, &[], &ask("down", r#","fallbacks":["claude"],"stream":true"#)).await;
    let got = events(&reply.body);
    assert_eq!(got[0].1["message"]["model"], "claude");
    assert_eq!(got.last().unwrap().0, "message_stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_errors_fall_back_before_the_first_token_and_end_with_an_error_event_after_it() {
    let config = route_yaml(
        "held",
        "holdBack: 5s",
        &[
            "{name: gpt, api: mock, baseUrl: 'mock://local?error-after=0&chunk-interval=1ms'}",
            "{name: claude, api: anthropic, baseUrl: 'mock://local?error-after=0&chunk-interval=1ms'}",
            "{name: last, api: anthropic, baseUrl: 'mock://local?chunk-interval=1ms'}",
        ],
    ) + &route_yaml(
        "live",
        "holdBack: 0s",
        &["{name: claude, api: anthropic, baseUrl: 'mock://local?error-after=2&chunk-interval=1ms'}"],
    );
    let sidecar = Sidecar::start(&config);

    let reply = messages(sidecar.api, None, &[], &ask("held", r#","stream":true"#)).await;
    assert_eq!(reply.header("x-sideyard-target"), "last", "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-attempts"), "3");
    assert_eq!(events(&reply.body).last().unwrap().0, "message_stop");

    let reply = messages(sidecar.api, None, &[], &ask("live", r#","stream":true"#)).await;
    let got = events(&reply.body);
    assert_eq!(text_of(&got), "Hello from");
    let (name, data) = got.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error"]["type"], "overloaded_error", "{data}");
    assert!(!got.iter().any(|(n, _)| n == "message_stop"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_is_metered_the_same_through_both_apis() {
    let config = route_yaml(
        "chat",
        "",
        &["{name: mock, api: mock, baseUrl: 'mock://local?chunk-interval=1ms', pricing: {completion: '1000'}}"],
    ) + &budget_yaml("team-a", KEY, "limit: \"100\"");
    let sidecar = Sidecar::start(&config);
    let spent = || async {
        let reply = read(send_as(sidecar.api, Some(KEY), "GET", "/api/v1/key", "").await).await;
        reply.json()["data"]["usage"].as_f64().unwrap()
    };

    let reply = messages(sidecar.api, None, &[], &ask("chat", "")).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.json()["error"]["type"], "authentication_error");

    let reply = messages(sidecar.api, Some(KEY), &[], &ask("chat", "")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["usage"]["cost"], serde_json::json!(0.008), "8 words at 0.001");
    assert_eq!(spent().await, 0.008);

    let chat = r#"{"model":"chat","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = read(send_as(sidecar.api, Some(KEY), "POST", "/v1/chat/completions", chat).await).await;
    assert_eq!(reply.json()["usage"]["cost"], serde_json::json!(0.008));
    assert_eq!(spent().await, 0.016);

    let reply = messages(sidecar.api, Some(KEY), &[], &ask("chat", r#","stream":true"#)).await;
    let got = events(&reply.body);
    assert_eq!(got[got.len() - 2].1["usage"]["cost"], serde_json::json!(0.008));
    assert_eq!(spent().await, 0.024);
}

/// `POST /v1/messages/count_tokens`.
async fn count(addr: std::net::SocketAddr, body: &str) -> Reply {
    post(addr, "/v1/messages/count_tokens", body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn token_counts_come_from_an_anthropic_target_or_are_estimated_and_say_so() {
    let config = route_yaml("claude", "", &["{name: claude, api: anthropic, baseUrl: 'mock://local'}"])
        + &route_yaml("gpt", "", &["{name: gpt, api: mock}"])
        + &route_yaml(
            "broken",
            "",
            &["{name: claude, api: anthropic, baseUrl: 'mock://local?fail-rate=1&fail-status=529'}"],
        );
    let sidecar = Sidecar::start(&config);
    let body = |model: &str| {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"How many tokens is this?"}}]}}"#)
    };

    let reply = count(sidecar.api, &body("claude")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-token-count"), "anthropic");
    assert_eq!(reply.header("x-sideyard-target"), "claude");
    assert!(reply.json()["input_tokens"].as_u64().unwrap() > 0);

    for model in ["gpt", "broken"] {
        let reply = count(sidecar.api, &body(model)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("x-sideyard-token-count"), "estimated", "{model}");
        assert_eq!(reply.json()["input_tokens"], body(model).len() / 4);
    }

    let reply = count(sidecar.api, &body("nope")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["type"], "not_found_error");
}
