//! A fake provider for tests, demos and load tests, speaking OpenAI's Chat Completions
//! (`/v1/chat/completions`) and Anthropic's Messages (`/v1/messages`).
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
use crate::config::{Format, MockOptions, UsageChunk};
use crate::providers::anthropic::error_type;
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

/// What every request goes through first, in either format: latency, hangs, the key, injected
/// failures. `Ok` with the request's number, or the response that ends it.
async fn admit(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, format: Format) -> Result<u64, Response> {
    let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }
    if options.hang {
        std::future::pending::<()>().await;
    }
    if let Some(key) = &options.require_key {
        let sent = match format {
            Format::OpenAi => headers.get(header::AUTHORIZATION).map(|v| v.as_bytes().strip_prefix(b"Bearer ")),
            Format::Anthropic => headers.get("x-api-key").map(|v| Some(v.as_bytes())),
        };
        if sent.flatten() != Some(key.expose().as_bytes()) {
            return Err(error(format, StatusCode::UNAUTHORIZED, "invalid_api_key", "Incorrect API key provided."));
        }
    }
    if options.fail_rate > 0 && random_ppm(n) < options.fail_rate {
        let status = StatusCode::from_u16(options.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = error(format, status, "mock_failure", "Injected failure from the mock provider.");
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return Err(response);
    }
    Ok(n)
}

/// Sends the words of a streamed answer, an event each (`word_event`), until a knob cuts the
/// stream: a reset, a stall, or the provider's own `error_event`. `Err` when the stream ended
/// early, by a knob or because the client left.
async fn send_words(
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    options: &MockOptions,
    words: u32,
    word_event: impl Fn(u32) -> Bytes,
    error_event: Bytes,
) -> Result<(), ()> {
    for i in 0..words {
        if options.reset_after == Some(i) {
            let _ = tx.send(Err(reset())).await;
            return Err(());
        }
        if options.stall_after == Some(i) {
            // Hold the connection open until the client gives up.
            tx.closed().await;
            return Err(());
        }
        if options.error_after == Some(i) {
            let _ = tx.send(Ok(error_event)).await;
            return Err(());
        }
        tokio::time::sleep(options.chunk_interval).await;
        tx.send(Ok(word_event(i))).await.map_err(|_| ())?;
    }
    Ok(())
}

fn word(i: u32) -> String {
    let word = WORDS[i as usize % WORDS.len()];
    if i == 0 { word.to_string() } else { format!(" {word}") }
}

