//! `GET /v1/models`: every model name served, with its route's targets and their health.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::header;

use super::health;
use super::shared::Shared;

/// `GET /v1/models`: every model name served, in OpenAI's list shape, each with its route's
/// targets, their health and recent performance under `switchyard`.
pub async fn models(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.snapshot.load();
    let now = health::now();
    let mut data = Vec::new();
    for route in &snapshot.routes {
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
        let info = serde_json::json!({"route": route.id, "strategy": route.strategy.as_str(), "targets": targets});
        for name in std::iter::once(&route.model).chain(&route.aliases) {
            data.push(serde_json::json!({
                "id": name, "object": "model", "created": 0, "owned_by": "switchyard", "switchyard": info,
            }));
        }
    }
    let body = serde_json::json!({"object": "list", "data": data}).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
