//! `GET /v1/models` and `GET /v1/models/{id}`: every model name served, with what its route serves,
//! on which endpoints, and its targets with their health.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::header;

use super::endpoint::Endpoint;
use super::error::ProxyError;
use super::proxy::unrouted;
use crate::sidecar::routing::health::{self, Ticks};
use crate::sidecar::shared::Shared;
use crate::sidecar::snapshot::ServedRoute;

/// Every endpoint a route may be served on.
const ENDPOINTS: [Endpoint; 5] =
    [Endpoint::Chat, Endpoint::Messages, Endpoint::Responses, Endpoint::Completions, Endpoint::Embeddings];

/// `GET /v1/models`: every model name served, in OpenAI's list shape.
pub async fn models(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.snapshot.load();
    let now = health::now();
    let mut data = Vec::new();
    for route in &snapshot.routes {
        let info = route_info(route, now);
        for name in std::iter::once(&route.model).chain(&route.aliases) {
            data.push(model_object(name, &info));
        }
    }
    json(serde_json::json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one model name, or 404.
pub async fn model(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let snapshot = shared.snapshot.load();
    match snapshot.route(&id) {
        Some(route) => json(model_object(&id, &route_info(route, health::now()))),
        None => unrouted(&shared, ProxyError::UnknownModel { model: id, known: snapshot.known_models() }),
    }
}

/// A model in OpenAI's shape, with the route's details under `sideyard`.
fn model_object(name: &str, info: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": "sideyard", "sideyard": info})
}

/// What a route serves and on which endpoints, and its targets, their health and recent
/// performance.
fn route_info(route: &ServedRoute, now: Ticks) -> serde_json::Value {
    let targets: Vec<serde_json::Value> = route
        .targets
        .iter()
        .map(|t| {
            let stats = &t.state.stats;
            serde_json::json!({
                "name": t.name,
                "provider": t.provider,
                "health": t.state.health.admission(now).name(),
                "time_to_first_token_p50_ms": stats.ttft_p50().map(|d| d.as_millis()),
                "output_tokens_per_second_p50": stats.throughput_p50().map(|v| v / 1000),
            })
        })
        .collect();
    // An endpoint serves the route if some target's API can take its requests.
    let endpoints: Vec<&str> = ENDPOINTS
        .iter()
        .filter(|e| {
            e.serves() == route.serves
                && route.targets.iter().any(|t| e.upstream(t.format, t.native_responses).is_some())
        })
        .map(|e| e.path())
        .collect();
    serde_json::json!({
        "route": route.id,
        "serves": route.serves.as_str(),
        "endpoints": endpoints,
        "strategy": route.strategy.as_str(),
        "targets": targets,
    })
}

fn json(body: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}