fn text(words: u32) -> String {
    (0..words).map(word).collect()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Answers one chat completion request; used by the HTTP server and by in-process mock targets.
pub async fn chat_completion(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, body: &[u8]) -> Response {
    let n = match admit(options, stats, headers, Format::OpenAi).await {
        Ok(n) => n,
        Err(response) => return response,
    };
    let request: MockRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(Format::OpenAi, StatusCode::BAD_REQUEST, "invalid_json", &format!("Invalid JSON body: {e}"));
        }
    };
    let words = request.max_completion_tokens.or(request.max_tokens).map_or(options.chunks, |m| m.min(options.chunks));
    let usage = Usage {
        prompt: (body.len() as u64 / BYTES_PER_TOKEN).max(1),
        completion: u64::from(words),
        ..Usage::default()
    };
    let id = format!("chatcmpl-mock-{n}");
    let created = unix_now();

    if !request.stream {
        if options.reset_after.is_some() {
            return broken_body();
        }
        let body = serde_json::json!({
            "id": id, "object": "chat.completion", "created": created, "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text(words)}, "finish_reason": "stop"}],
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
        let error = serde_json::json!({"error": {"message": "Injected stream error from the mock provider.", "type": "server_error", "code": "mock_failure"}});
        let word_chunk = |i| chunk(serde_json::json!({"content": word(i)}), None);
        if send_words(&tx, &options, words, word_chunk, sse(&error)).await.is_err() {
            return;
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
    event_stream(body)
}

/// The part of a Messages request the mock looks at.
#[derive(Deserialize)]
struct MockMessagesRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: bool,
    max_tokens: u32,
}

/// Answers one Messages request (`POST /v1/messages`), as Anthropic does: the same words, knobs
/// and failures as [`chat_completion`], in Anthropic's shapes and event stream.
pub async fn messages(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, body: &[u8]) -> Response {
    let n = match admit(options, stats, headers, Format::Anthropic).await {
        Ok(n) => n,
        Err(response) => return response,
    };
    let request: MockMessagesRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(Format::Anthropic, StatusCode::BAD_REQUEST, "invalid_request", &format!("{e}")),
    };
    let words = request.max_tokens.min(options.chunks);
    let stop_reason = if words < options.chunks { "max_tokens" } else { "end_turn" };
    let input_tokens = (body.len() as u64 / BYTES_PER_TOKEN).max(1);
    let id = format!("msg_mock_{n}");
    let usage = move |output: u32| {
        serde_json::json!({"input_tokens": input_tokens, "output_tokens": output,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    };

    if !request.stream {
        if options.reset_after.is_some() {
            return broken_body();
        }
        let body = serde_json::json!({
            "id": id, "type": "message", "role": "assistant", "model": request.model,
            "content": [{"type": "text", "text": text(words)}],
            "stop_reason": stop_reason, "stop_sequence": null, "usage": usage(words),
        });
        return ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    }

    let (tx, body) = channel_body();
    let options = options.clone();
    tokio::spawn(async move {
        let event = |name: &str, data: serde_json::Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        let start = serde_json::json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": request.model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": usage(1)}});
        let block = serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
        for e in [
            event("message_start", start),
            event("content_block_start", block),
            event("ping", serde_json::json!({"type": "ping"})),
        ] {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        let error =
            serde_json::json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        let word_event = |i| {
            let delta = serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word(i)}});
            event("content_block_delta", delta)
        };
        if send_words(&tx, &options, words, word_event, event("error", error)).await.is_err() {
            return;
        }
        let end = [
            event("content_block_stop", serde_json::json!({"type": "content_block_stop", "index": 0})),
            event(
                "message_delta",
                serde_json::json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                    "usage": {"output_tokens": words}}),
            ),
            event("message_stop", serde_json::json!({"type": "message_stop"})),
        ];
        for e in end {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
    });
    event_stream(body)
}

/// Answers `POST /v1/messages/count_tokens`: the request's bytes over four, as a whole count.
pub async fn count_tokens(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, body: &[u8]) -> Response {
    if let Err(response) = admit(options, stats, headers, Format::Anthropic).await {
        return response;
    }
    if serde_json::from_slice::<serde_json::Value>(body).is_err() {
        return error(Format::Anthropic, StatusCode::BAD_REQUEST, "invalid_request", "The body is not JSON.");
    }
    let body = serde_json::json!({"input_tokens": (body.len() as u64 / BYTES_PER_TOKEN).max(1)});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn event_stream(body: Body) -> Response {
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

/// An error answer in the format's shape; Anthropic's names the kind of error by the status.
fn error(format: Format, status: StatusCode, code: &str, message: &str) -> Response {
    let body = match format {
        Format::OpenAi => serde_json::json!({"error": {"message": message, "type": "mock_error", "code": code}}),
        Format::Anthropic => {
            serde_json::json!({"type": "error", "error": {"type": error_type(status.as_u16()), "message": message}})
        }
    };
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
        .route("/v1/messages", post(handle_messages))
        .route("/v1/messages/count_tokens", post(handle_count_tokens))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(handle_stats))
        .with_state(MockState { options, stats })
}

async fn handle_chat(State(state): State<MockState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match body.collect().await {
        Ok(body) => chat_completion(&state.options, &state.stats, &parts.headers, &body.to_bytes()).await,
        Err(_) => unreadable(Format::OpenAi),
    }
}

async fn handle_messages(State(state): State<MockState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match body.collect().await {
        Ok(body) => messages(&state.options, &state.stats, &parts.headers, &body.to_bytes()).await,
        Err(_) => unreadable(Format::Anthropic),
    }
}

async fn handle_count_tokens(State(state): State<MockState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match body.collect().await {
        Ok(body) => count_tokens(&state.options, &state.stats, &parts.headers, &body.to_bytes()).await,
        Err(_) => unreadable(Format::Anthropic),
    }
}

fn unreadable(format: Format) -> Response {
    error(format, StatusCode::BAD_REQUEST, "invalid_body", "Could not read the request body.")
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
