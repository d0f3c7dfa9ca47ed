//! Calls the sidecar does not serve itself (files, audio, images, moderations, ...) pass through
//! to the target their `model` names, or to the namespace's pass-through default route: the
//! caller's method, path, query, headers and body, with the target's credential instead of the
//! caller's key and the target's model, streamed both ways.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use bytes::Bytes;
use common::*;
use http::header;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Semaphore, mpsc};

const PROVIDER_KEY: &str = "sk-provider-secret-1234";
const CALLER_KEY: &str = "sk-caller-5678";

fn config(up: &ScriptedUpstream, streaming: SocketAddr) -> String {
    let api = format!("{}/v1", up.url("provider-api"));
    let creds = "credentials: {env: PROVIDER_KEY}";
    [
        route_yaml(
            "dall-e",
            "aliases: [whisper]",
            &[&format!("{{name: provider, model: provider-model-1, baseUrl: '{api}', {creds}}}")],
        ),
        route_yaml(
            "files",
            "passthroughDefault: true",
            &[&format!("{{name: files-provider, baseUrl: '{api}', {creds}}}")],
        ),
        route_yaml(
            "moderation",
            "",
            &[
                &format!("{{name: down, baseUrl: '{}/v1'}}", up.url("status-503")),
                &format!("{{name: provider, baseUrl: '{api}', {creds}}}"),
            ],
        ),
        route_yaml("rejected", "", &[&format!("{{name: strict, baseUrl: '{}'}}", up.url("status-401"))]),
        route_yaml("failing", "", &[&format!("{{name: failing, baseUrl: '{}/v1'}}", up.url("status-500"))]),
        route_yaml("streaming", "", &[&format!("{{name: streamer, baseUrl: 'http://{streaming}/v1'}}")]),
    ]
    .concat()
}

async fn start() -> (ScriptedUpstream, StreamingUpstream, Sidecar) {
    let up = ScriptedUpstream::start().await;
    let streaming = StreamingUpstream::start().await;
    let sidecar = Sidecar::start_with(&config(&up, streaming.addr), &[], &[("PROVIDER_KEY", PROVIDER_KEY)]);
    (up, streaming, sidecar)
}

fn caller_headers() -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {CALLER_KEY}")),
        ("x-api-key", CALLER_KEY.to_string()),
        ("openai-organization", "org-caller".to_string()),
        ("openai-beta", "assistants=v2".to_string()),
    ]
}

