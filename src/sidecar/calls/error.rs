//! Every error the proxy itself answers with, mapped in one place to a status and an OpenAI-shaped
//! body. Synthetic responses carry `x-sideyard-error-source: proxy`; upstream errors passed
//! through carry `upstream`, so callers and dashboards can tell them apart.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde::Serialize;

use super::endpoint::Endpoint;
use crate::api::units::format_micros;
use crate::api::{FallbackReason, Serves};
use crate::budget::RateStatus;
use crate::budget::period::rfc3339;
use crate::config::Format;
use crate::providers::anthropic;
use crate::providers::openai::error_body;

pub const ERROR_SOURCE: HeaderName = HeaderName::from_static("x-sideyard-error-source");
pub const TARGET: HeaderName = HeaderName::from_static("x-sideyard-target");
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-sideyard-attempts");
/// The operator's version of the configuration that served the answer (cluster mode).
pub const CONFIG_VERSION: HeaderName = HeaderName::from_static("x-sideyard-config-version");
pub const FALLBACK_REASON: HeaderName = HeaderName::from_static("x-sideyard-fallback-reason");
/// On an answer from a hedged attempt: `won`.
pub const HEDGED: HeaderName = HeaderName::from_static("x-sideyard-hedged");

/// One failed attempt, as reported in `error.metadata.previous_errors`.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptFailure {
    /// The route's model.
    pub model: String,
    pub target: String,
    /// The upstream's HTTP status, when it answered.
    pub status: Option<u16>,
    pub reason: &'static str,
    pub message: String,
    #[serde(skip)]
    pub kind: FallbackReason,
    /// How long a rate-limited target asked to be left alone (or is still cooling down).
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl AttemptFailure {
    pub fn new(model: &str, target: &str, kind: FallbackReason, status: Option<u16>, message: String) -> Self {
        AttemptFailure {
            model: model.to_string(),
            target: target.to_string(),
            status,
            reason: kind.as_str(),
            message,
            kind,
            retry_after: None,
        }
    }
}

#[derive(Debug)]
pub enum ProxyError {
    /// The request body is not a valid request.
    BadRequest {
        code: &'static str,
        message: String,
    },
    PayloadTooLarge {
        limit: usize,
    },
    UnknownModel {
        model: String,
        known: Vec<String>,
    },
    UnknownPath {
        path: String,
    },
    MethodNotAllowed,
    /// The model's route serves another kind of model than the endpoint's.
    WrongEndpoint {
        model: String,
        serves: Serves,
        endpoint: Endpoint,
    },
    /// A call to pass through that names no model, without a pass-through default route.
    NoPassthroughDefault {
        method: http::Method,
        path: String,
    },
    /// The Realtime API, which is WebSocket sessions, not requests.
    RealtimeUnsupported,
    /// Every attempt failed, or one failed in a way that does not fall back.
    AttemptsFailed {
        model: String,
        attempts: Vec<AttemptFailure>,
        excluded_by: Vec<&'static str>,
    },
    /// No target could take the request: the request's preferences, the context window or health
    /// excluded every one.
    NoTarget {
        model: String,
        excluded_by: Vec<&'static str>,
    },
    /// No key, or a key no budget has, on a route that needs one.
    Unauthorized {
        missing: bool,
    },
    /// The key's budget does not allow this model.
    ModelNotAllowed {
        model: String,
    },
    /// The key's rate limit is used up for this minute.
    RateLimited {
        status: RateStatus,
    },
    /// Not enough credit left for the request's worst case (micro-units), and when the period's
    /// credit comes back (Unix seconds; `None` for a budget that never resets).
    InsufficientCredits {
        remaining: u64,
        reservation: u64,
        resets_at: Option<u64>,
        /// The budget above the key's (`namespace/name`) that ran out, when it is not the key's own.
        parent: Option<String>,
    },
    /// The ledger cannot record spend, and the budget fails closed: why, when it is known.
    LedgerUnavailable {
        reason: Option<String>,
    },
    /// `GET /api/v1/generation` on a sidecar that keeps no records.
    GenerationsOff,
    /// No record of this id made with the caller's key.
    GenerationNotFound {
        id: String,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UnknownModel { .. } | ProxyError::UnknownPath { .. } => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::WrongEndpoint { .. } => StatusCode::BAD_REQUEST,
            ProxyError::NoPassthroughDefault { .. } => StatusCode::NOT_FOUND,
            ProxyError::RealtimeUnsupported => StatusCode::NOT_IMPLEMENTED,
            // Every provider rate-limited the request: the caller backs off as it would for one.
            ProxyError::AttemptsFailed { attempts, .. } if all_rate_limited(attempts) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::AttemptsFailed { attempts, .. } => match attempts.last() {
                Some(last) if last.kind == FallbackReason::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            // Only health excluded them: they will be back; otherwise no target ever fits.
            ProxyError::NoTarget { excluded_by, .. } if excluded_by.iter().all(|b| *b == "health") => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::NoTarget { .. } => StatusCode::NOT_FOUND,
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            ProxyError::LedgerUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::GenerationsOff | ProxyError::GenerationNotFound { .. } => StatusCode::NOT_FOUND,
        }
    }

