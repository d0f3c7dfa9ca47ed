//! One attempt on one target: send the request, classify what came back, and for a stream hold
//! the response back until its first token, so a target that fails before then can still be
//! replaced without the caller noticing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header, response::Parts};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::timeout_at;

use super::UpstreamBody;
use super::relay::{Committed, StreamWatch, Translator, unix_now};
use super::transport::{SendError, error_chain};
use crate::api::FallbackReason;
use crate::api::units::format_duration;
use crate::config::{Format, HealthPolicy};
use crate::providers::Untranslatable;
use crate::providers::anthropic::callers;
use crate::providers::anthropic::{self, ANTHROPIC_BETA, ANTHROPIC_VERSION};
use crate::providers::openai::{AnswerInfo, ChatRequest, answer_info, is_context_length_error, upstream_error_message};
use crate::providers::{BYTES_PER_TOKEN, responses, sse};
use crate::sidecar::calls::endpoint::{Endpoint, UpstreamPath};
use crate::sidecar::calls::error::{AttemptFailure, ERROR_SOURCE, ProxyError};
use crate::sidecar::observe::traces::attempt_traceparent;
use crate::sidecar::routing::health::{self, AttemptOutcome, HealthTracker};
use crate::sidecar::shared::Shared;
use crate::sidecar::snapshot::{ServedRoute, ServedTarget};
use crate::traces::Place;

/// Caller headers worth passing upstream: identification and tracing, never the caller's key.
const FORWARDED: [header::HeaderName; 4] = [
    header::USER_AGENT,
    header::HeaderName::from_static("traceparent"),
    header::HeaderName::from_static("tracestate"),
    header::HeaderName::from_static("x-request-id"),
];

/// How much of an upstream error body is read, for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// An attempt that got far enough to answer the caller.
pub enum Answer {
    /// A whole non-streamed answer, and what it says for billing.
    Json { parts: Parts, body: Bytes, info: AnswerInfo },
    /// A stream, past its first token (or past hold-back).
    Stream { parts: Parts, stream: Box<Committed> },
}

/// What a failed attempt says about the target's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthEffect {
    /// Counts towards ejection.
    Failure,
    /// The target answered: it is healthy, the request was the problem.
    Answered,
    /// A rate limit with a retry hint: pause the target this long.
    CoolDown(Duration),
    /// The provider refused the target's own credentials: eject it for `maxEjection`.
    Eject,
    /// Nothing was sent: the attempt says nothing of the target.
    Untouched,
}

/// A failed attempt.
pub struct Failure {
    pub record: AttemptFailure,
    /// The upstream's own error answer, when it is right to pass it on.
    pub passthrough: Option<Response>,
    pub health: HealthEffect,
}

impl Failure {
    fn new(
        route: &ServedRoute,
        target: &ServedTarget,
        kind: FallbackReason,
        status: Option<u16>,
        message: String,
    ) -> Failure {
        Failure {
            record: AttemptFailure::new(&route.model, &target.name, kind, status, message),
            passthrough: None,
            health: HealthEffect::Failure,
        }
    }
}

impl Failure {
    /// A request the target's wire format cannot express: never sent, so the target's health is
    /// untouched; the caller gets a 400 naming the field unless another target may take it.
    fn untranslatable(route: &ServedRoute, target: &ServedTarget, e: Untranslatable, caller: Format) -> Failure {
        let message = if e.field.is_empty() { e.message } else { format!("{}: {}", e.field, e.message) };
        let message = format!("{message} (target {:?} speaks {})", target.name, api_name(target.format));
        let mut failure = Failure::new(route, target, FallbackReason::ClientError, None, message.clone());
        failure.health = HealthEffect::Untouched;
        let error = ProxyError::BadRequest { code: "untranslatable_request", message };
        failure.passthrough = Some(error.into_response_as(caller));
        failure
    }
}

impl Failure {
    /// A request of an endpoint the target's API does not have: never sent, like an
    /// [untranslatable](Failure::untranslatable) one.
    pub(in crate::sidecar) fn unsupported(route: &ServedRoute, target: &ServedTarget, endpoint: Endpoint) -> Failure {
        let message = format!(
            "target {:?} speaks {}, which has no {} endpoint",
            target.name,
            api_name(target.format),
            endpoint.api_name()
        );
        let mut failure = Failure::new(route, target, FallbackReason::ClientError, None, message.clone());
        failure.health = HealthEffect::Untouched;
        let error = ProxyError::BadRequest { code: "unsupported_endpoint", message };
        failure.passthrough = Some(error.into_response_as(endpoint.format()));
        failure
    }
}

