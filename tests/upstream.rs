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

const ANSWER: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// An upstream that reads one request per connection, writes `response` and closes the
/// connection. Returns its address and the request heads it read.
async fn one_shot_upstream(response: String) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let (addr, heads, _) = closing_upstream(move |_| response.clone(), false).await;
    (addr, heads)
}

/// An upstream that answers one request per connection with `respond(path)`, then closes it
/// without `connection: close`, as HTTP/1.1 allows. With `cross`, it closes only once the next
/// request has arrived on the connection, unanswered: the close that crosses a request on the
/// wire, every time. Returns its address, the heads it answered, and how many requests it left
/// unanswered.
async fn closing_upstream(
    respond: impl Fn(&str) -> String + Send + Sync + 'static,
    cross: bool,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>, std::sync::Arc<std::sync::atomic::AtomicUsize>)
{
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let unanswered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (seen, dropped) = (heads.clone(), unanswered.clone());
    let respond = std::sync::Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (seen, dropped, respond) = (seen.clone(), dropped.clone(), respond.clone());
            tokio::spawn(async move {
                let Some(head) = read_request(&mut tcp).await else { return };
                let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                seen.lock().unwrap().push(head);
                let _ = tcp.write_all(respond(&path).as_bytes()).await;
                if cross && read_request(&mut tcp).await.is_some() {
                    dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = tcp.shutdown().await;
            });
        }
    });
    (addr, heads, unanswered)
}

fn json_response(extra_header: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra_header}content-length: {}\r\n\r\n{ANSWER}",
        ANSWER.len()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_upstream_closed_is_not_used_again() {
    // Closed without a word, or after saying `connection: close`.
    for response in [json_response(""), json_response("connection: close\r\n")] {
        let (addr, heads) = one_shot_upstream(response.clone()).await;
        let sidecar =
            Sidecar::start(&route_yaml("chat", "", &[&format!("{{name: t, baseUrl: \"http://{addr}/v1\"}}")]));
        for i in 0..4 {
            let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat"}"#).await;
            assert_eq!(reply.status, 200, "request {i} ({response:?}): {}", reply.body);
            assert_eq!(reply.header("x-sideyard-attempts"), "1", "no fallback was needed");
        }
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 4, "each request reached the upstream once");
        for head in heads {
            let lower = head.to_ascii_lowercase();
            assert!(head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"), "origin-form request line: {head}");
            assert!(lower.contains(&format!("\r\nhost: {addr}\r\n")), "Host header: {head}");
            assert!(lower.contains("\r\ncontent-length: 16\r\n"), "the body's length: {head}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_that_crosses_the_next_request_costs_the_caller_nothing() {
    let (addr, heads, unanswered) = closing_upstream(|_| json_response(""), true).await;
    let sidecar = Sidecar::start(&route_yaml("chat", "", &[&format!("{{name: t, baseUrl: \"http://{addr}/v1\"}}")]));
    for i in 0..4 {
        let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat"}"#).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-attempts"), "1", "retried on a new connection, not a fallback");
    }
    assert_eq!(heads.lock().unwrap().len(), 4, "each request answered once");
    assert_eq!(unanswered.load(std::sync::atomic::Ordering::SeqCst), 3, "requests 2 to 4 met a closing connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fallback_after_a_429_survives_the_upstream_closing_the_connection() {
    // Both targets on one origin: the 429's connection goes back to the pool, and the upstream
    // closes it as the fallback attempt goes out on it.
    let (addr, heads, unanswered) = closing_upstream(
        |path| {
            if path.starts_with("/limited") {
                let body = r#"{"error":{"message":"slow down"}}"#;
                format!("HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
            } else {
                json_response("")
            }
        },
        true,
    )
    .await;
    let targets = [
        format!("{{name: a, baseUrl: \"http://{addr}/limited\"}}"),
        format!("{{name: b, baseUrl: \"http://{addr}/ok\"}}"),
    ];
    let sidecar = Sidecar::start(&route_yaml("chat", "", &[&targets[0], &targets[1]]));
    for stream in [false, true] {
        let body = format!(r#"{{"model":"chat","stream":{stream}}}"#);
        let reply = post(sidecar.api, "/v1/chat/completions", &body).await;
        assert_eq!(reply.status, 200, "stream {stream}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-target"), "b");
        assert_eq!(reply.header("x-sideyard-attempts"), "2");
        assert_eq!(reply.header("x-sideyard-fallback-reason"), "429");
    }
    assert_eq!(heads.lock().unwrap().len(), 4);
    assert!(unanswered.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the close crossed a request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_ends_with_the_connection_arrives_whole() {
    let response = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{ANSWER}");
    let (addr, _) = one_shot_upstream(response).await;
    let sidecar = Sidecar::start(&route_yaml("chat", "", &[&format!("{{name: t, baseUrl: \"http://{addr}/v1\"}}")]));
    for _ in 0..2 {
        let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat"}"#).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["choices"][0]["message"]["content"], "hi");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_does_not_speak_http_is_a_proxy_error() {
    for (response, detail) in [
        ("SSH-2.0-OpenSSH_9.6\r\n\r\n", "invalid HTTP response"),
        ("HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-length: 13\r\n\r\n", "conflicting Content-Length"),
        ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nnot-hex\r\n", "invalid chunk size"),
    ] {
        let (addr, _) = one_shot_upstream(response.to_string()).await;
        let sidecar =
            Sidecar::start(&route_yaml("chat", "", &[&format!("{{name: t, baseUrl: \"http://{addr}/v1\"}}")]));
        let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat"}"#).await;
        assert_eq!(reply.status, 502, "{response:?}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-error-source"), "proxy", "{:?}", reply.headers);
        assert!(reply.body.contains(detail), "{response:?}: {}", reply.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_event_cut_off_inside_a_string_is_passed_on_not_a_crash() {
    // A lone backslash at the end of an event's JSON: the bill's scanner must stop at the end.
    let events = "data: {\"choices\":[{\"delta\":{\"content\":\"abc\\\n\ndata: [DONE]\n\n";
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{events}",
        events.len()
    );
    let (addr, _) = one_shot_upstream(response).await;
    let sidecar = Sidecar::start(&route_yaml("chat", "", &[&format!("{{name: t, baseUrl: \"http://{addr}/v1\"}}")]));
    for _ in 0..2 {
        let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat","stream":true}"#).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body.starts_with("data: {\"choices\":[{\"delta\":{\"content\":\"abc\\\n\n"), "{:?}", reply.body);
        assert!(reply.body.ends_with("data: [DONE]\n\n"), "{:?}", reply.body);
    }
}
