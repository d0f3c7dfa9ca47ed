//! `POST /v1/messages/count_tokens`: a prompt's tokens, counted by an Anthropic target of the
//! model's route, or estimated locally when none can count them (said in
//! `x-sideyard-token-count: estimated`). Counting costs nothing, so no budget is charged; a
//! route with budgets still wants a known key.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::timeout_at;

use super::endpoint::Api;
use super::error::{CONFIG_VERSION, ProxyError, TARGET};
use super::proxy::{authenticate, bad_request, read_request, unrouted_as};
use crate::config::Format;
use crate::providers::BYTES_PER_TOKEN;
use crate::providers::anthropic;
use crate::providers::openai::parse_chat_request;
use crate::sidecar::routing::health;
use crate::sidecar::shared::Shared;
use crate::sidecar::snapshot::ServedTarget;
use crate::sidecar::upstream::attempt::forward_anthropic_headers;

/// Says how a count was made: `anthropic` (by the target named in `x-sideyard-target`) or
/// `estimated` (the request's bytes over four).
pub const TOKEN_COUNT: HeaderName = HeaderName::from_static("x-sideyard-token-count");

/// The largest count answer read.
const MAX_ANSWER: usize = 64 * 1024;

pub async fn count_tokens(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.states.api_calls[Api::CountTokens.index()].inc();
    let caller = Format::Anthropic;
    let snapshot = shared.snapshot.load_full();
    let (parts, body) = request.into_parts();
    let body = match read_request(&shared, body).await {
        Ok(body) => body,
        Err(error) => return unrouted_as(&shared, error, caller),
    };
    let model = match parse_chat_request(&body) {
        Ok(request) => request.model.into_owned(),
        Err(e) => return unrouted_as(&shared, bad_request(e), caller),
    };
    let Some(route) = snapshot.route(&model) else {
        return unrouted_as(&shared, ProxyError::UnknownModel { model, known: snapshot.known_models() }, caller);
    };
    if let Err(error) = authenticate(&parts.headers, &snapshot, &[route], shared.require_key) {
        return unrouted_as(&shared, error, caller);
    }
    let now = health::now();
    let counters =
        route.targets.iter().filter(|t| t.format == Format::Anthropic && t.state.health.admission(now).is_available());
    for target in counters {
        match count_at(target, &parts.headers, &body).await {
            Ok(response) => return response,
            Err(reason) => {
                tracing::debug!(route = %route.id, upstream_target = %target.name, %reason, "token count failed; trying the next way");
            }
        }
    }
    let estimate = serde_json::json!({"input_tokens": (body.len() as u64 / BYTES_PER_TOKEN).max(1)});
    let mut response = Response::new(Body::from(estimate.to_string()));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(TOKEN_COUNT, HeaderValue::from_static("estimated"));
    response
}

/// The target's count, or its own answer to a request it refuses; `Err` when it cannot answer.
async fn count_at(target: &ServedTarget, caller: &http::HeaderMap, body: &[u8]) -> Result<Response, String> {
    let body = anthropic::without_fallbacks(body, &target.model).map_err(|e| e.message)?;
    let mut request = http::Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = Method::POST;
    request.headers_mut().clone_from(&target.headers);
    forward_anthropic_headers(caller, target, request.headers_mut());
    let deadline = Instant::now() + target.timeouts.first_byte;
    let response =
        match timeout_at(deadline.into(), target.upstream.send(Some("/v1/messages/count_tokens"), request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(format!("{e:?}")),
            Err(_) => return Err("no answer within the firstByte timeout".into()),
        };
    let status = response.status();
    // The target's own key problems and overload are not the caller's: count another way.
    if status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || status.as_u16() == 429
        || status.is_server_error()
    {
        return Err(format!("the target answered {status}"));
    }
    let answer = match timeout_at(deadline.into(), Limited::new(response.into_body(), MAX_ANSWER).collect()).await {
        Ok(Ok(answer)) => answer.to_bytes(),
        _ => return Err("the answer broke or came too late".into()),
    };
    let mut response = Response::new(Body::from(answer));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(TARGET, target.name_header.clone());
    if let Some(version) = &target.config_version {
        headers.insert(CONFIG_VERSION, version.clone());
    }
    if status.is_success() {
        headers.insert(TOKEN_COUNT, HeaderValue::from_static("anthropic"));
    }
    Ok(response)
}
