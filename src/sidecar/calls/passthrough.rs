//! Every other call under `/v1/` (files, uploads, batches, audio, images, moderations, vector
//! stores, ...): forwarded as it is, its body and answer streamed both ways, to a target of the
//! route its `model` names (a JSON field, or a form field of an upload), or of the namespace's
//! pass-through default route when it names none. The target's credential replaces the caller's
//! key, which never goes upstream; only `model` is rewritten, to the target's model.
//!
//! A body read whole (JSON) can be sent again, so such a call falls back as a route allows; an
//! upload streams on to its first target, once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use tokio::time::timeout;

use super::endpoint::Api;
use super::error::{AttemptFailure, ERROR_SOURCE, ProxyError, TARGET, add_rate_headers};
use super::proxy::{authenticate, bad_request, finish, read_request, record_health, refused_credentials, unrouted};
use super::request_log::{Outcome, RequestLog};
use crate::api::FallbackReason;
use crate::api::units::format_duration;
use crate::config::Format;
use crate::providers::anthropic::X_API_KEY;
use crate::providers::multipart::{self, ModelField};
use crate::providers::openai::optional_model;
use crate::providers::{Prefs, splice};
use crate::sidecar::billing;
use crate::sidecar::observe::Recording;
use crate::sidecar::routing::health::{self, AttemptOutcome};
use crate::sidecar::routing::plan;
use crate::sidecar::shared::Shared;
use crate::sidecar::snapshot::{ServedRoute, ServedTarget};
use crate::sidecar::upstream::attempt::{HOP_BY_HOP, retry_hint, strip_hop_by_hop};
use crate::sidecar::upstream::transport::SendError;

/// How much of a form is read to find its `model` before it is sent on without one.
const FORM_PEEK_LIMIT: usize = 1 << 20;

/// Caller headers that never go upstream: the caller's keys (OpenAI's, Anthropic's, Azure's), the
/// account scope that belongs with a key (a caller's organization or project would not match the
/// target's key: the target's `headers` set them), and the framing the client sets.
const WITHHELD: [header::HeaderName; 7] = [
    header::AUTHORIZATION,
    X_API_KEY,
    header::HeaderName::from_static("api-key"),
    header::HeaderName::from_static("openai-organization"),
    header::HeaderName::from_static("openai-project"),
    header::HOST,
    header::CONTENT_LENGTH,
];

/// The body of a call passed through.
enum Payload {
    /// Read whole: it can be sent to another target if the first fails.
    Whole(Bytes),
    /// The first bytes of an upload, read to find its model, and the rest still to come; sent
    /// once. `len`: the whole body's length, when the caller gave it.
    Streaming { prefix: Bytes, rest: Option<Body>, len: Option<u64> },
}

/// A call's `model`, if it names one, and where it is in the payload (the whole body, or the
/// prefix of an upload), to be rewritten for the target.
struct Model {
    name: String,
    span: std::ops::Range<usize>,
    /// JSON strings are quoted; form fields are not.
    quoted: bool,
}