/// The API a target of `format` speaks, for error messages.
fn api_name(format: Format) -> &'static str {
    match format {
        Format::OpenAi => "OpenAI's Chat Completions API",
        Format::Anthropic => "Anthropic's Messages API",
    }
}

/// A Messages request's version and betas, for an Anthropic target: the caller's version unless
/// the target's `headers` pin one, and the caller's betas the target accepts, after any the
/// target's `headers` set.
pub(in crate::sidecar) fn forward_anthropic_headers(
    caller: &HeaderMap,
    target: &ServedTarget,
    headers: &mut HeaderMap,
) {
    if !target.pins_anthropic_version
        && let Some(version) = caller.get(ANTHROPIC_VERSION)
    {
        headers.insert(ANTHROPIC_VERSION, version.clone());
    }
    let Some(asked) = caller.get(ANTHROPIC_BETA).and_then(|v| v.to_str().ok()) else { return };
    let accepted = asked
        .split(',')
        .map(str::trim)
        .filter(|beta| !beta.is_empty())
        .filter(|beta| target.anthropic_betas.as_ref().is_none_or(|ok| ok.iter().any(|a| a == beta)));
    let mut betas: Vec<&str> = headers.get(ANTHROPIC_BETA).and_then(|v| v.to_str().ok()).into_iter().collect();
    betas.extend(accepted);
    if let Ok(value) = HeaderValue::from_str(&betas.join(",")) {
        headers.insert(ANTHROPIC_BETA, value);
    }
}

/// An attempt's result, with the target it was on.
pub struct Finished {
    pub index: usize,
    pub probe: bool,
    pub result: Result<Answer, Failure>,
}

/// Releases a half-open probe if its attempt is abandoned (the caller left, or a hedge won), so the
/// next request can probe.
struct ProbeGuard<'a> {
    health: &'a HealthTracker,
    policy: &'a HealthPolicy,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.health.record(AttemptOutcome::Cancelled, true, self.policy, health::now());
        }
    }
}

/// The request an attempt sends, the same for each attempt but for the target.
pub struct Outgoing<'a> {
    /// The endpoint called: what the request is and what the answer must be.
    pub endpoint: Endpoint,
    /// The routing fields of the request.
    pub chat: &'a ChatRequest<'a>,
    pub body: &'a Bytes,
    pub caller_headers: &'a HeaderMap,
    /// Turn a stream's usage chunk on upstream, to bill it exactly.
    pub force_usage: bool,
    /// When the request arrived, which the GenAI durations count from.
    pub arrived: Instant,
    /// The request's span, when it is traced: each attempt sends its own `traceparent` under it.
    pub trace: Option<Place>,
}

/// One attempt on `route.targets[index]`.
pub async fn attempt(
    route: &Arc<ServedRoute>,
    index: usize,
    probe: bool,
    out: &Outgoing<'_>,
    shared: &Shared,
    number: usize,
) -> Finished {
    let mut guard = ProbeGuard { health: &route.targets[index].state.health, policy: &route.health, armed: probe };
    let result = try_target(route, index, out, shared, number).await;
    guard.armed = false;
    Finished { index, probe, result }
}

