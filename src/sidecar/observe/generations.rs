//! The last requests a sidecar served (`--generations N`), and `GET /api/v1/generation?id=` to
//! look one up in OpenRouter's shape: its provider, model, tokens, cost, latency, attempts and
//! finish reason.
//!
//! A record is found by the id in the `x-sideyard-generation-id` response header or by the
//! answer's own `id`, and only by a caller with the key that made the request (or, for a request
//! made without a key, by a caller without one): another key's records are not found, as if they
//! did not exist. Memory is bounded: the oldest record makes room for the newest.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::Response;
use serde::Serialize;
use serde_json::value::RawValue;

use super::Exchange;
use crate::api::units::format_micros;
use crate::budget::period::rfc3339;
use crate::sidecar::billing::{caller_key, key_hash};
use crate::sidecar::calls::error::{ProxyError, json_text_response};
use crate::sidecar::shared::Shared;

pub struct Generations {
    capacity: usize,
    records: Mutex<VecDeque<Box<Exchange>>>,
}

impl Generations {
    pub fn new(capacity: usize) -> Self {
        Generations { capacity, records: Mutex::new(VecDeque::with_capacity(capacity.min(4096))) }
    }

    /// Keeps a finished record, forgetting the oldest when full.
    pub fn keep(&self, record: Box<Exchange>) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest is dropped after the lock is released.
        let oldest = (records.len() >= self.capacity).then(|| records.pop_front()).flatten();
        records.push_back(record);
        drop(records);
        drop(oldest);
    }

    /// The record `id` made with the key whose hash is `key` (`None`: without a key), as
    /// OpenRouter's generation JSON.
    fn find(&self, id: &str, key: Option<[u8; 32]>) -> Option<String> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let found =
            records.iter().rev().find(|r| r.key_hash == key && (r.id == id || r.answer_id.as_deref() == Some(id)))?;
        Some(generation_json(found))
    }
}

/// `GET /api/v1/generation?id=<id>`.
pub async fn generation(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let Some(generations) = shared.observers.as_ref().and_then(|o| o.generations.as_ref()) else {
        return ProxyError::GenerationsOff.into_response();
    };
    let Some(id) = query_id(request.uri().query().unwrap_or_default()) else {
        let message = "Name the generation: GET /api/v1/generation?id=<id>, with the id of the answer or of its x-sideyard-generation-id header.";
        return ProxyError::BadRequest { code: "missing_id", message: message.into() }.into_response();
    };
    let key = caller_key(request.headers()).map(key_hash);
    match generations.find(id, key) {
        Some(body) => json_text_response(http::StatusCode::OK, format!(r#"{{"data":{body}}}"#), "proxy"),
        None => ProxyError::GenerationNotFound { id: id.to_string() }.into_response(),
    }
}

/// The `id` parameter of a query string. Ids are letters, digits, `-` and `_`, which need no
/// decoding; anything else cannot name a record and is not found.
fn query_id(query: &str) -> Option<&str> {
    query.split('&').find_map(|pair| pair.strip_prefix("id=")).filter(|id| !id.is_empty())
}

#[derive(Serialize)]
struct Generation<'a> {
    id: &'a str,
    upstream_id: Option<&'a str>,
    total_cost: Option<Box<RawValue>>,
    usage: Option<Box<RawValue>>,
    created_at: String,
    /// The model of the route that answered, as the caller names it.
    model: Option<&'a str>,
    provider_name: Option<&'a str>,
    streamed: bool,
    cancelled: bool,
    /// Milliseconds to the first byte of the answer (a stream's first token).
    latency: Option<u64>,
    /// Milliseconds to the end of the answer.
    generation_time: u64,
    finish_reason: Option<&'a str>,
    native_finish_reason: Option<&'a str>,
    tokens_prompt: Option<u64>,
    tokens_completion: Option<u64>,
    native_tokens_prompt: Option<u64>,
    native_tokens_completion: Option<u64>,
    native_tokens_cached: Option<u64>,
    /// Each attempt, in the order they started.
    provider_responses: Vec<ProviderResponse<'a>>,
    /// What only Sideyard knows.
    sideyard: Own<'a>,
}

#[derive(Serialize)]
struct ProviderResponse<'a> {
    provider_name: &'a str,
    model: &'a str,
    target: &'a str,
    route: &'a str,
    status: Option<u16>,
    /// Why it failed; none for the attempt that answered.
    reason: Option<&'a str>,
    hedge: bool,
    latency: Option<u64>,
}

