//! Chat completions served by `api: anthropic` targets: the request translated to the Messages
//! API with Anthropic's headers, answers and streams translated back (as the golden fixtures of
//! `tests/anthropic.rs` say), fallback in both directions, stream errors before and after the
//! first token, requests that cannot be translated, and budgets.

mod common;

use common::*;
use serde_json::Value;

const KEY: &str = "sk-ant-test-key";

/// A chat request for `model` with one user message and the `extra` fields (`,"stream":true`).
fn ask(model: &str, extra: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
}

/// Chunks of a stream with the fields that differ between runs (`created`, the cost) removed.
fn comparable(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            let mut v: Value = serde_json::from_str(e).unwrap();
            v.as_object_mut().unwrap().remove("created");
            if let Some(usage) = v.get_mut("usage").and_then(Value::as_object_mut) {
                usage.remove("cost");
            }
            v
        })
        .collect()
}

async fn stream(sidecar: &Sidecar, body: &str) -> (Reply, Vec<String>) {
    let reply = read(send(sidecar.api, "POST", "/v1/chat/completions", body).await).await;
    let events = sse_data(&reply.body);
    (reply, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chat_request_reaches_an_anthropic_target_as_a_messages_request_with_its_headers() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "chat",
        "reservedCompletionTokens: 300",
        &[&format!(
            "{{name: claude, api: anthropic, baseUrl: '{}', model: claude-test, credentials: {{env: ANTHROPIC_KEY}}}}",
            up.url("anthropic-answer-tools")
        )],
    ) + &route_yaml(
        "newer",
        "",
        &[&format!(
            "{{name: claude, api: anthropic, baseUrl: '{}', headers: {{anthropic-version: '2099-01-01', anthropic-beta: 'tools-2099'}}}}",
            up.url("anthropic-answer-text-cached")
        )],
    );
    let sidecar = Sidecar::start_with(&config, &[], &[("ANTHROPIC_KEY", KEY)]);

    let body = r#"{"model":"chat","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Weather in Paris and Rome?"}],"tools":[{"type":"function","function":{"name":"weather","parameters":{"type":"object"}}}]}"#;
    let reply = post(sidecar.api, "/v1/chat/completions", body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "claude");

    let sent = up.recorded("anthropic-answer-tools");
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!(sent.path, "/anthropic-answer-tools/v1/messages");
    assert_eq!(sent.headers["x-api-key"], KEY);
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert!(sent.headers.get("authorization").is_none(), "the key goes in x-api-key only");
    let messages: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(messages["model"], "claude-test");
    assert_eq!(messages["max_tokens"], 300, "the route's reservedCompletionTokens stands in for max_tokens");
    assert_eq!(messages["system"][0]["text"], "Be brief.");
    assert_eq!(messages["tools"][0]["name"], "weather");

    // The answer is the golden translation of the same Messages answer.
    let mut golden: Value =
        serde_json::from_slice(&std::fs::read("tests/testdata/anthropic/answers/tools.chat.json").unwrap()).unwrap();
    let mut answer = reply.json();
    assert_eq!(answer["model"], "claude-test");
    assert_eq!(answer["usage"]["cost"], serde_json::json!(0), "no prices: free, and said so");
    for v in [&mut answer, &mut golden] {
        let o = v.as_object_mut().unwrap();
        o.remove("created");
        o.remove("model");
        o["usage"].as_object_mut().unwrap().remove("cost");
    }
    assert_eq!(answer, golden);
    assert_eq!(answer["choices"][0]["message"]["tool_calls"].as_array().unwrap().len(), 2);

    // A target's headers override the version and add betas.
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("newer", "")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let sent = &up.recorded("anthropic-answer-text-cached")[0];
    assert_eq!(sent.headers["anthropic-version"], "2099-01-01");
    assert_eq!(sent.headers["anthropic-beta"], "tools-2099");
    let usage = &reply.json()["usage"];
    assert_eq!(usage["prompt_tokens"], 12 + 2048 + 512, "OpenAI's prompt_tokens include cache reads and writes");
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 2048);
    assert_eq!(usage["prompt_tokens_details"]["cache_write_tokens"], 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_from_an_anthropic_target_become_the_golden_chunk_streams() {
    let up = ScriptedUpstream::start().await;
    let cases = ["text", "tools", "thinking"];
    let config: String = cases
        .iter()
        .map(|case| {
            let url = up.url(&format!("anthropic-stream-{case}"));
            route_yaml(case, "", &[&format!("{{name: claude, api: anthropic, baseUrl: '{url}', model: chat}}")])
        })
        .collect();
    let sidecar = Sidecar::start(&config);
    for case in cases {
        let body = ask(case, r#","stream":true,"stream_options":{"include_usage":true}"#);
        let (reply, events) = stream(&sidecar, &body).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.header("content-type").starts_with("text/event-stream"));
        assert_eq!(events.last().unwrap(), "[DONE]", "{case}");
        let golden = std::fs::read_to_string(format!("tests/testdata/anthropic/streams/{case}.chunks")).unwrap();
        assert_eq!(comparable(&events), comparable(&sse_data(&golden)), "{case}");
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["cost"], serde_json::json!(0), "the caller asked for usage: it has its cost");
    }

    // Without include_usage, no usage chunk, as from OpenAI.
    let (_, events) = stream(&sidecar, &ask("text", r#","stream":true"#)).await;
    assert!(!events.iter().any(|e| e.contains("\"usage\"")), "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mock_provider_speaks_messages_in_process_and_as_a_process() {
    let (_mock, addr) = {
        let (process, line) = Process::start(
            &[
                "mock-provider",
                "--listen",
                "127.0.0.1:0",
                "--require-key",
                KEY,
                "--chunks",
                "3",
                "--chunk-interval",
                "1ms",
            ],
            &[],
            "mock provider serving",
        );
        (process, addr_after(&line, "listen="))
    };
    let config =
        route_yaml(
            "chat",
            "",
            &[&format!(
                "{{name: process, api: anthropic, baseUrl: 'http://{addr}', credentials: {{env: ANTHROPIC_KEY}}}}"
            )],
        ) + &route_yaml(
            "inproc",
            "",
            &["{name: inproc, api: anthropic, baseUrl: 'mock://local?chunks=4&chunk-interval=1ms'}"],
        ) + &route_yaml("keyless", "", &[&format!("{{name: process, api: anthropic, baseUrl: 'http://{addr}'}}")]);
    let sidecar = Sidecar::start_with(&config, &[], &[("ANTHROPIC_KEY", KEY)]);

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("chat", "")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    assert_eq!(answer["choices"][0]["message"]["content"], "Hello from the");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["completion_tokens"], 3);

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("inproc", r#","max_tokens":2"#)).await;
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "Hello from");
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "length", "max_tokens stopped it");

    let (_, events) = stream(&sidecar, &ask("inproc", r#","stream":true"#)).await;
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().map(String::from)
        })
        .collect();
    assert_eq!(text, "Hello from the Sideyard");
    assert_eq!(events.last().unwrap(), "[DONE]");

    // The mock checks x-api-key; the sidecar does not pass a provider's 401 on to the caller.
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("keyless", "")).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert!(reply.body.contains("401"), "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_crosses_formats_both_ways_and_overloaded_counts_as_5xx() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "to-claude",
        "",
        &[
            "{name: gpt, api: mock, baseUrl: 'mock://local?fail-rate=1&fail-status=503'}",
            "{name: claude, api: anthropic, baseUrl: 'mock://local?chunk-interval=1ms'}",
        ],
    ) + &route_yaml(
        "to-gpt",
        "fallback: {when: ['5xx', '429']}",
        &[
            &format!("{{name: overloaded, api: anthropic, baseUrl: '{}'}}", up.url("anthropic-status-529")),
            &format!("{{name: limited, api: anthropic, baseUrl: '{}'}}", up.url("anthropic-status-429")),
            "{name: gpt, api: mock, baseUrl: 'mock://local?chunk-interval=1ms'}",
        ],
    ) + &route_yaml(
        "no-fallback",
        "fallback: {when: []}",
        &[&format!("{{name: limited, api: anthropic, baseUrl: '{}'}}", up.url("anthropic-status-429"))],
    );
    let sidecar = Sidecar::start(&config);

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("to-claude", "")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "claude");
    assert_eq!(reply.header("x-sideyard-fallback-reason"), "5xx");
    assert_eq!(reply.json()["object"], "chat.completion");

    let (reply, events) = stream(&sidecar, &ask("to-gpt", r#","stream":true"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "gpt");
    assert_eq!(reply.header("x-sideyard-attempts"), "3");
    assert_eq!(events.last().unwrap(), "[DONE]");

    // A 429 without fallback reaches the caller in OpenAI's shape, with the retry hint.
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("no-fallback", "")).await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert_eq!(reply.header("retry-after"), "7");
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["message"], "anthropic says 429");

    let metrics = get(sidecar.admin, "/metrics").await.body;
    let failures = metric(
        &metrics,
        r#"sideyard_upstream_outcomes_total{route="default/to-gpt",target="overloaded",outcome="5xx"}"#,
    );
    assert_eq!(failures, 1, "529 overloaded_error is a 5xx for fallback and health");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_event_falls_back_before_the_first_token_and_ends_the_stream_after_it() {
    let config = route_yaml(
        "held",
        "holdBack: 5s",
        &[
            "{name: claude, api: anthropic, baseUrl: 'mock://local?error-after=0&chunk-interval=1ms'}",
            "{name: gpt, api: mock, baseUrl: 'mock://local?chunk-interval=1ms'}",
        ],
    ) + &route_yaml(
        "live",
        "holdBack: 0s",
        &["{name: claude, api: anthropic, baseUrl: 'mock://local?error-after=2&chunk-interval=1ms'}"],
    );
    let sidecar = Sidecar::start(&config);

    let (reply, events) = stream(&sidecar, &ask("held", r#","stream":true"#)).await;
    assert_eq!(reply.header("x-sideyard-target"), "gpt", "the overloaded stream fell back invisibly");
    assert_eq!(events.last().unwrap(), "[DONE]");

    let (reply, events) = stream(&sidecar, &ask("live", r#","stream":true"#)).await;
    assert_eq!(reply.status, 200);
    assert!(!events.contains(&"[DONE]".to_string()), "a failed stream never ends clean: {events:?}");
    let words: Vec<String> = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().map(String::from)
        })
        .collect();
    assert_eq!(words.concat(), "Hello from", "the tokens before the error reached the caller");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "overloaded_error", "{last}");
    assert_eq!(last["choices"][0]["finish_reason"], "error");

    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_stream_errors_total{route="default/live",target="claude"}"#), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_anthropic_cannot_express_is_a_clear_400_or_goes_to_a_target_that_can() {
    let up = ScriptedUpstream::start().await;
    let claude = format!("{{name: claude, api: anthropic, baseUrl: '{}'}}", up.url("anthropic-answer-tools"));
    let config = route_yaml("claude", "", &[&claude])
        + &route_yaml(
            "either",
            "fallback: {when: ['4xx']}",
            &[&claude, "{name: gpt, api: mock, baseUrl: 'mock://local'}"],
        );
    let sidecar = Sidecar::start(&config);
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("claude", r#","n":2"#)).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "untranslatable_request");
    assert!(error["message"].as_str().unwrap().starts_with("n: "), "{error}");
    assert_eq!(reply.header("x-sideyard-error-source"), "proxy");

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("either", r#","n":2"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "gpt");
    assert_eq!(up.hits("anthropic-answer-tools"), 0, "nothing was sent to the target that cannot take it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_translated_stream_reaches_the_caller_as_its_events_arrive_and_can_win_a_hedge() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "gated",
        "",
        &[&format!("{{name: claude, api: anthropic, baseUrl: '{}'}}", up.url("anthropic-gated"))],
    ) + &route_yaml(
        "hedged",
        "holdBack: 5s\n  hedge: {after: 200ms}",
        &[
            "{name: slow, api: mock, baseUrl: 'mock://local?latency=3s'}",
            "{name: claude, api: anthropic, baseUrl: 'mock://local?chunk-interval=1ms'}",
        ],
    );
    let sidecar = Sidecar::start(&config);

    // The upstream holds the rest of its answer until the caller has the first token.
    let response = send(sidecar.api, "POST", "/v1/chat/completions", &ask("gated", r#","stream":true"#)).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut seen = String::new();
    while !seen.contains("Hello") {
        let chunk = next_chunk(&mut body).await.expect("the first token before the stream ends");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!seen.contains("[DONE]"), "{seen}");
    up.gate.add_permits(1);
    seen.push_str(&rest(&mut body).await);
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");

    let (reply, events) = stream(&sidecar, &ask("hedged", r#","stream":true"#)).await;
    assert_eq!(reply.header("x-sideyard-target"), "claude");
    assert_eq!(reply.header("x-sideyard-attempts"), "2");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_hedges_total{route="default/hedged",result="won"}"#), 1);
}
