//! What the upstream receives: the caller's body with only `model` changed, the target's key instead
//! of the caller's, tracing headers, and requests on kept-alive connections.

mod common;

use std::collections::HashSet;

use common::*;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_gets_the_callers_body_and_the_targets_key() {
    let up = ScriptedUpstream::start().await;
    let target =
        format!("{{name: t, baseUrl: \"{}\", model: gpt-4o-2024-08-06, credentials: {{env: KEY}}}}", up.url("ok/a"));
    let sidecar = Sidecar::start_with(&route_yaml("chat", "", &[&target]), &[], &[("KEY", "sk-target")]);

    let body = "{\n  \"messages\": [{\"role\": \"user\", \"content\": \"model: chat \\u00e9\"}],\n  \"model\" : \"chat\",\n  \"temperature\": 0.25, \"seed\": 1e3\n}";
    let request = http::Request::post(format!("http://{}/v1/chat/completions", sidecar.api))
        .header("content-type", "application/json")
        .header("authorization", "Bearer caller-key")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("x-request-id", "req-42")
        .header("user-agent", "OpenAI/Python 3.57.0")
        .header("x-stainless-lang", "python")
        .header("cookie", "session=abc")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = Client::builder(TokioExecutor::new()).build_http().request(request).await.unwrap();
    assert_eq!(read(response).await.status, 200);

    let received = &up.recorded("ok/a")[0];
    let expected = body.replace("\"model\" : \"chat\"", "\"model\" : \"gpt-4o-2024-08-06\"");
    assert_eq!(String::from_utf8_lossy(&received.body), expected, "only the model value changes");
    let headers = &received.headers;
    assert_eq!(headers["authorization"], "Bearer sk-target");
    assert_eq!(headers["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    assert_eq!(headers["x-request-id"], "req-42");
    assert_eq!(headers["user-agent"], "OpenAI/Python 3.57.0");
    assert!(headers.get("cookie").is_none() && headers.get("x-stainless-lang").is_none(), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_kept_alive_and_reused() {
    let up = ScriptedUpstream::start().await;
    let sidecar =
        Sidecar::start(&route_yaml("chat", "", &[&format!("{{name: t, baseUrl: \"{}\"}}", up.url("ok/pool"))]));
    for _ in 0..5 {
        assert_eq!(post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat"}"#).await.status, 200);
    }
    let peers: HashSet<_> = up.recorded("ok/pool").iter().map(|r| r.peer).collect();
    assert_eq!(up.hits("ok/pool"), 5);
    assert_eq!(peers.len(), 1, "five sequential requests should share one connection: {peers:?}");
}
