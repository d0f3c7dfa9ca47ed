//! `sideyard mock-provider` as a real upstream process behind a real sidecar, the knobs of the
//! in-process `api: mock` targets, and the quickstart example.

mod common;

use common::*;

fn start_mock(args: &[&str]) -> (Process, std::net::SocketAddr) {
    let mut all = vec!["mock-provider", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let (process, line) = Process::start(&all, &[], "mock provider serving");
    let addr = addr_after(&line, "listen=");
    (process, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_proxies_to_a_mock_provider_process() {
    let (mock, mock_addr) =
        start_mock(&["--require-key", "sk-mock-secret", "--chunks", "3", "--chunk-interval", "5ms"]);
    assert!(!mock.log().contains("sk-mock-secret"), "the mock logs its key: {}", mock.log());
    let config = format!(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: chat}}
spec:
  model: chat
  targets:
    - {{name: mock, baseUrl: "http://{mock_addr}/v1", model: upstream-model, credentials: {{env: MOCK_KEY}}}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: keyless}}
spec:
  model: keyless
  targets:
    - {{name: mock, baseUrl: "http://{mock_addr}/v1"}}
"#
    );
    let sidecar = Sidecar::start_with(&config, &[], &[("MOCK_KEY", "sk-mock-secret")]);

    let reply =
        post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#)
            .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["model"], "upstream-model");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello from the");
    assert_eq!(body["usage"]["completion_tokens"], 3);

    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"chat","stream":true}"#).await;
    let events = sse_data(&rest(&mut response.into_body()).await);
    assert_eq!(events.len(), 6, "role, 3 words, finish, [DONE]: {events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(!events.iter().any(|e| e.contains("\"usage\"")), "no usage chunk unless asked");

    let asked = r#"{"model":"chat","stream":true,"stream_options":{"include_usage":true}}"#;
    let response = send(sidecar.api, "POST", "/v1/chat/completions", asked).await;
    let events = sse_data(&rest(&mut response.into_body()).await);
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3, "{events:?}");

    // Without the key the mock answers 401, which the caller sees as a proxy error.
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"keyless"}"#).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(
        reply.json()["error"]["metadata"]["previous_errors"][0]["message"],
        "the provider rejected the configured credentials (401)"
    );

    let stats = get(mock_addr, "/mock/stats").await.json();
    assert_eq!(stats["requests"], 4);
    let models = get(mock_addr, "/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], "mock-model");
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_mock_knobs_inject_failures() {
    let route = |model: &str, url: &str, extra: &str| {
        route_yaml(model, "fallback: {when: []}", &[&format!("{{name: m, api: mock, baseUrl: '{url}'{extra}}}")])
    };
    let config = [
        route("limited", "mock://local?fail-rate=1&fail-status=429", ""),
        route("resets", "mock://local?reset-after=1&chunk-interval=1ms", ""),
        route("resets-json", "mock://local?reset-after=0", ""),
        route("hangs", "mock://local?hang", ", timeouts: {connect: 100ms, firstByte: 200ms}"),
        route(
            "stalls",
            "mock://local?stall-after=2&chunk-interval=1ms",
            ", timeouts: {connect: 100ms, firstByte: 200ms, total: 400ms}",
        ),
        route("slow", "mock://local?latency=50ms&chunks=2", ""),
    ]
    .concat();
    let sidecar = Sidecar::start(&config);

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"limited"}"#).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), "1");
    assert_eq!(reply.header("x-sideyard-error-source"), "upstream");

    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"resets","stream":true}"#).await;
    let events = sse_data(&rest(&mut response.into_body()).await);
    assert_eq!(events.len(), 3, "role chunk, one word, error: {events:?}");
    assert!(events[2].contains("\"finish_reason\":\"error\""), "{events:?}");

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"resets-json"}"#).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"]["metadata"]["previous_errors"][0]["reason"], "connect");

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"hangs"}"#).await;
    assert_eq!(reply.status, 504);

    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"stalls","stream":true}"#).await;
    let events = sse_data(&rest(&mut response.into_body()).await);
    assert!(events.last().unwrap().contains("upstream_timeout"), "{events:?}");

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"slow","max_tokens":1}"#).await;
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "Hello", "max_tokens caps the answer");
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "length", "and says so, as providers do");
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"slow","max_tokens":100}"#).await;
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "stop", "an answer not cut short stops");
    let response =
        send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"slow","max_tokens":1,"stream":true}"#).await;
    let events = sse_data(&rest(&mut response.into_body()).await);
    assert!(events.iter().any(|e| e.contains(r#""finish_reason":"length""#)), "{events:?}");

    // Through the Messages API: the stop reason and id as Anthropic writes them.
    let ask = r#"{"model":"slow","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = post(sidecar.api, "/v1/messages", ask).await.json();
    assert_eq!(answer["stop_reason"], "max_tokens", "{answer}");
    assert!(answer["id"].as_str().is_some_and(|id| id.starts_with("msg_")), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quickstart_example_serves_offline() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.yaml");
    let (_process, line) = Process::start(
        &["sidecar", "-f", path, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[],
        "serving",
    );
    let api = addr_after(&line, "api=");
    let mut served_by = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let reply =
            post(api, "/v1/chat/completions", r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#).await;
        assert_eq!(reply.status, 200, "the flaky target's failures fall back: {}", reply.body);
        *served_by
            .entry((reply.header("x-sideyard-target").to_string(), reply.header("x-sideyard-attempts").to_string()))
            .or_insert(0) += 1;
    }
    assert!(served_by.contains_key(&("flaky".into(), "1".into())), "{served_by:?}");
    assert!(served_by.contains_key(&("steady".into(), "2".into())), "{served_by:?}");

    let response = send(api, "POST", "/v1/chat/completions", r#"{"model":"gpt-4o-mini","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    let text = rest(&mut response.into_body()).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // The README's other calls: the Responses API and embeddings.
    let reply = post(api, "/v1/responses", r#"{"model": "chat", "input": "Hello"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["status"], "completed");
    let reply = post(api, "/v1/embeddings", r#"{"model": "embed", "input": ["Hello", "world"]}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["data"].as_array().unwrap().len(), 2);
}