async fn call(api: SocketAddr, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
    let mut request = http::Request::builder().method(method).uri(format!("http://{api}{path}"));
    if !content_type.is_empty() {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    for (name, value) in caller_headers() {
        request = request.header(name, value);
    }
    let request = request.body(http_body_util::Full::new(Bytes::from(body))).unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(PATIENCE, client.request(request)).await.expect("in time").expect("sent");
    read(response).await
}

fn form(model: &str, file: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"hello.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(b"\r\n--b0undary--\r\n");
    body
}

const FORM: &str = "multipart/form-data; boundary=b0undary";

/// Whatever the caller sent, the upstream saw the target's credential and none of the caller's keys
/// or the account scope that goes with them.
fn assert_credentials(recorded: &Recorded) {
    assert_eq!(recorded.headers["authorization"], format!("Bearer {PROVIDER_KEY}"));
    assert!(recorded.headers.get("x-api-key").is_none());
    assert!(recorded.headers.get("openai-organization").is_none());
    assert_eq!(recorded.headers["openai-beta"], "assistants=v2", "other caller headers go on");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_go_to_the_target_their_model_names_with_its_credential_and_model() {
    let (up, _streaming, sidecar) = start().await;

    // JSON: the model is rewritten to the target's, every other byte stays.
    let body = br#"{"model": "dall-e", "prompt": "a lighthouse", "size": "1024x1024"}"#.to_vec();
    let reply = call(sidecar.api, "POST", "/v1/images/generations?trace=1", "application/json", body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "provider");
    assert_eq!(reply.json()["path"], "/v1/images/generations");
    assert_eq!(reply.json()["query"], "trace=1");
    let recorded = up.recorded("provider-api").pop().unwrap();
    assert_eq!(recorded.method, "POST");
    assert_eq!(&recorded.body[..], br#"{"model": "provider-model-1", "prompt": "a lighthouse", "size": "1024x1024"}"#);
    assert_credentials(&recorded);

    // An upload: the form's model field is rewritten, the file arrives intact, lengths agree.
    let audio: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let reply = call(sidecar.api, "POST", "/v1/audio/transcriptions", FORM, form("whisper", &audio)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let expected = form("provider-model-1", &audio);
    assert_eq!(reply.json()["text"], format!("provider-model-1 heard {} bytes", expected.len()));
    let recorded = up.recorded("provider-api").pop().unwrap();
    assert_eq!(recorded.path, "/provider-api/v1/audio/transcriptions");
    assert!(recorded.body == expected, "the form as sent, but for the model");
    assert_eq!(recorded.headers["content-length"], expected.len().to_string());
    assert_eq!(recorded.headers["content-type"], FORM);
    assert_credentials(&recorded);

    // A model no route serves.
    let reply =
        call(sidecar.api, "POST", "/v1/images/generations", "application/json", br#"{"model": "midjourney"}"#.to_vec())
            .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "model_not_found");
    let reply = call(sidecar.api, "POST", "/v1/images/generations", "application/json", b"{not json".to_vec()).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "invalid_json");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_model_go_to_the_pass_through_default() {
    let (up, _streaming, sidecar) = start().await;
    for (method, path, query) in [
        ("GET", "/v1/files", Some("purpose=batch&limit=2")),
        ("DELETE", "/v1/files/file-abc", None),
        ("GET", "/v1/batches/batch_1", None),
    ] {
        let uri = query.map_or(path.to_string(), |q| format!("{path}?{q}"));
        let reply = call(sidecar.api, method, &uri, "", Vec::new()).await;
        assert_eq!(reply.status, 200, "{method} {uri}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-target"), "files-provider");
        let recorded = up.recorded("provider-api").pop().unwrap();
        assert_eq!(
            (recorded.method.as_str(), recorded.path.as_str()),
            (method, format!("/provider-api{path}").as_str())
        );
        assert_eq!(recorded.query.as_deref(), query);
        assert_credentials(&recorded);
    }
    // A JSON body without a model, and an upload whose form has none.
    let batch = br#"{"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}"#;
    let reply = call(sidecar.api, "POST", "/v1/batches", "application/json", batch.to_vec()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(&up.recorded("provider-api").pop().unwrap().body[..], batch);
    let upload = b"--b0undary\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\r\n{}\n\r\n--b0undary--\r\n";
    let reply = call(sidecar.api, "POST", "/v1/files", FORM, upload.to_vec()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["id"], "file-abc");
    assert_eq!(&up.recorded("provider-api").pop().unwrap().body[..], upload);

    // The Realtime API is WebSocket sessions, which Sideyard does not serve; it says so.
    let reply = call(sidecar.api, "GET", "/v1/realtime?model=gpt-realtime", "", Vec::new()).await;
    assert_eq!(reply.status, 501);
    assert_eq!(reply.json()["error"]["code"], "unsupported_endpoint");
    // Five calls passed through; the Realtime one was not.
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_api_calls_total{api="passthrough"}"#), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_call_falls_back_and_an_upload_does_not() {
    let (up, _streaming, sidecar) = start().await;
    let reply = call(
        sidecar.api,
        "POST",
        "/v1/moderations",
        "application/json",
        br#"{"model": "moderation", "input": "hi"}"#.to_vec(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "provider");
    assert_eq!(reply.header("x-sideyard-attempts"), "2");
    assert_eq!(reply.header("x-sideyard-fallback-reason"), "5xx");
    assert_eq!(up.hits("status-503"), 1);

    // An upload's body streams to its first target once: that target's answer is the answer.
    let reply = call(sidecar.api, "POST", "/v1/audio/translations", FORM, form("moderation", b"RIFF")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-sideyard-target"), "down");
    assert_eq!(reply.header("x-sideyard-error-source"), "upstream");
    assert_eq!(reply.json()["error"]["message"], "upstream says 503");
    assert_eq!(up.hits("status-503"), 2);

    // A route whose every target is ejected still tries the one that recovers soonest, as chat does.
    for _ in 0..4 {
        let reply =
            call(sidecar.api, "POST", "/v1/moderations", "application/json", br#"{"model": "failing"}"#.to_vec()).await;
        assert_eq!(reply.status, 502, "{}", reply.body);
    }
    assert_eq!(up.hits("status-500"), 4, "the fourth call reached the ejected target too");

    // A provider refusing the sidecar's own credentials is not the caller's error to see.
    let reply =
        call(sidecar.api, "POST", "/v1/moderations", "application/json", br#"{"model": "rejected"}"#.to_vec()).await;
    assert_eq!(reply.status, 502);
    assert!(
        reply.json()["error"]["message"].as_str().unwrap().contains("rejected the configured credentials (401)"),
        "{}",
        reply.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_both_ways_without_buffering() {
    let (_up, streaming, sidecar) = start().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Channel<Bytes, std::io::Error>>();

    // Upload: the upstream has the first part of the file before the caller sends the rest.
    let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
    let request = http::Request::post(format!("http://{}/v1/uploads/upload_1/parts", sidecar.api))
        .header(header::CONTENT_TYPE, FORM)
        .body(body)
        .unwrap();
    let sending = tokio::spawn(client.request(request));
    let head = form("streaming", b"");
    let (head, tail) = head.split_at(head.len() - b"\r\n--b0undary--\r\n".len());
    tx.send_data(Bytes::copy_from_slice(head)).await.unwrap();
    tx.send_data(Bytes::from_static(b"first part,")).await.unwrap();
    let mut received = streaming.received.lock().unwrap().take().unwrap();
    let first = tokio::time::timeout(PATIENCE, async {
        loop {
            let so_far = received.recv().await.unwrap();
            if so_far.ends_with("first part,") {
                break so_far;
            }
        }
    })
    .await
    .expect("the upstream got the first part");
    assert!(first.ends_with("first part,"), "{first}");
    assert!(first.contains("name=\"model\"\r\n\r\nstreaming\r\n"), "the model named its route: {first}");
    tx.send_data(Bytes::from_static(b" second part")).await.unwrap();
    tx.send_data(Bytes::copy_from_slice(tail)).await.unwrap();
    drop(tx);
    let response = tokio::time::timeout(PATIENCE, sending).await.expect("answer in time").unwrap().unwrap();
    let reply = read(response).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.ends_with("first part, second part\r\n--b0undary--\r\n"), "{}", reply.body);

    // Download: the caller reads the first part before the upstream sends the rest.
    let body = br#"{"model": "streaming"}"#;
    let response = send(sidecar.api, "POST", "/v1/containers/files/download", std::str::from_utf8(body).unwrap()).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    assert_eq!(next_chunk(&mut body).await.unwrap(), "first half;");
    streaming.gate.add_permits(1);
    assert_eq!(rest(&mut body).await, "second half");
}

/// An upstream that reports each piece of an upload as it arrives, and sends a download in two
/// halves with a gate between them.
struct StreamingUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Option<mpsc::UnboundedReceiver<String>>>>,
    gate: Arc<Semaphore>,
}

impl StreamingUpstream {
    async fn start() -> StreamingUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (report, received) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let app = {
            let gate = gate.clone();
            axum::Router::new().fallback(move |request: Request| {
                let (report, gate) = (report.clone(), gate.clone());
                async move {
                    if request.uri().path().ends_with("/download") {
                        let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
                        tokio::spawn(async move {
                            let _ = tx.send_data(Bytes::from_static(b"first half;")).await;
                            gate.acquire().await.unwrap().forget();
                            let _ = tx.send_data(Bytes::from_static(b"second half")).await;
                        });
                        return Body::new(body).into_response();
                    }
                    let mut body = request.into_body();
                    let mut all = Vec::new();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Ok(data) = frame.into_data() {
                            all.extend_from_slice(&data);
                            let _ = report.send(String::from_utf8_lossy(&all).into_owned());
                        }
                    }
                    String::from_utf8_lossy(&all).into_owned().into_response()
                }
            })
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        StreamingUpstream { addr, received: Arc::new(Mutex::new(Some(received))), gate }
    }
}
