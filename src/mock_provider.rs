//! A fake OpenAI-compatible provider for tests, demos and load tests.
//!
//! The same generator serves `switchyard mock-provider` over HTTP and targets with `api: mock`
//! inside the sidecar, so the quickstart runs offline with no keys. Knobs inject latency, failures,
//! hangs and broken streams.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Frame;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::api::units::MICROS_PER_UNIT;
use crate::config::{MockOptions, UsageChunk};
use crate::providers::{BYTES_PER_TOKEN, Usage};

/// Counters that tests and `GET /mock/stats` read.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
}

/// The part of a chat completion request the mock looks at.
#[derive(Deserialize)]
struct MockRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

const WORDS: [&str; 8] = ["Hello", "from", "the", "Switchyard", "mock", "provider,", "all", "good."];

/// Answers one chat completion request; used by the HTTP server and by in-process mock targets.
pub async fn chat_completion(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, body: &[u8]) -> Response {
    let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }
    if options.hang {
        std::future::pending::<()>().await;
    }
    if let Some(key) = &options.require_key {
        let expected = format!("Bearer {}", key.expose());
        if headers.get(header::AUTHORIZATION).is_none_or(|v| v.as_bytes() != expected.as_bytes()) {
            return error(StatusCode::UNAUTHORIZED, "invalid_api_key", "Incorrect API key provided.");
        }
    }
    if options.fail_rate > 0 && random_ppm(n) < options.fail_rate {
        let status = StatusCode::from_u16(options.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = error(status, "mock_failure", "Injected failure from the mock provider.");
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return response;
    }
    let request: MockRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", &format!("Invalid JSON body: {e}")),
    };
    let words = request.max_completion_tokens.or(request.max_tokens).map_or(options.chunks, |m| m.min(options.chunks));
    let usage =
        Usage { prompt: (body.len() as u64 / BYTES_PER_TOKEN).max(1), completion: u64::from(words), cached_prompt: 0 };
    let id = format!("chatcmpl-mock-{n}");
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());

    if !request.stream {
        if options.reset_after.is_some() {
            return broken_body();
        }
        let content: Vec<&str> = (0..words as usize).map(|i| WORDS[i % WORDS.len()]).collect();
        let body = serde_json::json!({
            "id": id, "object": "chat.completion", "created": created, "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content.join(" ")}, "finish_reason": "stop"}],
            "usage": usage_json(&usage),
        });
        return ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    }

    let include_usage = match options.usage {
        UsageChunk::Always => true,
        UsageChunk::Never => false,
        UsageChunk::Requested => request.stream_options.is_some_and(|o| o.include_usage),
    };
    let (tx, body) = channel_body();
    let options = options.clone();
    tokio::spawn(async move {
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            sse(&serde_json::json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": request.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }))
        };
        if tx.send(Ok(chunk(serde_json::json!({"role": "assistant", "content": ""}), None))).await.is_err() {
            return;
        }
        for i in 0..words {
            if options.reset_after == Some(i) {
                let _ = tx.send(Err(reset())).await;
                return;
            }
            if options.stall_after == Some(i) {
                // Hold the connection open until the client gives up.
                tx.closed().await;
                return;
            }
            tokio::time::sleep(options.chunk_interval).await;
            let word = WORDS[i as usize % WORDS.len()];
            let text = if i == 0 { word.to_string() } else { format!(" {word}") };
            if tx.send(Ok(chunk(serde_json::json!({"content": text}), None))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(chunk(serde_json::json!({}), Some("stop")))).await;
        if include_usage {
            let usage_chunk = serde_json::json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": request.model,
                "choices": [], "usage": usage_json(&usage),
            });
            let _ = tx.send(Ok(sse(&usage_chunk))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Usage in OpenAI's shape.
fn usage_json(usage: &Usage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.total(),
    })
}

fn sse(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": "mock_error", "code": code}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Headers, then a body that fails: the connection breaks before the answer.
fn broken_body() -> Response {
    let (tx, body) = channel_body();
    let _ = tx.try_send(Err(reset()));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn reset() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "mock provider broke the connection")
}

/// A well-mixed value in 0..1_000_000 from a request number (splitmix64); good enough to inject
/// failures at a rate, and deterministic for a given sequence of requests.
fn random_ppm(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z % MICROS_PER_UNIT
}

#[derive(Clone)]
struct MockState {
    options: Arc<MockOptions>,
    stats: Arc<MockStats>,
}

/// The HTTP API of `switchyard mock-provider`.
pub fn router(options: Arc<MockOptions>, stats: Arc<MockStats>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handle_chat))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(handle_stats))
        .with_state(MockState { options, stats })
}

async fn handle_chat(State(state): State<MockState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_body", "Could not read the request body."),
    };
    chat_completion(&state.options, &state.stats, &parts.headers, &body).await
}

async fn models() -> impl IntoResponse {
    let body = serde_json::json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "switchyard"}]});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string())
}

async fn handle_stats(State(state): State<MockState>) -> impl IntoResponse {
    let body = serde_json::json!({"requests": state.stats.requests.load(Ordering::Relaxed)});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string())
}

/// Serves the mock provider on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: MockOptions,
    stats: Arc<MockStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Arc::new(options), stats);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// A response body fed by a task; the task sees the client leave when `closed()` resolves.
struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

fn channel_body() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, Body) {
    let (tx, rx) = mpsc::channel(2);
    (tx, Body::new(ChannelBody(rx)))
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|item| item.map(|r| r.map(Frame::data)))
    }
}