/// `/v1/...` calls the sidecar does not serve itself.
pub async fn passthrough(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let arrived = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let mut record = Recording(shared.observers.as_ref().map(|o| o.start(&parts, false, arrived)));
    let path = parts.uri.path();
    if !path.starts_with("/v1/") {
        return record.respond(unrouted(&shared, ProxyError::UnknownPath { path: path.to_string() }));
    }
    if path == "/v1/realtime" || path.starts_with("/v1/realtime/") {
        return record.respond(unrouted(&shared, ProxyError::RealtimeUnsupported));
    }
    shared.states.api_calls[Api::Passthrough.index()].inc();
    let snapshot = shared.snapshot.load_full();
    // A call refused before any target took it, logged as it ends.
    let refuse = |record: &mut Recording, error: ProxyError, model: Option<&str>| {
        let response = unrouted(&shared, error);
        let outcome = Outcome::refused(&parts.headers, parts.uri.path(), model, response.status().as_u16());
        shared.states.request_log.record(outcome);
        record.respond(response)
    };
    let (model, payload) = match read_payload(&shared, &parts.headers, body).await {
        Ok(read) => read,
        Err(error) => return refuse(&mut record, error, None),
    };
    let name = model.as_ref().map(|m| m.name.as_str());
    if let Some(r) = record.0.as_deref_mut() {
        r.model = name.map(str::to_string);
    }
    let route = match &model {
        Some(model) => snapshot
            .route(&model.name)
            .ok_or_else(|| ProxyError::UnknownModel { model: model.name.clone(), known: snapshot.known_models() }),
        None => snapshot.passthrough_default().ok_or_else(|| ProxyError::NoPassthroughDefault {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
        }),
    };
    let route = match route {
        Ok(route) => route,
        Err(error) => return refuse(&mut record, error, name),
    };
    let budget = match authenticate(&parts.headers, &snapshot, &[route], shared.require_key) {
        Ok(budget) => budget,
        Err(error) => return refuse(&mut record, error, name),
    };
    if let (Some(r), Some(budget)) = (record.0.as_deref_mut(), &budget) {
        r.budget = Some(budget.id.clone());
    }
    let mut rate = None;
    if let Some(budget) = &budget {
        match billing::admit_rate(budget).await {
            Ok(status) => rate = status,
            Err(refused) => return refuse(&mut record, refused, name),
        }
    }
    let mut response = forward(route, &parts, model.as_ref(), payload, &shared.states.request_log).await;
    if let Some(rate) = rate {
        add_rate_headers(response.headers_mut(), rate);
    }
    if let Some(r) = record.0.as_deref_mut() {
        // The record of a call passed through ends with its response's headers.
        let answered =
            response.headers().get(TARGET).and_then(|t| route.targets.iter().position(|s| s.name_header == t));
        if let Some(index) = answered {
            r.answered(route, index, false);
            r.attempts = 1;
        }
    }
    record.respond(response)
}

/// Reads what routing needs: all of a JSON body, the first bytes of a form up to its `model`,
/// nothing of any other body.
async fn read_payload(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Option<Model>, Payload), ProxyError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let len = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if is_json(content_type) {
        let body = read_request(shared, body).await?;
        let model = match optional_model(&body) {
            Ok(found) => found.map(|(name, span)| Model { name: name.into_owned(), span, quoted: true }),
            // An empty body names no model; anything else must be the JSON it says it is.
            Err(_) if body.iter().all(u8::is_ascii_whitespace) => None,
            Err(e) => return Err(bad_request(e)),
        };
        return Ok((model, Payload::Whole(body)));
    }
    let Some(boundary) = multipart::boundary(content_type) else {
        return Ok((None, Payload::Streaming { prefix: Bytes::new(), rest: Some(body), len }));
    };
    let mut prefix = BytesMut::new();
    let mut body = body;
    let found = loop {
        match multipart::model_field(&prefix, boundary) {
            ModelField::Found(span) => break Some(span),
            ModelField::Absent => break None,
            ModelField::NeedMore if prefix.len() >= FORM_PEEK_LIMIT => break None,
            ModelField::NeedMore => {}
        }
        match body.frame().await {
            None => break None,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                let message = format!("Could not read the request body: {e}");
                return Err(ProxyError::BadRequest { code: "invalid_body", message });
            }
        }
    };
    let prefix = prefix.freeze();
    let model = match found {
        Some(span) => {
            let name = std::str::from_utf8(&prefix[span.clone()]).map_err(|_| ProxyError::BadRequest {
                code: "invalid_model",
                message: "The form's \"model\" field is not UTF-8 text.".into(),
            })?;
            Some(Model { name: name.trim().to_string(), span, quoted: false })
        }
        None => None,
    };
    Ok((model, Payload::Streaming { prefix, rest: Some(body), len }))
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json") || essence.to_ascii_lowercase().ends_with("+json")
}

