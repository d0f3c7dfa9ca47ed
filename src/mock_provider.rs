//! A fake provider for tests, demos and load tests, speaking OpenAI's Chat Completions
//! (`/v1/chat/completions`), Responses (`/v1/responses`), legacy completions and embeddings, and
//! Anthropic's Messages (`/v1/messages`).
//!
//! The same generator serves `sideyard mock-provider` over HTTP and targets with `api: mock`
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
use crate::providers::responses::{self as translation, ResponseStream};
use crate::providers::{BYTES_PER_TOKEN, StreamEnd, Usage, sse};

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

const WORDS: [&str; 8] = ["Hello", "from", "the", "Sideyard", "mock", "provider,", "all", "good."];

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
    generate(options, stats, headers, body, Shape::Chat).await
}

/// Answers one legacy completions request (`POST /v1/completions`): the same words and knobs as
/// [`chat_completion`], as `choices[].text`.
pub async fn completion(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, body: &[u8]) -> Response {
    generate(options, stats, headers, body, Shape::Text).await
}

/// The two OpenAI shapes of generated text.
#[derive(Clone, Copy)]
enum Shape {
    /// Chat completions: `message` and `delta` objects.
    Chat,
    /// Legacy completions: `text`.
    Text,
}

impl Shape {
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Shape::Chat => ("chatcmpl-mock", "chat.completion", "chat.completion.chunk"),
            Shape::Text => ("cmpl-mock", "text_completion", "text_completion"),
        }
    }

    /// A choice of a whole answer.
    fn choice(self, text: String, finish: &str) -> serde_json::Value {
        match self {
            Shape::Chat => {
                serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
            }
            Shape::Text => serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        }
    }

    /// A choice of a stream's chunk: some text, or none with the finish reason.
    fn chunk_choice(self, text: Option<String>, finish: Option<&str>) -> serde_json::Value {
        match self {
            Shape::Chat => {
                let delta = text.map_or_else(|| serde_json::json!({}), |t| serde_json::json!({"content": t}));
                serde_json::json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Shape::Text => {
                serde_json::json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

async fn generate(
    options: &MockOptions,
    stats: &MockStats,
    headers: &HeaderMap,
    body: &[u8],
    shape: Shape,
) -> Response {
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
    // Cut short by the request's cap, as providers say it.
    let finish = if words < options.chunks { "length" } else { "stop" };
    let usage = Usage {
        prompt: (body.len() as u64 / BYTES_PER_TOKEN).max(1),
        completion: u64::from(words),
        ..Usage::default()
    };
    let (id_prefix, object, chunk_object) = shape.names();
    let id = format!("{id_prefix}-{n}");
    let created = unix_now();

    if !request.stream {
        if options.reset_after.is_some() {
            return broken_body();
        }
        let body = serde_json::json!({
            "id": id, "object": object, "created": created, "model": request.model,
            "choices": [shape.choice(text(words), finish)],
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
        let chunk = |choice: serde_json::Value| {
            sse(&serde_json::json!({
                "id": id, "object": chunk_object, "created": created, "model": request.model,
                "choices": [choice],
            }))
        };
        if let Shape::Chat = shape {
            let role =
                serde_json::json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null});
            if tx.send(Ok(chunk(role))).await.is_err() {
                return;
            }
        }
        let error = serde_json::json!({"error": {"message": "Injected stream error from the mock provider.", "type": "server_error", "code": "mock_failure"}});
        let word_chunk = |i| chunk(shape.chunk_choice(Some(word(i)), None));
        if send_words(&tx, &options, words, word_chunk, sse(&error)).await.is_err() {
            return;
        }
        let _ = tx.send(Ok(chunk(shape.chunk_choice(None, Some(finish))))).await;
        if include_usage {
            let usage_chunk = serde_json::json!({
                "id": id, "object": chunk_object, "created": created, "model": request.model,
                "choices": [], "usage": usage_json(&usage),
            });
            let _ = tx.send(Ok(sse(&usage_chunk))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    event_stream(body)
}

/// Answers one Responses request (`POST /v1/responses`) natively: the request is read as the
/// sidecar's translation reads it, answered like a chat completion (same words, knobs and
/// failures), and the answer or stream written in the Responses shapes and events; an injected
/// stream error becomes `response.failed`.
pub async fn responses(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, body: &[u8]) -> Response {
    #[derive(Deserialize)]
    struct ModelOnly {
        #[serde(default)]
        model: String,
    }
    let model = serde_json::from_slice::<ModelOnly>(body).map(|m| m.model).unwrap_or_default();
    let chat = match translation::chat_request(body, &model) {
        Ok(chat) => chat,
        Err(e) => {
            let message = if e.field.is_empty() { e.message } else { format!("{}: {}", e.field, e.message) };
            return error(Format::OpenAi, StatusCode::BAD_REQUEST, "invalid_request", &message);
        }
    };
    let answer = generate(options, stats, headers, &chat, Shape::Chat).await;
    let created = unix_now();
    let streamed =
        answer.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !answer.status().is_success() {
        return answer;
    }
    let body = answer.into_body();
    if !streamed {
        let Ok(chat) = body.collect().await.map(|b| b.to_bytes()) else { return broken_body() };
        return match translation::response_answer(&chat, &model, created) {
            Ok(response) => ([(header::CONTENT_TYPE, "application/json")], response).into_response(),
            Err(e) => error(Format::OpenAi, StatusCode::INTERNAL_SERVER_ERROR, "mock_failure", &e.message),
        };
    }
    let (tx, out) = channel_body();
    tokio::spawn(async move {
        let mut body = body;
        let mut framer = sse::Framer::default();
        let mut stream = ResponseStream::new(&model, created);
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(_) => {
                    let _ = tx.send(Err(reset())).await;
                    return;
                }
            };
            let Some(events) = framer.push(data) else { continue };
            for range in sse::events(&events) {
                let mut translated = Vec::new();
                let end = stream.event(&events[range], &mut translated);
                if tx.send(Ok(Bytes::from(translated))).await.is_err() {
                    return;
                }
                match end {
                    StreamEnd::Open => {}
                    StreamEnd::Done => return,
                    StreamEnd::Error { message, .. } => {
                        let _ = tx.send(Ok(translation::failed_event("server_error", &message, &model))).await;
                        return;
                    }
                }
            }
        }
    });
    event_stream(out)
}

/// The part of an embeddings request the mock looks at.
#[derive(Deserialize)]
struct MockEmbeddingsRequest {
    #[serde(default)]
    model: String,
    input: EmbeddingsInput,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u16>,
}

/// `input` in each of the shapes OpenAI accepts.
#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingsInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Answers one embeddings request (`POST /v1/embeddings`): a vector per input, the same for the
/// same input, of `dimensions` values (8 by default); `encoding_format: base64` packs them as
/// little-endian `f32`, as OpenAI does (the OpenAI SDKs ask for it by default).
pub async fn embeddings(options: &MockOptions, stats: &MockStats, headers: &HeaderMap, body: &[u8]) -> Response {
    if let Err(response) = admit(options, stats, headers, Format::OpenAi).await {
        return response;
    }
    let request: MockEmbeddingsRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                Format::OpenAi,
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &format!("Invalid embeddings request: {e}"),
            );
        }
    };
    // Each input as bytes to hash, and its tokens.
    let text = |t: String| {
        let tokens = (t.len() as u64).div_ceil(BYTES_PER_TOKEN).max(1);
        (t.into_bytes(), tokens)
    };
    let ids = |ids: &[u32]| (ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>(), ids.len() as u64);
    let inputs: Vec<(Vec<u8>, u64)> = match request.input {
        EmbeddingsInput::Text(t) => vec![text(t)],
        EmbeddingsInput::Texts(ts) => ts.into_iter().map(text).collect(),
        EmbeddingsInput::Tokens(list) => vec![ids(&list)],
        EmbeddingsInput::TokenLists(lists) => lists.iter().map(|list| ids(list)).collect(),
    };
    let dimensions = request.dimensions.unwrap_or(8).clamp(1, 4096);
    let base64 = request.encoding_format.as_deref() == Some("base64");
    let data: Vec<serde_json::Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, (input, _))| {
            let vector = embedding(input, dimensions);
            let embedding = if base64 {
                serde_json::Value::from(base64_encode(
                    &vector.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                ))
            } else {
                serde_json::Value::from(vector)
            };
            serde_json::json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|(_, n)| n).sum();
    let body = serde_json::json!({
        "object": "list", "data": data, "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// A unit-length vector of `dimensions` values drawn from the input's bytes.
fn embedding(input: &[u8], dimensions: u16) -> Vec<f32> {
    let seed = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let values: Vec<f32> =
        (0..u64::from(dimensions)).map(|i| (random_ppm(seed ^ i) as f32 / 500_000.0) - 1.0).collect();
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
    values.into_iter().map(|v| v / norm).collect()
}

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
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

/// The HTTP API of `sideyard mock-provider`.
pub fn router(options: Arc<MockOptions>, stats: Arc<MockStats>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(|State(s), r| handle(s, r, Endpoint::Chat)))
        .route("/v1/completions", post(|State(s), r| handle(s, r, Endpoint::Completion)))
        .route("/v1/responses", post(|State(s), r| handle(s, r, Endpoint::Responses)))
        .route("/v1/embeddings", post(|State(s), r| handle(s, r, Endpoint::Embeddings)))
        .route("/v1/messages", post(|State(s), r| handle(s, r, Endpoint::Messages)))
        .route("/v1/messages/count_tokens", post(|State(s), r| handle(s, r, Endpoint::CountTokens)))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(handle_stats))
        .with_state(MockState { options, stats })
}

/// The generators the HTTP API serves.
#[derive(Clone, Copy)]
enum Endpoint {
    Chat,
    Completion,
    Responses,
    Embeddings,
    Messages,
    CountTokens,
}

async fn handle(state: MockState, request: Request, endpoint: Endpoint) -> Response {
    let format = match endpoint {
        Endpoint::Messages | Endpoint::CountTokens => Format::Anthropic,
        Endpoint::Chat | Endpoint::Completion | Endpoint::Responses | Endpoint::Embeddings => Format::OpenAi,
    };
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return unreadable(format) };
    let (options, stats, headers) = (&*state.options, &*state.stats, &parts.headers);
    match endpoint {
        Endpoint::Chat => chat_completion(options, stats, headers, &body).await,
        Endpoint::Completion => completion(options, stats, headers, &body).await,
        Endpoint::Responses => responses(options, stats, headers, &body).await,
        Endpoint::Embeddings => embeddings(options, stats, headers, &body).await,
        Endpoint::Messages => messages(options, stats, headers, &body).await,
        Endpoint::CountTokens => count_tokens(options, stats, headers, &body).await,
    }
}

fn unreadable(format: Format) -> Response {
    error(format, StatusCode::BAD_REQUEST, "invalid_body", "Could not read the request body.")
}

async fn models() -> impl IntoResponse {
    let body = serde_json::json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "sideyard"}]});
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
