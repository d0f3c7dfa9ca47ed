//! The request path: parse the few fields routing needs, pick the route, try its targets in order,
//! and return the first answer.
//!
//! Fallback happens only before anything of the answer has been sent to the caller: JSON answers
//! are read whole before they are returned, and a stream is committed once the upstream's success
//! headers arrive.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::timeout_at;

use super::error::{ATTEMPTS, AttemptFailure, ERROR_SOURCE, ProxyError, TARGET};
use super::relay::SseRelay;
use super::state::{RouteRt, Shared, TargetRt};
use super::upstream::{SendError, UpstreamBody, error_chain};
use crate::api::FallbackReason;
use crate::api::units::format_duration;
use crate::providers::openai::{ChatRequest, RequestError, parse_chat_request, upstream_error_message};

/// Caller headers worth passing upstream: identification and tracing, never the caller's key.
const FORWARDED: [header::HeaderName; 4] = [
    header::USER_AGENT,
    header::HeaderName::from_static("traceparent"),
    header::HeaderName::from_static("tracestate"),
    header::HeaderName::from_static("x-request-id"),
];

/// How much of an upstream error body is read, for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let snapshot = shared.snapshot.load_full();
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, shared.limits.max_request_bytes).await {
        Ok(body) => body,
        Err(e) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let error = if too_large {
                ProxyError::PayloadTooLarge { limit: shared.limits.max_request_bytes }
            } else {
                ProxyError::BadRequest {
                    code: "invalid_body",
                    message: format!("Could not read the request body: {e}"),
                }
            };
            return unrouted(&shared, error);
        }
    };
    let chat = match parse_chat_request(&body) {
        Ok(chat) => chat,
        Err(e) => return unrouted(&shared, bad_request(e)),
    };
    let Some(route) = snapshot.route(&chat.model) else {
        let error = ProxyError::UnknownModel { model: chat.model.to_string(), known: snapshot.known_models() };
        return unrouted(&shared, error);
    };

    let mut failures: Vec<AttemptFailure> = Vec::new();
    let max_attempts = route.fallback.max_attempts as usize;
    let attempts = route.targets.len().min(max_attempts);
    for (i, target) in route.targets.iter().take(attempts).enumerate() {
        let failure = match attempt(route, i, &chat, &body, &parts.headers, &shared).await {
            Ok(response) => return finish(response, target, i + 1),
            Err(failure) => failure,
        };
        let falls_back = route.fallback.on.contains(failure.record.kind);
        tracing::debug!(route = %route.id, target = %target.name, reason = failure.record.reason, message = %failure.record.message, falls_back, "attempt failed");
        if !falls_back {
            // The caller gets this failure as it is: an upstream's own error response passes
            // through; a failure without one becomes a proxy error.
            if let Some(response) = failure.passthrough {
                return finish(response, target, i + 1);
            }
            failures.push(failure.record);
            break;
        }
        if i + 1 < attempts {
            target.metrics.fallbacks[failure.record.kind as usize].inc();
        }
        failures.push(failure.record);
    }
    let last = &route.targets[failures.len().saturating_sub(1)];
    let tried = failures.len();
    let error = ProxyError::AttemptsFailed { model: chat.model.to_string(), attempts: failures };
    finish(error.into_response(), last, tried)
}

/// Adds the routing headers and counts the response.
fn finish(mut response: Response, target: &TargetRt, attempts: usize) -> Response {
    target.metrics.requests.inc(response.status().as_u16());
    let headers = response.headers_mut();
    headers.insert(TARGET, target.name_header.clone());
    headers.insert(ATTEMPTS, HeaderValue::from(attempts));
    response
}

fn unrouted(shared: &Shared, error: ProxyError) -> Response {
    shared.metrics.unrouted.inc(error.status().as_u16());
    error.into_response()
}

fn bad_request(e: RequestError) -> ProxyError {
    let (code, message) = match e {
        RequestError::InvalidJson(detail) => ("invalid_json", format!("The request body is not valid JSON: {detail}")),
        RequestError::MissingModel => ("missing_model", "The request body must have a \"model\" field.".into()),
        RequestError::InvalidModel => ("invalid_model", "The \"model\" field must be a string.".into()),
    };
    ProxyError::BadRequest { code, message }
}

/// A failed attempt: what is reported, and the upstream's response if it gave one worth passing on.
struct Failure {
    record: AttemptFailure,
    passthrough: Option<Response>,
}

impl Failure {
    fn new(target: &TargetRt, kind: FallbackReason, status: Option<u16>, message: String) -> Failure {
        Failure {
            record: AttemptFailure { target: target.name.clone(), status, reason: kind.as_str(), message, kind },
            passthrough: None,
        }
    }
}