/// Sends the call to the route's targets in plan order: to the first that takes it, or, for a
/// body read whole, on to the next when an attempt fails as the route's `fallback` allows.
async fn forward(
    route: &Arc<ServedRoute>,
    parts: &http::request::Parts,
    model: Option<&Model>,
    mut payload: Payload,
    log: &RequestLog,
) -> Response {
    fn outcome<'a>(
        parts: &'a http::request::Parts,
        route: &'a ServedRoute,
        model: Option<&'a Model>,
        failures: &'a [AttemptFailure],
        target: Option<&'a str>,
        status: StatusCode,
    ) -> Outcome<'a> {
        let model = model.map(|m| m.name.as_str());
        let (headers, path, route) = (&parts.headers, parts.uri.path(), Some(route.id.as_str()));
        Outcome { headers, path, model, route, target, failures, status: status.as_u16() }
    }
    let now = health::now();
    let tick = route.ticks.fetch_add(1, Ordering::Relaxed);
    let candidates: Vec<plan::Candidate<'_>> = route.targets.iter().map(|t| t.candidate(now)).collect();
    let (order, panic) = match plan::plan(route.strategy, &route.schedule, &candidates, &Prefs::default(), 0, tick) {
        Ok(plan) => (plan.order, plan.panic),
        Err(excluded) => {
            let error = ProxyError::NoTarget { model: route.model.clone(), excluded_by: excluded.by };
            route.state.requests.inc(error.status().as_u16());
            return error.into_response();
        }
    };
    let path_and_query = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
    let mut failures: Vec<AttemptFailure> = Vec::new();
    let mut attempts = 0;
    let mut last = None;
    for index in order.into_iter().take(route.fallback.max_attempts as usize) {
        let target = &route.targets[index];
        // Every target ejected: the one that recovers soonest is tried, as on chat.
        let probe = if panic {
            target.state.health.force_probe();
            true
        } else {
            match target.state.health.acquire(health::now()) {
                Some(probe) => probe,
                None => continue,
            }
        };
        let Some((body, len)) = payload.body_for(target, model) else { break };
        attempts += 1;
        last = Some(index);
        let replayable = matches!(payload, Payload::Whole(_));
        let mut request = upstream_request(parts, target, body);
        if let Some(len) = len {
            request.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        // An upload's answer comes after all of it is sent: only the total timeout bounds it.
        let wait = if replayable { target.timeouts.first_byte } else { target.timeouts.total };
        let path = match target.format {
            // An OpenAI base URL ends with the version (`/v1`); an Anthropic one is the root.
            Format::OpenAi => path_and_query.strip_prefix("/v1").unwrap_or(path_and_query),
            Format::Anthropic => path_and_query,
        };
        let sent = timeout(wait, target.upstream.forward(&target.forwarding, path, request)).await;
        let mut retry_after = None;
        let (kind, status, message) = match sent {
            Ok(Ok(response)) => {
                let status = response.status();
                let kind = FallbackReason::for_status(status.as_u16());
                let falls_back = replayable && kind.is_some_and(|k| k.listed_in(|r| route.fallback.when.contains(r)));
                match kind {
                    Some(FallbackReason::TooManyRequests | FallbackReason::ServerError) => {
                        record_health(route, target, AttemptOutcome::Failure, probe);
                    }
                    Some(FallbackReason::Auth) => refused_credentials(route, target, Some(status.as_u16()), probe),
                    _ => record_health(route, target, AttemptOutcome::Success, probe),
                }
                if !falls_back {
                    let fell_back_on = failures.last().map(|f| f.kind);
                    let response = finish(answer(response, &route.model, target), target, attempts, fell_back_on);
                    log.record(outcome(parts, route, model, &failures, Some(&target.name), response.status()));
                    return response;
                }
                let kind = kind.unwrap_or(FallbackReason::ServerError);
                if kind == FallbackReason::TooManyRequests {
                    retry_after = retry_hint(response.headers()).map(|wait| wait.min(route.health.max_ejection));
                }
                let message = match kind {
                    FallbackReason::Auth => credentials_refused(status),
                    _ => format!("upstream answered {}", status.as_u16()),
                };
                (kind, Some(status.as_u16()), message)
            }
            Ok(Err(SendError::ConnectTimeout)) => {
                record_health(route, target, AttemptOutcome::Failure, probe);
                let message = format!("connect timeout after {}", format_duration(target.timeouts.connect));
                (FallbackReason::Timeout, None, message)
            }
            Ok(Err(SendError::Connect(detail))) => {
                record_health(route, target, AttemptOutcome::Failure, probe);
                (FallbackReason::Connect, None, format!("connection failed: {detail}"))
            }
            Err(_) => {
                record_health(route, target, AttemptOutcome::Failure, probe);
                (FallbackReason::Timeout, None, format!("no response headers within {}", format_duration(wait)))
            }
        };
        target.state.count_outcome(Some(kind));
        let mut failure = AttemptFailure::new(&route.model, &target.name, kind, status, message);
        failure.retry_after = retry_after;
        failures.push(failure);
        if !replayable || !kind.listed_in(|r| route.fallback.when.contains(r)) {
            break;
        }
    }
    let fell_back_on = failures.iter().rev().nth(1).map(|f| f.kind);
    let error = if failures.is_empty() {
        ProxyError::NoTarget { model: route.model.clone(), excluded_by: vec!["health"] }
    } else {
        ProxyError::AttemptsFailed { model: route.model.clone(), attempts: failures, excluded_by: Vec::new() }
    };
    let failures = match &error {
        ProxyError::AttemptsFailed { attempts, .. } => attempts.clone(),
        _ => Vec::new(),
    };
    let response = match last {
        Some(index) => finish(error.into_response(), &route.targets[index], attempts, fell_back_on),
        None => {
            route.state.requests.inc(error.status().as_u16());
            error.into_response()
        }
    };
    let last_target = last.map(|i| route.targets[i].name.as_str());
    log.record(outcome(parts, route, model, &failures, last_target, response.status()));
    response
}

