//! The admin port: liveness, readiness and metrics.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};

use super::metrics;
use super::routing::health;
use super::shared::Shared;

/// Health, readiness and metrics.
pub fn admin_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(exposition))
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    // A sidecar exists only once a configuration is loaded; it stops being ready when it drains.
    if shared.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

async fn exposition(State(shared): State<Arc<Shared>>) -> Response {
    let text = metrics::render(&shared, health::now());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