/// One attempt on `route.targets[index]`.
async fn attempt(
    route: &Arc<RouteRt>,
    index: usize,
    chat: &ChatRequest<'_>,
    body: &Bytes,
    caller_headers: &HeaderMap,
    shared: &Shared,
) -> Result<Response, Failure> {
    let target = &route.targets[index];
    let timeouts = target.timeouts;
    let started = Instant::now();
    let deadline = started + timeouts.total;
    let first_byte_deadline = (started + timeouts.first_byte).min(deadline);

    let mut request = http::Request::new(Full::new(chat.with_model(body, &target.model_json)));
    *request.method_mut() = Method::POST;
    if let super::upstream::Upstream::Http { uri, .. } = &target.upstream {
        *request.uri_mut() = uri.clone();
    }
    let headers = request.headers_mut();
    headers.clone_from(&target.headers);
    for name in &FORWARDED {
        if let Some(value) = caller_headers.get(name) {
            headers.insert(name, value.clone());
        }
    }

    let response = match timeout_at(first_byte_deadline.into(), target.upstream.send(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(SendError::ConnectTimeout)) => {
            let message = format!("connect timeout after {}", format_duration(timeouts.connect));
            return Err(Failure::new(target, FallbackReason::Timeout, None, message));
        }
        Ok(Err(SendError::Connect(detail))) => {
            return Err(Failure::new(target, FallbackReason::Connect, None, format!("connection failed: {detail}")));
        }
        Err(_) => {
            let (which, limit) = if first_byte_deadline < deadline {
                ("firstByte", timeouts.first_byte)
            } else {
                ("total", timeouts.total)
            };
            let message = format!("no response headers within the {which} timeout of {}", format_duration(limit));
            return Err(Failure::new(target, FallbackReason::Timeout, None, message));
        }
    };
    target.metrics.first_byte.observe(started.elapsed());
    let status = response.status();

    if let Some(kind) = (!status.is_success()).then(|| FallbackReason::for_status(status.as_u16())).flatten() {
        let (parts, upstream_body) = response.into_parts();
        // The error body is only read for its message; a broken one still fails the attempt.
        let error_body = read_body(upstream_body, MAX_ERROR_BODY, deadline).await.unwrap_or_default();
        target.metrics.duration.observe(started.elapsed());
        let error_body = redact(error_body, target);
        let mut failure = Failure::new(target, kind, Some(status.as_u16()), upstream_message(status, &error_body));
        // A provider rejecting Switchyard's own credentials is not the caller's error to see.
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            let mut response = Response::from_parts(parts, Body::from(error_body));
            let headers = response.headers_mut();
            strip_hop_by_hop(headers);
            // Redaction may have changed the length; the server sets it from the body.
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(ERROR_SOURCE, HeaderValue::from_static("upstream"));
            failure.passthrough = Some(response);
        }
        return Err(failure);
    }

    let (mut parts, upstream_body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if is_event_stream(&parts.headers) {
        parts.headers.remove(header::CONTENT_LENGTH);
        let relay = SseRelay::new(upstream_body, route.clone(), index, started, timeouts.total);
        return Ok(Response::from_parts(parts, Body::new(relay)));
    }

    let answer = match read_body(upstream_body, shared.limits.max_response_bytes, deadline).await {
        Ok(answer) => answer,
        Err(e) => {
            target.metrics.duration.observe(started.elapsed());
            let (kind, message) = match e {
                ReadError::Timeout => (
                    FallbackReason::Timeout,
                    format!(
                        "the answer was not complete within the total timeout of {}",
                        format_duration(timeouts.total)
                    ),
                ),
                ReadError::TooLarge => (
                    FallbackReason::ServerError,
                    format!(
                        "the answer is larger than {} bytes (--max-response-bytes)",
                        shared.limits.max_response_bytes
                    ),
                ),
                ReadError::Broken(detail) => {
                    (FallbackReason::Connect, format!("the connection broke before the answer was complete: {detail}"))
                }
            };
            return Err(Failure::new(target, kind, Some(status.as_u16()), message));
        }
    };
    target.metrics.duration.observe(started.elapsed());
    if serde_json::from_slice::<serde::de::IgnoredAny>(&answer).is_err() {
        let message = "the upstream answered with a body that is not valid JSON".to_string();
        return Err(Failure::new(target, FallbackReason::ServerError, Some(status.as_u16()), message));
    }
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(answer.len()));
    Ok(Response::from_parts(parts, Body::from(answer)))
}

enum ReadError {
    Timeout,
    TooLarge,
    Broken(String),
}

async fn read_body(body: UpstreamBody, limit: usize, deadline: Instant) -> Result<Bytes, ReadError> {
    match timeout_at(deadline.into(), Limited::new(body, limit).collect()).await {
        Err(_) => Err(ReadError::Timeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Ok(Err(e)) => Err(ReadError::Broken(error_chain(&*e))),
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Connection-level headers belong to one hop; the sidecar's server sets its own.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::TE, header::TRAILER, header::UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// The message of an upstream error for `previous_errors`.
fn upstream_message(status: StatusCode, body: &[u8]) -> String {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return format!("the provider rejected the configured credentials ({})", status.as_u16());
    }
    let detail = upstream_error_message(body).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        text.chars().take(200).collect()
    });
    format!("upstream answered {}: {detail}", status.as_u16())
}

/// Removes the target's key from an upstream body, should the upstream echo it.
fn redact(body: Bytes, target: &TargetRt) -> Bytes {
    let Some(credential) = &target.credential else { return body };
    let key = credential.expose().as_bytes();
    if key.is_empty() || !body.windows(key.len()).any(|w| w == key) {
        return body;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = &body[..];
    while let Some(at) = rest.windows(key.len()).position(|w| w == key) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"[redacted]");
        rest = &rest[at + key.len()..];
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// `GET /v1/models`.
pub async fn models(State(shared): State<Arc<Shared>>) -> Response {
    let body = shared.snapshot.load().models_json.clone();
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Any other path.
pub async fn unknown_path(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    unrouted(&shared, ProxyError::UnknownPath { path: request.uri().path().to_string() })
}

/// A known path with the wrong method.
pub async fn method_not_allowed(State(shared): State<Arc<Shared>>) -> Response {
    unrouted(&shared, ProxyError::MethodNotAllowed)
}

/// Whether the sidecar is taking new traffic.
pub fn is_ready(shared: &Shared) -> bool {
    !shared.draining.load(Ordering::Relaxed)
}