async fn try_target(
    route: &Arc<ServedRoute>,
    index: usize,
    out: &Outgoing<'_>,
    shared: &Shared,
    number: usize,
) -> Result<Answer, Failure> {
    let target = &route.targets[index];
    let state = &target.state;
    let timeouts = target.timeouts;
    let started = Instant::now();
    let deadline = started + timeouts.total;
    let first_byte_deadline = (started + timeouts.first_byte).min(deadline);

    let caller = out.endpoint.format();
    let Some(path) = out.endpoint.upstream(target.format, target.native_responses) else {
        return Err(Failure::unsupported(route, target, out.endpoint));
    };
    let reserved_completion = u64::from(route.reserved_completion_tokens);
    let body = match (out.endpoint, path, caller, target.format) {
        // The Responses API reports usage unasked, and knows no `stream_options.include_usage`.
        (Endpoint::Responses, UpstreamPath::Under(_), ..) => {
            Ok(out.chat.upstream_body(out.body, &target.model_json, false))
        }
        (_, UpstreamPath::Under(_), ..) => Ok(out.chat.upstream_body(out.body, &target.model_json, out.force_usage)),
        // Chat Completions is the hub: a Responses request reaches Messages through it.
        (Endpoint::Responses, ..) => {
            responses::chat_request(out.body, &target.model).and_then(|chat| match target.format {
                Format::OpenAi => Ok(Bytes::from(chat)),
                Format::Anthropic => {
                    anthropic::messages_request(&chat, &target.model, reserved_completion).map(Bytes::from)
                }
            })
        }
        (.., Format::OpenAi, Format::OpenAi) => {
            Ok(out.chat.upstream_body(out.body, &target.model_json, out.force_usage))
        }
        (.., Format::Anthropic, Format::Anthropic) if out.chat.models.is_empty() => {
            Ok(out.chat.upstream_body(out.body, &target.model_json, false))
        }
        // `fallbacks` is the sidecar's to read: Anthropic refuses fields it does not know.
        (.., Format::Anthropic, Format::Anthropic) => {
            anthropic::without_fallbacks(out.body, &target.model).map(Bytes::from)
        }
        (.., Format::OpenAi, Format::Anthropic) => {
            anthropic::messages_request(out.body, &target.model, reserved_completion).map(Bytes::from)
        }
        (.., Format::Anthropic, Format::OpenAi) => callers::chat_request(out.body, &target.model).map(Bytes::from),
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return Err(Failure::untranslatable(route, target, e, caller)),
    };
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    let headers = request.headers_mut();
    headers.clone_from(&target.headers);
    for name in &FORWARDED {
        if let Some(value) = out.caller_headers.get(name) {
            headers.insert(name, value.clone());
        }
    }
    if let Some(trace) = &out.trace
        && let Ok(value) = HeaderValue::try_from(attempt_traceparent(trace, number))
    {
        headers.insert(&FORWARDED[1], value);
    }
    if (caller, target.format) == (Format::Anthropic, Format::Anthropic) {
        forward_anthropic_headers(out.caller_headers, target, headers);
    }

    let fail = |kind, status, message| Failure::new(route, target, kind, status, message);
    let under = match path {
        UpstreamPath::Conversation => None,
        UpstreamPath::Under(path) => Some(path),
    };
    let response = match timeout_at(first_byte_deadline.into(), target.upstream.send(under, request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(SendError::ConnectTimeout)) => {
            let message = format!("connect timeout after {}", format_duration(timeouts.connect));
            return Err(fail(FallbackReason::Timeout, None, message));
        }
        Ok(Err(SendError::Connect(detail))) => {
            return Err(fail(FallbackReason::Connect, None, format!("connection failed: {detail}")));
        }
        Err(_) => {
            let (which, limit) = if first_byte_deadline < deadline {
                ("firstByte", timeouts.first_byte)
            } else {
                ("total", timeouts.total)
            };
            let message = format!("no response headers within the {which} timeout of {}", format_duration(limit));
            return Err(fail(FallbackReason::Timeout, None, message));
        }
    };
    state.first_byte.observe(started.elapsed());
    let status = response.status();

    if let Some(kind) = (!status.is_success()).then(|| FallbackReason::for_status(status.as_u16())).flatten() {
        let (parts, upstream_body) = response.into_parts();
        // The error body is only read for its message; a broken one still fails the attempt.
        let error_body = read_body(upstream_body, MAX_ERROR_BODY, deadline).await.unwrap_or_default();
        state.duration.observe(started.elapsed());
        let error_body = redact(error_body, target);
        let code = status.as_u16();
        // Callers read errors in their own API's shape.
        let error_body = match (caller, target.format) {
            (Format::OpenAi, Format::Anthropic) => anthropic::openai_error(&error_body).map_or(error_body, Bytes::from),
            (Format::Anthropic, Format::OpenAi) => {
                let message = upstream_error_message(&error_body).unwrap_or_else(|| upstream_message(status, b""));
                Bytes::from(callers::error_body(anthropic::error_type(code), &message))
            }
            _ => error_body,
        };
        let kind = if is_context_length_error(code, &error_body) { FallbackReason::ContextLength } else { kind };
        let mut failure = fail(kind, Some(code), upstream_message(status, &error_body));
        let hint = retry_hint(&parts.headers);
        // A hint is believed up to maxEjection, as for the cooldown.
        let hint = hint.map(|wait| wait.min(route.health.max_ejection));
        failure.record.retry_after = hint.filter(|_| kind == FallbackReason::TooManyRequests);
        failure.health = match (code, hint) {
            (429 | 503, Some(wait)) => HealthEffect::CoolDown(wait),
            (429 | 500..=599, _) => HealthEffect::Failure,
            (401 | 403, _) => HealthEffect::Eject,
            _ => HealthEffect::Answered,
        };
        // A provider rejecting Sideyard's own credentials is not the caller's error to see.
        if kind != FallbackReason::Auth {
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

    let (mut parts, mut upstream_body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if is_event_stream(&parts.headers) {
        parts.headers.remove(header::CONTENT_LENGTH);
        let usage_chunk = out.chat.include_usage || out.force_usage;
        let mut translator = Translator::between(target.format, out.endpoint, path, &target.model, usage_chunk);
        let mut watch = StreamWatch::new(started, out.endpoint);
        let mut framer = sse::Framer::default();
        let mut prefix = BytesMut::new();
        if !route.hold_back.is_zero() {
            let hold_until = (Instant::now() + route.hold_back).min(deadline);
            while watch.first_token.is_none() {
                match timeout_at(hold_until.into(), upstream_body.frame()).await {
                    Err(_) if hold_until < deadline => break,
                    Err(_) => {
                        let message =
                            format!("no first token within the total timeout of {}", format_duration(timeouts.total));
                        return Err(fail(FallbackReason::Timeout, Some(status.as_u16()), message));
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        state.duration.observe(started.elapsed());
                        let message = format!("the connection broke before the first token: {}", error_chain(&*e));
                        return Err(fail(FallbackReason::Connect, Some(status.as_u16()), message));
                    }
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data()
                            && let Some(complete) = framer.push(data)
                        {
                            let chunks = match &mut translator {
                                None => complete,
                                Some(translator) => match translator.events(complete) {
                                    Ok(chunks) => chunks,
                                    // Nothing reached the caller yet: the attempt fails and may fall back.
                                    Err((_, fault)) => {
                                        state.duration.observe(started.elapsed());
                                        let kind = FallbackReason::for_status(anthropic::error_status(&fault.kind))
                                            .unwrap_or(FallbackReason::ServerError);
                                        let message = format!(
                                            "the provider's stream failed before the first token: {}: {}",
                                            fault.kind, fault.message
                                        );
                                        return Err(fail(kind, Some(status.as_u16()), message));
                                    }
                                },
                            };
                            watch.observe(&chunks, &state.stats);
                            prefix.extend_from_slice(&chunks);
                        }
                    }
                }
            }
        }
        let stream = Committed {
            body: upstream_body,
            framer,
            prefix: prefix.freeze(),
            watch,
            started,
            arrived: out.arrived,
            translator,
        };
        return Ok(Answer::Stream { parts, stream: Box::new(stream) });
    }

    let answer = match read_body(upstream_body, shared.limits.max_response_bytes, deadline).await {
        Ok(answer) => answer,
        Err(e) => {
            state.duration.observe(started.elapsed());
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
            return Err(fail(kind, Some(status.as_u16()), message));
        }
    };
    let total = started.elapsed();
    state.duration.observe(total);
    let translated = match (out.endpoint, path, caller, target.format) {
        (Endpoint::Responses, UpstreamPath::Under(_), ..) => Ok(answer),
        (Endpoint::Responses, _, _, Format::OpenAi) => {
            responses::response_answer(&answer, &target.model, unix_now()).map(Bytes::from)
        }
        (Endpoint::Responses, _, _, Format::Anthropic) => {
            anthropic::chat_completion(&answer, &target.model, unix_now())
                .and_then(|(chat, _)| responses::response_answer(&chat, &target.model, unix_now()))
                .map(Bytes::from)
        }
        (.., Format::OpenAi, Format::Anthropic) => {
            anthropic::chat_completion(&answer, &target.model, unix_now()).map(|(chat, _)| Bytes::from(chat))
        }
        (.., Format::Anthropic, Format::OpenAi) => callers::messages_answer(&answer, &target.model).map(Bytes::from),
        _ => Ok(answer),
    };
    let answer = match translated {
        Ok(answer) => answer,
        Err(e) => {
            let message = format!("the provider's answer cannot be translated: {}: {}", e.field, e.message);
            return Err(fail(FallbackReason::ServerError, Some(status.as_u16()), message));
        }
    };
    let Ok(info) = answer_info(&answer) else {
        let message = "the upstream answered with a body that is not valid JSON".to_string();
        return Err(fail(FallbackReason::ServerError, Some(status.as_u16()), message));
    };
    // For a whole answer, the first token reaches the caller with the last.
    let now = health::now();
    state.stats.record_first_token(total, now);
    let tokens = info.usage.map_or(info.output_bytes.div_ceil(BYTES_PER_TOKEN), |u| u.completion);
    state.stats.record_done(total, None, Some(tokens), now);
    Ok(Answer::Json { parts, body: answer, info })
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
pub(in crate::sidecar) const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
];

/// Removes [`HOP_BY_HOP`] headers. A pass over the few names a response has finds them for less
/// than a hashed removal of each of the seven.
pub(in crate::sidecar) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    while let Some(name) = headers.keys().find(|name| HOP_BY_HOP.iter().any(|h| h == *name)).cloned() {
        headers.remove(name);
    }
}

/// How long a rate-limited upstream asks to be left alone: `retry-after-ms`, `retry-after` (in
/// seconds), or the longest of OpenAI's `x-ratelimit-reset-requests` / `-tokens` (durations such
/// as `1s`, `6m0s`, `250ms`) and `x-ratelimit-reset` (seconds). Whatever an upstream writes,
/// this is a duration or nothing: a value too large for a `Duration` saturates.
pub fn retry_hint(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let number = |s: &str| s.parse::<f64>().ok();
    if let Some(wait) = text("retry-after-ms").and_then(number).and_then(|ms| seconds(ms / 1000.0)) {
        return Some(wait);
    }
    if let Some(wait) = text("retry-after").and_then(number).and_then(seconds) {
        return Some(wait);
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset"]
        .iter()
        .filter_map(|name| text(name).and_then(|v| go_duration(v).or_else(|| number(v).and_then(seconds))))
        .max()
}

/// A non-negative number of seconds as a duration, saturating at [`Duration::MAX`]; `None` for a
/// negative number or NaN.
fn seconds(value: f64) -> Option<Duration> {
    if value.is_nan() || value < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX))
}

