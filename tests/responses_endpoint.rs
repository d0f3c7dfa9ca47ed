//! `POST /v1/responses` through the sidecar: passed through to targets that speak the Responses
//! API, translated for chat-only and Anthropic targets, JSON and streamed, with fallback,
//! hold-back, budgets and the clear errors of stateful requests.

mod common;

use common::*;

const KEY: &str = "sk-responder-0123456789";
const WORDS: &str = "Hello from the Sideyard mock provider, all good.";

fn config(up: &ScriptedUpstream) -> String {
    let mock = "baseUrl: 'mock://local?chunk-interval=1ms', pricing: {prompt: '1000', completion: '1000'}";
    [
        route_yaml("native", "", &[&format!("{{name: native, api: mock, nativeResponses: true, {mock}}}")]),
        route_yaml("chat-only", "", &[&format!("{{name: chat, api: mock, {mock}}}")]),
        route_yaml("claude", "", &[&format!("{{name: claude, api: anthropic, {mock}}}")]),
        route_yaml(
            "scripted",
            "",
            &[&format!(
                "{{name: scripted, nativeResponses: true, model: gpt-5, baseUrl: '{}/v1'}}",
                up.url("provider-api")
            )],
        ),
        route_yaml("scripted-chat", "", &[&format!("{{name: scripted-chat, baseUrl: '{}'}}", up.url("ok"))]),
        route_yaml(
            "falls-back",
            "",
            &[
                &format!("{{name: down, nativeResponses: true, baseUrl: '{}'}}", up.url("status-503")),
                "{name: broken-early, api: mock, baseUrl: 'mock://local?error-after=0'}",
                &format!("{{name: chat, api: mock, {mock}}}"),
            ],
        ),
        route_yaml(
            "breaks",
            "",
            &["{name: breaks, api: mock, baseUrl: 'mock://local?error-after=2&chunk-interval=1ms'}"],
        ),
    ]
    .concat()
        + &budget_yaml("responder", KEY, "limit: \"100\"")
}

async fn call(sidecar: &Sidecar, body: &str) -> Reply {
    read(send_as(sidecar.api, Some(KEY), "POST", "/v1/responses", body).await).await
}

/// The events of a streamed response: (event name, data).
async fn stream(sidecar: &Sidecar, body: &str) -> Vec<(String, serde_json::Value)> {
    let response = send_as(sidecar.api, Some(KEY), "POST", "/v1/responses", body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = rest(&mut response.into_body()).await;
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let name = event.lines().find_map(|l| l.strip_prefix("event: ")).expect("every event is named");
            let data = event.lines().find_map(|l| l.strip_prefix("data: ")).expect("every event has data");
            (name.to_string(), serde_json::from_str(data).unwrap())
        })
        .collect()
}