impl Payload {
    /// The body for `target`, its model rewritten to the target's, and its length when it is
    /// streamed and the caller gave one; `None` once an upload's body has gone to an earlier
    /// attempt.
    fn body_for(&mut self, target: &ServedTarget, model: Option<&Model>) -> Option<(Body, Option<u64>)> {
        let rewrite = |bytes: &Bytes| match model {
            Some(m) if m.quoted => splice(bytes, m.span.clone(), target.model_json.as_bytes()),
            Some(m) => splice(bytes, m.span.clone(), target.model.as_bytes()),
            None => bytes.clone(),
        };
        match self {
            // Its length is known to the client from the body itself.
            Payload::Whole(body) => Some((Body::from(rewrite(body)), None)),
            Payload::Streaming { prefix, rest, len } => {
                let rest = rest.take()?;
                let new_prefix = rewrite(prefix);
                // The caller's Content-Length is any number: saturating, never overflowing.
                let len =
                    len.map(|len| len.saturating_add(new_prefix.len() as u64).saturating_sub(prefix.len() as u64));
                let stream = futures::stream::once(std::future::ready(Ok::<Bytes, axum::Error>(new_prefix)))
                    .chain(rest.into_data_stream());
                Some((Body::from_stream(stream), len))
            }
        }
    }
}

/// The call as the target gets it: the caller's method and headers but its keys and framing,
/// the target's static headers and credential.
fn upstream_request(parts: &http::request::Parts, target: &ServedTarget, body: Body) -> http::Request<Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = parts.method.clone();
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        if !WITHHELD.contains(name) && !HOP_BY_HOP.contains(name) {
            headers.append(name, value.clone());
        }
    }
    for (name, value) in &target.headers {
        // The caller's body keeps the caller's content type.
        if name != header::CONTENT_TYPE || !headers.contains_key(header::CONTENT_TYPE) {
            headers.insert(name, value.clone());
        }
    }
    request
}

/// The target's answer, streamed to the caller as it comes. A provider refusing the sidecar's own
/// credentials is not the caller's error: that becomes a 502 saying so.
fn answer(
    response: http::Response<crate::sidecar::upstream::UpstreamBody>,
    model: &str,
    target: &ServedTarget,
) -> Response {
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        let message = credentials_refused(status);
        let failure = AttemptFailure::new(model, &target.name, FallbackReason::Auth, Some(status.as_u16()), message);
        let error =
            ProxyError::AttemptsFailed { model: model.to_string(), attempts: vec![failure], excluded_by: Vec::new() };
        return error.into_response();
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !status.is_success() {
        parts.headers.insert(ERROR_SOURCE, HeaderValue::from_static("upstream"));
    }
    Response::from_parts(parts, Body::new(body))
}

/// A provider's 401 or 403, as the caller is told of it: the sidecar's credentials, not theirs.
fn credentials_refused(status: StatusCode) -> String {
    format!("the provider rejected the configured credentials ({})", status.as_u16())
}
