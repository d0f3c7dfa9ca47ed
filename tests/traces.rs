//! OpenTelemetry traces, as a collector receives them: a sidecar started with `--otlp-endpoint`
//! exports to an OTLP/HTTP receiver on 127.0.0.1 in this test, which decodes the protobuf and
//! checks the spans and attributes of a fallback and of a streamed request, and that each
//! attempt's `traceparent` reached its upstream.

mod common;

use common::otlp::{attributes, hex, receiver, spans_of};
use common::*;
use opentelemetry_proto::tonic::trace::v1::{Span, span, status};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread")]
async fn a_fallback_and_a_stream_are_exported_with_the_genai_attributes() {
    let (collector, received) = receiver().await;
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "chat",
        "fallback: {when: [5xx]}",
        &[
            &format!("{{name: bad, baseUrl: \"{}\", model: bad-model}}", up.url("status-500")),
            &format!("{{name: good, baseUrl: \"{}\", model: good-model}}", up.url("ok")),
        ],
    ) + &route_yaml(
        "stream",
        "",
        &[
            "{name: mock, api: mock, provider: acme, model: m-stream, baseUrl: 'mock://local?chunks=3&chunk-interval=1ms'}",
        ],
    );
    let endpoint = format!("http://{collector}");
    let sidecar = Sidecar::start_with(&config, &["--otlp-endpoint", &endpoint], &[]);

    // A fallback, in the caller's trace.
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"the zebra crossing prompt"}]}"#;
    let headers = [("traceparent", traceparent.as_str()), ("authorization", "Bearer sk-not-in-any-span")];
    let reply = read(send_with(sidecar.api, "POST", "/v1/chat/completions", &headers, body).await).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let spans = spans_of(&received, CALLER_TRACE, 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let request = spans.iter().find(|s| s.kind == span::SpanKind::Server as i32).expect("the request's span");
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN, "the request's span continues the caller's trace");
    assert_eq!(request.name, "chat chat");
    let a = attributes(request);
    for (key, value) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "chat"),
        ("gen_ai.response.model", "good-model"),
        ("gen_ai.provider.name", "good"),
        ("gen_ai.response.id", "chatcmpl-ok"),
        ("gen_ai.usage.input_tokens", "3"),
        ("gen_ai.usage.output_tokens", "1"),
        ("gen_ai.response.finish_reasons", "[Some(\"stop\")]"),
        ("http.response.status_code", "200"),
        ("sideyard.route", "default/chat"),
        ("sideyard.target", "good"),
        ("sideyard.attempts", "2"),
        ("sideyard.fallback_reason", "5xx"),
        ("sideyard.hedged", "false"),
    ] {
        assert_eq!(a.get(key).map(String::as_str), Some(value), "{key} in {a:#?}");
    }
    let attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == span::SpanKind::Client as i32).collect();
    assert_eq!(attempts.len(), 2);
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, request.span_id, "an attempt is a child of its request");
        assert!(attempt.start_time_unix_nano >= request.start_time_unix_nano);
        assert!(attempt.end_time_unix_nano <= request.end_time_unix_nano);
    }
    let (bad, good) = (attributes(attempts[0]), attributes(attempts[1]));
    assert_eq!((bad["sideyard.target"].as_str(), bad["sideyard.attempt"].as_str()), ("bad", "1"));
    assert_eq!((bad["error.type"].as_str(), bad["http.response.status_code"].as_str()), ("5xx", "500"));
    assert_eq!(attempts[0].status.as_ref().map(|s| s.code), Some(status::StatusCode::Error as i32));
    assert_eq!((good["sideyard.target"].as_str(), good["sideyard.attempt"].as_str()), ("good", "2"));
    assert_eq!(good["gen_ai.usage.output_tokens"], "1");
    assert!(!good.contains_key("error.type"));

    // Each attempt's traceparent reached its upstream: the caller's trace, the attempt's span.
    for (behaviour, attempt) in [("status-500", attempts[0]), ("ok", attempts[1])] {
        let sent = up.recorded(behaviour);
        let header = sent[0].headers["traceparent"].to_str().unwrap().to_string();
        assert_eq!(header, format!("00-{CALLER_TRACE}-{}-01", hex(&attempt.span_id)), "{behaviour}");
    }

    // A stream, in a new trace.
    let body = r#"{"model":"stream","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = send(sidecar.api, "POST", "/v1/chat/completions", body).await;
    rest(&mut response.into_body()).await;
    let mut stream_trace = String::new();
    eventually("the stream's spans", || {
        let received = received.0.lock().unwrap();
        let found = received.iter().find(|(_, s)| s.name == "chat stream").map(|(_, s)| hex(&s.trace_id));
        stream_trace = found.unwrap_or_default();
        std::future::ready(!stream_trace.is_empty())
    })
    .await;
    let spans = spans_of(&received, &stream_trace, 2).await;
    let request = spans.iter().find(|s| s.kind == span::SpanKind::Server as i32).expect("the stream's span");
    assert!(request.parent_span_id.is_empty(), "a trace the sidecar started has no parent");
    let a = attributes(request);
    assert_eq!(a["gen_ai.provider.name"], "acme");
    assert_eq!(a["gen_ai.response.model"], "m-stream");
    assert_eq!(a["gen_ai.response.finish_reasons"], "[Some(\"stop\")]");
    assert_eq!(a["sideyard.end"], "answered");
    assert!(a["gen_ai.usage.output_tokens"].parse::<u64>().is_ok_and(|n| n > 0), "{a:#?}");

    // Every span the receiver got is counted as exported; none failed or was dropped.
    let got = received.0.lock().unwrap().len() as u64;
    eventually("the exported spans counted", || async {
        let metrics = get(sidecar.admin, "/metrics").await.body;
        metric(&metrics, r#"sideyard_trace_spans_total{result="exported"}"#) >= got
    })
    .await;
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_trace_spans_total{result="failed"}"#), 0);
    assert_eq!(metric(&metrics, r#"sideyard_trace_spans_total{result="dropped"}"#), 0);

    let all = format!("{:?}", received.0.lock().unwrap());
    assert!(!all.contains("zebra") && !all.contains("sk-not-in-any-span"), "no prompt and no key in any span");
    assert!(received.0.lock().unwrap().iter().all(|(service, _)| service == "sideyard-sidecar"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsampled_caller_trace_goes_upstream_as_it_came() {
    let (collector, _received) = receiver().await;
    let up = ScriptedUpstream::start().await;
    let config = route_yaml("chat", "", &[&format!("{{name: up, baseUrl: \"{}\", model: m}}", up.url("ok"))]);
    let sidecar = Sidecar::start_with(&config, &["--otlp-endpoint", &format!("http://{collector}")], &[]);
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-00");
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
    let reply =
        read(send_with(sidecar.api, "POST", "/v1/chat/completions", &[("traceparent", &traceparent)], body).await)
            .await;
    assert_eq!(reply.status, 200);
    assert_eq!(up.recorded("ok")[0].headers["traceparent"], traceparent.as_str());
}

#[test]
fn a_grpc_protocol_is_refused_at_start_saying_what_to_set() {
    let (code, _, stderr) = run_with(
        &["sidecar", "-f", "examples/quickstart.yaml", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
    );
    assert_eq!(code, Some(64), "a usage error: {stderr}");
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc") && stderr.contains("http/protobuf"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_still_queued_at_shutdown_are_exported_before_the_process_exits() {
    let (collector, received) = receiver().await;
    let config = route_yaml("chat", "", &["{name: mock, api: mock, baseUrl: 'mock://local'}"]);
    let sidecar = Sidecar::start_with(&config, &["--otlp-endpoint", &format!("http://{collector}")], &[]);
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(post(sidecar.api, "/v1/chat/completions", body).await.status, 200);
    // Stopped at once: its spans wait in the exporter's batch for another half second.
    sidecar.process.terminate();
    let mut process = sidecar.process;
    let status = tokio::task::spawn_blocking(move || process.wait_exit()).await.unwrap();
    assert!(status.success());
    let spans = received.0.lock().unwrap().len();
    assert_eq!(spans, 2, "the request's and its attempt's spans, received before the process exited");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_trace_content_the_messages_and_the_answer_text_are_in_the_request_span() {
    let (collector, received) = receiver().await;
    let config =
        route_yaml("chat", "", &["{name: mock, api: mock, baseUrl: 'mock://local?chunks=3&chunk-interval=1ms'}"]);
    let args = ["--otlp-endpoint", &format!("http://{collector}"), "--trace-content"];
    let sidecar = Sidecar::start_with(&config, &args, &[]);
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"chat","stream":{stream},"messages":[{{"role":"user","content":"the zebra crossing prompt"}}]}}"#
        );
        let response = send(sidecar.api, "POST", "/v1/chat/completions", &body).await;
        let text = rest(&mut response.into_body()).await;
        // The words the mock answered, as the caller got them.
        let answered: String = if stream {
            sse_data(&text)
                .iter()
                .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
                .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(String::from))
                .collect()
        } else {
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(!answered.is_empty());
        let mut span = None;
        eventually("the request's span", || {
            let spans = received.0.lock().unwrap();
            span = spans.iter().rev().map(|(_, s)| attributes(s)).find(|a| {
                a.get("gen_ai.output.messages").is_some_and(|o| o.contains(&answered))
                    && a.contains_key("sideyard.attempts")
            });
            std::future::ready(span.is_some())
        })
        .await;
        let span = span.unwrap_or_default();
        assert_eq!(span["gen_ai.input.messages"], r#"[{"role":"user","content":"the zebra crossing prompt"}]"#);
        let output: serde_json::Value = serde_json::from_str(&span["gen_ai.output.messages"]).unwrap();
        assert_eq!(output[0]["parts"][0]["content"], answered.as_str(), "stream: {stream}");
        assert_eq!(output[0]["finish_reason"], "stop");
    }
}