fn output_text(response: &serde_json::Value) -> String {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().unwrap().iter())
        .filter_map(|part| part["text"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_target_answers_in_the_responses_shape() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&config(&up));
    let mut spent = 0.0;
    for model in ["native", "chat-only", "claude"] {
        let body =
            format!(r#"{{"model": "{model}", "instructions": "Be nice.", "input": "Say hello", "store": false}}"#);
        let reply = call(&sidecar, &body).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-attempts"), "1");
        let response = reply.json();
        assert_eq!(response["object"], "response", "{model}");
        assert_eq!(response["status"], "completed", "{model}");
        assert_eq!(output_text(&response), WORDS, "{model}");
        let usage = &response["usage"];
        assert_eq!(usage["output_tokens"], 8, "{model}");
        assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{model}");
        let tokens = usage["input_tokens"].as_u64().unwrap() + 8;
        assert_eq!(usage["cost"].as_f64().unwrap(), tokens as f64 / 1000.0, "{model}: priced per token");
        spent += usage["cost"].as_f64().unwrap();

        let events = stream(&sidecar, &body.replace("\"store\": false", "\"stream\": true")).await;
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..3], ["response.created", "response.in_progress", "response.output_item.added"], "{model}");
        assert_eq!(names.last(), Some(&"response.completed"), "{model}");
        for (name, data) in &events {
            assert_eq!(data["type"], name.as_str(), "{model}: an event's name is its type");
        }
        let deltas: String = events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, WORDS, "{model}");
        let completed = &events.last().unwrap().1["response"];
        assert_eq!(output_text(completed), WORDS, "{model}");
        assert_eq!(completed["usage"]["output_tokens"], 8, "{model}");
        spent += completed["usage"]["cost"].as_f64().expect("the final response carries its cost");
    }
    let key = read(send_as(sidecar.api, Some(KEY), "GET", "/api/v1/key", "").await).await.json();
    assert!((key["data"]["usage"].as_f64().unwrap() - spent).abs() < 1e-9, "{key} vs {spent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_native_target_gets_the_request_as_it_is_and_others_a_chat_request() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&config(&up));
    // State is the native target's to keep: passed on, only the model renamed.
    let body = r#"{"model": "scripted", "input": "again", "previous_response_id": "resp_1", "store": true}"#;
    let reply = call(&sidecar, body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let recorded = up.recorded("provider-api").pop().unwrap();
    assert_eq!(recorded.path, "/provider-api/v1/responses");
    assert_eq!(
        &recorded.body[..],
        br#"{"model": "gpt-5", "input": "again", "previous_response_id": "resp_1", "store": true}"#
    );

    // A chat-only target gets chat completions, and its answer comes back as a response.
    let reply = call(&sidecar, r#"{"model": "scripted-chat", "instructions": "Short.", "input": "Hi"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(output_text(&reply.json()), "fine");
    let recorded = up.recorded("ok").pop().unwrap();
    assert_eq!(recorded.path, "/ok/chat/completions");
    let sent: serde_json::Value = serde_json::from_slice(&recorded.body).unwrap();
    assert_eq!(
        sent["messages"],
        serde_json::json!([{"role": "system", "content": "Short."}, {"role": "user", "content": "Hi"}])
    );

    // State needs a store, which only a native target has: a clear 400 naming the field.
    for (field, body) in [
        ("store", r#"{"model": "chat-only", "input": "hi", "store": true}"#),
        ("previous_response_id", r#"{"model": "claude", "input": "hi", "previous_response_id": "resp_1"}"#),
    ] {
        let reply = call(&sidecar, body).await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(error["code"], "untranslatable_request");
        let message = error["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{field}: ")) && message.contains("needs a response store"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_before_the_first_token_fall_back_and_after_it_end_with_response_failed() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&config(&up));
    // The native target is down (503), the next one's stream fails before its first token: both
    // are invisible to the caller.
    let events = stream(&sidecar, r#"{"model": "falls-back", "input": "hi", "stream": true}"#).await;
    assert_eq!(events.last().unwrap().0, "response.completed");
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.iter().filter(|n| **n == "response.created").count(), 1, "{names:?}");
    let reply = call(&sidecar, r#"{"model": "falls-back", "input": "hi"}"#).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-sideyard-fallback-reason"), "5xx");

    // After the first token there is no going back: the stream ends with response.failed.
    let events = stream(&sidecar, r#"{"model": "breaks", "input": "hi", "stream": true}"#).await;
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "response.failed", "{events:?}");
    assert_eq!(data["response"]["status"], "failed");
    assert!(data["response"]["error"]["message"].as_str().unwrap().contains("Injected stream error"), "{data}");
    assert!(events.iter().all(|(n, _)| n != "response.completed"));
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "Hello from");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_native_stream_passes_through_and_one_cut_short_ends_with_response_failed() {
    let up = ScriptedUpstream::start().await;
    let route = |model: &str, case: &str| {
        route_yaml(model, "", &[&format!("{{name: native, nativeResponses: true, baseUrl: '{}'}}", up.url(case))])
    };
    let sidecar = Sidecar::start(
        &[
            route("whole", "responses-stream-tools"),
            route("cut", "responses-stream-error"),
            route("type-last", "responses-native-pydantic-order"),
        ]
        .concat(),
    );

    // Event for event as the provider sent them, the final usage with its cost (unpriced: 0).
    let response =
        send(sidecar.api, "POST", "/v1/responses", r#"{"model": "whole", "input": "hi", "stream": true}"#).await;
    let relayed = rest(&mut response.into_body()).await;
    let sent = std::fs::read_to_string("tests/testdata/responses/streams/tools.events").unwrap();
    let sent = sent[..sent.find("END: ").unwrap()].replace(r#""total_tokens":110}"#, r#""total_tokens":110,"cost":0}"#);
    assert_eq!(relayed, sent);

    // Written by a server built on OpenAI's Python types (vLLM, say), `type` after `response`:
    // the same, and nothing after its response.completed.
    let response =
        send(sidecar.api, "POST", "/v1/responses", r#"{"model": "type-last", "input": "hi", "stream": true}"#).await;
    let relayed = rest(&mut response.into_body()).await;
    let sent = std::fs::read_to_string("tests/testdata/responses/native/pydantic-order.events").unwrap();
    assert_eq!(relayed, sent.replace(r#""total_tokens":14}"#, r#""total_tokens":14,"cost":0}"#));

    // The provider's stream ends after its first token without response.completed.
    let response =
        send(sidecar.api, "POST", "/v1/responses", r#"{"model": "cut", "input": "hi", "stream": true}"#).await;
    let relayed = rest(&mut response.into_body()).await;
    assert!(relayed.contains(r#""delta":"Partial""#), "{relayed}");
    let last = relayed.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: response.failed\n"), "{last}");
    assert!(last.contains("ended before its last event"), "{last}");
}