/// A Go duration string with decimals, as OpenAI writes rate-limit resets: `1s`, `6m0s`, `0.5s`,
/// `1h2m3.5s`, `250ms`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let (scale, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return None;
        };
        total += value * scale;
        rest = &rest[len..];
    }
    seconds(total)
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
fn redact(body: Bytes, target: &ServedTarget) -> Bytes {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_behind_and_the_rest_goes_on() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive"),
            ("content-type", "application/json"),
            ("keep-alive", "timeout=5"),
            ("connection", "upgrade"),
            ("transfer-encoding", "chunked"),
            ("x-request-id", "abc"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("proxy-authenticate", "Basic"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        left.sort();
        assert_eq!(left, [("content-type", "application/json"), ("x-request-id", "abc")]);
    }

    fn hint(pairs: &[(&'static str, &'static str)]) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.insert(*k, HeaderValue::from_static(v));
        }
        retry_hint(&headers)
    }

    #[test]
    fn reads_retry_hints() {
        assert_eq!(hint(&[]), None);
        assert_eq!(hint(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(hint(&[("retry-after", "7"), ("retry-after-ms", "1500")]), Some(Duration::from_millis(1500)));
        assert_eq!(
            hint(&[("x-ratelimit-reset-requests", "1s"), ("x-ratelimit-reset-tokens", "6m0s")]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(hint(&[("x-ratelimit-reset-tokens", "250ms")]), Some(Duration::from_millis(250)));
        assert_eq!(hint(&[("x-ratelimit-reset", "2.5")]), Some(Duration::from_millis(2500)));
        assert_eq!(hint(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]), None, "dates are not read");
        assert_eq!(hint(&[("retry-after", "-3")]), None);
        // Numbers too large for a Duration saturate; the caller caps them at maxEjection.
        assert_eq!(hint(&[("retry-after", "1e20")]), Some(Duration::MAX));
        assert_eq!(hint(&[("retry-after-ms", "1e400")]), Some(Duration::MAX));
        assert_eq!(hint(&[("x-ratelimit-reset-tokens", "99999999999999999999h")]), Some(Duration::MAX));
        assert_eq!(hint(&[("retry-after", "NaN")]), None);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn hint_of(name: &'static str, value: &str) -> Option<Duration> {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
            retry_hint(&headers)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_retry_hint_is_a_duration_or_nothing(
                name in prop::sample::select(&["retry-after", "retry-after-ms", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset"][..]),
                value in prop_oneof!["[ -~]{0,24}", "[0-9.emsh+-]{0,24}", any::<f64>().prop_map(|f| f.to_string()), any::<u64>().prop_map(|n| format!("{n}h"))],
            ) {
                let _ = hint_of(name, &value);
            }

            #[test]
            fn whole_seconds_are_read_exactly(seconds in any::<u32>()) {
                prop_assert_eq!(hint_of("retry-after", &seconds.to_string()), Some(Duration::from_secs(u64::from(seconds))));
                prop_assert_eq!(hint_of("x-ratelimit-reset-requests", &format!("{seconds}s")), Some(Duration::from_secs(u64::from(seconds))));
            }
        }
    }
}