    pub fn into_response(self) -> Response {
        self.into_response_as(Format::OpenAi)
    }

    /// The error in the shape of the caller's API: OpenAI's, or Anthropic's
    /// (`{"type":"error","error":{"type","message"}}`, the type named by the status).
    pub fn into_response_as(self, format: Format) -> Response {
        let status = self.status();
        let rate = match &self {
            ProxyError::RateLimited { status } => Some(*status),
            _ => None,
        };
        // The soonest any rate-limited target said it takes requests again.
        let retry_after = match &self {
            ProxyError::AttemptsFailed { attempts, .. } if status == StatusCode::TOO_MANY_REQUESTS => {
                attempts.iter().filter_map(|a| a.retry_after).min()
            }
            _ => None,
        };
        let body = match self {
            ProxyError::Unauthorized { missing } => {
                let (message, code) = if missing {
                    (
                        "Missing API key: send it as \"Authorization: Bearer <key>\" or \"x-api-key: <key>\".",
                        "missing_api_key",
                    )
                } else {
                    ("Invalid API key.", "invalid_api_key")
                };
                error_body(message, "authentication_error", code, None)
            }
            ProxyError::ModelNotAllowed { model } => error_body(
                &format!("This API key may not use the model {model:?}."),
                "permission_error",
                "model_not_allowed",
                None,
            ),
            ProxyError::RateLimited { status } => error_body(
                &format!("Rate limit of {} per minute reached; retry in {} s.", status.limit, status.reset),
                "rate_limit_error",
                "rate_limit_exceeded",
                None,
            ),
            ProxyError::InsufficientCredits { remaining, reservation, resets_at, parent } => {
                let message = format!(
                    "Insufficient credits{}: this request may cost up to {} and {} remain; {}.",
                    parent.as_ref().map_or_else(String::new, |p| format!(" in {p}, a budget above this key's")),
                    format_micros(reservation),
                    format_micros(remaining),
                    match resets_at {
                        Some(at) => format!("the credit resets at {}", rfc3339(at)),
                        None => "the budget's period is never, so its credit does not reset: raise its limit".into(),
                    }
                );
                if format == Format::OpenAi {
                    // Written by hand, as `GET /api/v1/key` is, so the amounts are exact decimal
                    // numbers, never floats.
                    let resets_at = resets_at.map_or_else(|| "null".to_string(), |at| format!("\"{}\"", rfc3339(at)));
                    let budget = parent.map_or_else(|| "null".to_string(), |p| serde_json::Value::from(p).to_string());
                    let body = format!(
                        r#"{{"error":{{"message":{},"type":"insufficient_credits","code":"insufficient_credits","metadata":{{"remaining":{},"reservation":{},"resets_at":{resets_at},"budget":{budget}}}}}}}"#,
                        serde_json::Value::from(message),
                        format_micros(remaining),
                        format_micros(reservation),
                    );
                    return json_text_response(status, body, "proxy");
                }
                error_body(&message, "insufficient_credits", "insufficient_credits", None)
            }
            ProxyError::LedgerUnavailable { reason } => error_body(
                &match reason {
                    Some(reason) => format!("The budget ledger cannot record spend right now: {reason}."),
                    None => "The budget ledger cannot record spend right now; try again shortly.".to_string(),
                },
                "server_error",
                "ledger_unavailable",
                None,
            ),
            ProxyError::GenerationsOff => error_body(
                "This sidecar keeps no records of its requests: start it with --generations <N> (the chart's proxy.generations, or the pod annotation sideyard.dev/generations) to look up the last N.",
                "invalid_request_error",
                "generations_off",
                None,
            ),
            ProxyError::GenerationNotFound { id } => error_body(
                &format!(
                    "No generation {id:?} made with this API key: this sidecar keeps only its last requests, and each only for the key that made it."
                ),
                "invalid_request_error",
                "generation_not_found",
                None,
            ),
            ProxyError::BadRequest { code, message } => error_body(&message, "invalid_request_error", code, None),
            ProxyError::PayloadTooLarge { limit } => error_body(
                &format!("The request body is larger than the sidecar's limit of {limit} bytes (--max-request-bytes)."),
                "invalid_request_error",
                "request_too_large",
                None,
            ),
            ProxyError::UnknownModel { model, known } => error_body(
                &format!("The model {model:?} does not exist. Known models: {}.", known.join(", ")),
                "invalid_request_error",
                "model_not_found",
                Some(serde_json::json!({ "known_models": known })),
            ),
            ProxyError::UnknownPath { path } => {
                error_body(&format!("Unknown endpoint {path}."), "invalid_request_error", "unknown_endpoint", None)
            }
            ProxyError::MethodNotAllowed => {
                error_body("Method not allowed on this endpoint.", "invalid_request_error", "method_not_allowed", None)
            }
            ProxyError::WrongEndpoint { model, serves, endpoint } => {
                // The caller's fix, then the operator's.
                let (call, fix) = match serves {
                    Serves::Chat => (
                        "POST /v1/chat/completions, /v1/responses or /v1/messages",
                        "a route serves embeddings when its ProviderRoute sets `serves: embeddings`",
                    ),
                    Serves::Embeddings => (
                        "POST /v1/embeddings",
                        "a route serves chat when its ProviderRoute leaves `serves` out or sets `serves: chat`",
                    ),
                };
                error_body(
                    &format!(
                        "The model {model:?} serves {}, not {}: call {call}; {fix}.",
                        serves.as_str(),
                        endpoint.api_name()
                    ),
                    "invalid_request_error",
                    "wrong_endpoint",
                    None,
                )
            }
            ProxyError::NoPassthroughDefault { method, path } => error_body(
                &format!(
                    "{method} {path} names no model, so it goes to the namespace's pass-through default route, and there is none: set `passthroughDefault: true` on the ProviderRoute whose provider should receive such calls."
                ),
                "invalid_request_error",
                "no_passthrough_route",
                None,
            ),
            ProxyError::RealtimeUnsupported => error_body(
                "The Realtime API (WebSocket sessions) is not served by Sideyard; connect to the provider directly.",
                "invalid_request_error",
                "unsupported_endpoint",
                None,
            ),
            ProxyError::NoTarget { model, excluded_by } => error_body(
                &format!(
                    "No target of model {model:?} can take this request; excluded by: {}.",
                    excluded_by.join(", ")
                ),
                "invalid_request_error",
                "no_available_target",
                Some(serde_json::json!({ "excluded_by": excluded_by })),
            ),
            ProxyError::AttemptsFailed { model, attempts, excluded_by } => {
                let (kind, code, summary) = match status {
                    StatusCode::GATEWAY_TIMEOUT => ("upstream_error", "upstream_timeout", "timed out"),
                    StatusCode::TOO_MANY_REQUESTS => {
                        ("rate_limit_error", "rate_limit_exceeded", "were rate limited by their providers")
                    }
                    _ => ("upstream_error", "upstream_failed", "failed"),
                };
                let detail: Vec<String> = attempts.iter().map(|a| format!("{}: {}", a.target, a.message)).collect();
                error_body(
                    &format!("All {} attempt(s) for model {model:?} {summary}: {}", attempts.len(), detail.join("; ")),
                    kind,
                    code,
                    Some(if excluded_by.is_empty() {
                        serde_json::json!({ "previous_errors": attempts })
                    } else {
                        serde_json::json!({ "previous_errors": attempts, "excluded_by": excluded_by })
                    }),
                )
            }
        };
        let body = match format {
            Format::OpenAi => body,
            Format::Anthropic => {
                let message = body["error"]["message"].as_str().unwrap_or_default();
                let kind = anthropic::error_type(status.as_u16());
                serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
            }
        };
        let mut response = json_response(status, &body, "proxy");
        if let Some(rate) = rate {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(rate.reset));
            add_rate_headers(headers, rate);
        }
        if let Some(wait) = retry_after {
            // Whole seconds, rounded up: retrying early would only meet the limit again.
            let seconds = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0));
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Whether every attempt failed on a provider's rate limit (and there was one).
fn all_rate_limited(attempts: &[AttemptFailure]) -> bool {
    !attempts.is_empty() && attempts.iter().all(|a| a.kind == FallbackReason::TooManyRequests)
}

/// A JSON response with the error source header.
pub fn json_response(status: StatusCode, body: &serde_json::Value, source: &'static str) -> Response {
    json_text_response(status, body.to_string(), source)
}

/// [`json_response`] of JSON text.
pub(in crate::sidecar) fn json_text_response(status: StatusCode, body: String, source: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ERROR_SOURCE, HeaderValue::from_static(source));
    response
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the minute's window ends).
pub fn add_rate_headers(headers: &mut http::HeaderMap, rate: RateStatus) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(rate.limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(rate.remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(rate.reset));
}