#[derive(Serialize)]
struct Own<'a> {
    route: Option<&'a str>,
    target: Option<&'a str>,
    provider_model: Option<&'a str>,
    endpoint: &'a str,
    status: u16,
    attempts: usize,
    fallback_reason: Option<&'a str>,
    hedged: bool,
    /// How the answer ended: `answered`, `caller_left`, or the error code a stream broke with.
    end: &'a str,
    usage_estimated: bool,
    budget: Option<&'a str>,
    request_id: Option<&'a str>,
}

fn generation_json(x: &Exchange) -> String {
    let target = x.target();
    let usage = x.usage.as_ref();
    // Money as exact decimal text, never a float.
    let money = |m: u64| RawValue::from_string(format_micros(m)).ok();
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let created = x.created.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let record = Generation {
        id: &x.id,
        upstream_id: x.answer_id.as_deref(),
        total_cost: x.cost.and_then(money),
        usage: x.cost.and_then(money),
        created_at: rfc3339(created),
        model: x.route().map(|r| r.model.as_str()),
        provider_name: target.map(|t| t.provider.as_str()),
        streamed: x.streamed,
        cancelled: x.end == super::End::CallerLeft,
        latency: x.first_byte.map(millis),
        generation_time: millis(x.duration),
        finish_reason: x.finish_reason.as_deref(),
        native_finish_reason: x.finish_reason.as_deref(),
        tokens_prompt: usage.map(|u| u.prompt),
        tokens_completion: usage.map(|u| u.completion),
        native_tokens_prompt: usage.map(|u| u.prompt),
        native_tokens_completion: usage.map(|u| u.completion),
        native_tokens_cached: usage.map(|u| u.cached_prompt),
        provider_responses: x
            .tries
            .iter()
            .map(|t| {
                let target = t.target();
                ProviderResponse {
                    provider_name: &target.provider,
                    model: &target.model,
                    target: &target.name,
                    route: &t.route.id,
                    status: match t.failure {
                        Some((_, status)) => status,
                        None if t.cancelled => None,
                        None => Some(x.status),
                    },
                    reason: match t.failure {
                        Some((reason, _)) => Some(reason.as_str()),
                        None if t.cancelled => Some("cancelled"),
                        None => None,
                    },
                    hedge: t.hedge,
                    latency: t.ended.map(|end| millis(end.saturating_sub(t.started))),
                }
            })
            .collect(),
        sideyard: Own {
            route: x.route().map(|r| r.id.as_str()),
            target: target.map(|t| t.name.as_str()),
            provider_model: target.map(|t| t.model.as_str()),
            endpoint: &x.path,
            status: x.status,
            attempts: x.attempts,
            fallback_reason: x.fallback.map(|r| r.as_str()),
            hedged: x.hedged,
            end: x.end.as_str(),
            usage_estimated: x.estimated,
            budget: x.budget.as_deref(),
            request_id: x.request_id.as_deref(),
        },
    };
    serde_json::to_string(&record).unwrap_or_else(|_| "null".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_parameter_is_read_from_any_place_in_the_query() {
        assert_eq!(query_id("id=gen-1"), Some("gen-1"));
        assert_eq!(query_id("x=1&id=chatcmpl-2&y=3"), Some("chatcmpl-2"));
        assert_eq!(query_id("id="), None);
        assert_eq!(query_id("identity=1"), None);
        assert_eq!(query_id(""), None);
    }
}
