//! The mutating admission webhook: `POST /mutate-pods` answers an AdmissionReview for a pod with
//! the JSON Patch that [`inject`] implies.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{StatusCode, header};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};

use super::inject::{InjectParams, Injection, inject};
use super::metrics::OperatorMetrics;

pub struct Webhook {
    pub params: InjectParams,
    pub metrics: Arc<OperatorMetrics>,
}

pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new().route("/mutate-pods", post(mutate_pods)).with_state(webhook)
}

async fn mutate_pods(State(webhook): State<Arc<Webhook>>, body: Bytes) -> Response {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not an AdmissionReview: {e}\n")).into_response(),
    };
    let request: Result<AdmissionRequest<Pod>, _> = review.try_into();
    let response = match request {
        Ok(request) => review_pod(&webhook, &request),
        Err(e) => AdmissionResponse::invalid(e),
    };
    let review: AdmissionReview<DynamicObject> = response.into_review();
    // A review is plain data: serialising it cannot fail.
    let json = serde_json::to_vec(&review).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// Always allows the pod; adds the patch when it gets a sidecar, or refuses it when an annotation
/// is unusable.
fn review_pod(webhook: &Webhook, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(pod) = &request.object else { return response };
    let name = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or_default();
    match inject(pod, &webhook.params) {
        Ok(Injection::Injected(injected)) => {
            let before = serde_json::to_value(pod).unwrap_or_default();
            let after = serde_json::to_value(&injected).unwrap_or_default();
            match response.with_patch(json_patch::diff(&before, &after)) {
                Ok(response) => {
                    webhook.metrics.injection("injected");
                    tracing::info!(namespace = %request.namespace.as_deref().unwrap_or_default(), pod = %name, "injected the sidecar");
                    response
                }
                Err(e) => AdmissionResponse::from(request).deny(format!("cannot encode the patch: {e}")),
            }
        }
        Ok(Injection::Skipped(reason)) => {
            webhook.metrics.injection("skipped");
            tracing::debug!(pod = %name, reason, "not injected");
            response
        }
        Err(message) => {
            webhook.metrics.injection("refused");
            tracing::info!(pod = %name, detail = %message, "refused a pod");
            response.deny(message)
        }
    }
}
