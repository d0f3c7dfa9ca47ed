//! Streaming: bytes reach the caller unchanged and as soon as each event is complete; a stream that
//! stalls past its total timeout ends with a terminal error event.

mod common;

use common::*;

/// Hold-back is off here: these tests are about relaying, event by event, from the first byte.
fn route(model: &str, base_url: &str, timeouts: &str) -> String {
    route_yaml(model, "holdBack: 0s", &[&format!("{{name: only, baseUrl: \"{base_url}\", timeouts: {timeouts}}}")])
}

/// The end of the last complete SSE event in `bytes`, or 0.
fn complete_events(bytes: &[u8]) -> usize {
    (2..=bytes.len())
        .rev()
        .find(|&i| bytes[i - 1] == b'\n' && (bytes[i - 2] == b'\n' || (i >= 3 && &bytes[i - 3..i - 1] == b"\n\r")))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_bytes_arrive_unchanged_and_before_the_upstream_sends_more() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&route("gated", &up.url("sse-gated"), "{}"));
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"gated","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().get("content-length").is_none());
    let mut body = response.into_body();

    let all = GATED_EVENTS.concat().into_bytes();
    let cuts = gated_cuts();
    let mut received: Vec<u8> = Vec::new();
    for (k, &sent) in cuts.iter().enumerate().skip(1) {
        // The upstream has sent all[..sent] and waits for the gate: every complete event in it must
        // reach the caller now, or this read never finishes.
        let due = complete_events(&all[..sent]);
        while received.len() < due {
            let chunk = next_chunk(&mut body).await.expect("stream ended early");
            received.extend_from_slice(&chunk);
        }
        assert_eq!(received, all[..due], "after upstream segment {k}");
        up.gate.add_permits(1);
    }
    received.extend_from_slice(rest(&mut body).await.as_bytes());
    assert_eq!(String::from_utf8(received).unwrap(), GATED_EVENTS.concat(), "byte for byte");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_stalls_ends_with_a_timeout_event() {
    let up = ScriptedUpstream::start().await;
    let sidecar =
        Sidecar::start(&route("stalls", &up.url("sse-stall"), "{connect: 100ms, firstByte: 200ms, total: 500ms}"));
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"stalls","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    let text = rest(&mut response.into_body()).await;
    let events = sse_data(&text);
    assert_eq!(events.len(), 3, "{text}");
    let error: serde_json::Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_timeout");
    assert_eq!(error["error"]["message"], "the upstream did not finish within the total timeout of 500ms");
    assert_eq!(error["choices"][0]["finish_reason"], "error");
    assert_eq!(error["provider"], "only");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_complete_stream_is_passed_through_with_its_done_marker() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&route("fine", &up.url("sse-ok"), "{}"));
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"fine","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sideyard-target"], "only");
    let text = rest(&mut response.into_body()).await;
    let events = sse_data(&text);
    assert_eq!(events.len(), 4, "{text}");
    assert_eq!(events[3], "[DONE]");
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_requests_total{route="default/fine",target="only",status="200"}"#), 1);
    assert_eq!(metric(&metrics, r#"sideyard_upstream_duration_seconds_count{route="default/fine",target="only"}"#), 1);
    assert_eq!(metric(&metrics, r#"sideyard_stream_errors_total{route="default/fine",target="only"}"#), 0);
}
