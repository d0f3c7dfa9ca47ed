//! The API's service: what each request of the OpenAI and Anthropic APIs goes to.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::{get, post};

use super::count_tokens::count_tokens;
use super::endpoint::Endpoint;
use super::error::ProxyError;
use super::key_info::key_info;
use super::models::{model, models};
use super::passthrough::passthrough;
use super::proxy::{self, unrouted};
use crate::sidecar::observe::generations::generation;
use crate::sidecar::shared::Shared;

/// The OpenAI-compatible API, as served: see [`ApiService`].
pub fn api_service(shared: Arc<Shared>) -> ApiService {
    ApiService { router: api_router(shared.clone()), shared }
}

const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

/// The API's service: `POST /v1/chat/completions`, nearly every request a sidecar serves, goes
/// straight to its handler; everything else goes through the router, which also owns that path
/// for its other methods (405). Matching the one hot call by hand skips axum's per-request
/// routing, extension map and boxed futures, about 6% of a request's instructions
/// (docs/benchmarks.md).
#[derive(Clone)]
pub struct ApiService {
    shared: Arc<Shared>,
    router: Router,
}

type ApiFuture = std::pin::Pin<Box<dyn Future<Output = Result<Response, std::convert::Infallible>> + Send>>;

impl<B> hyper::service::Service<http::Request<B>> for ApiService
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = ApiFuture;

    fn call(&self, request: http::Request<B>) -> ApiFuture {
        let request = request.map(axum::body::Body::new);
        if request.method() == http::Method::POST && request.uri().path() == CHAT_COMPLETIONS {
            let shared = self.shared.clone();
            Box::pin(async move { Ok(proxy::chat_completions(axum::extract::State(shared), request).await) })
        } else {
            let mut router = self.router.clone();
            Box::pin(async move {
                use tower_service::Service;
                std::future::poll_fn(|cx| Service::<axum::extract::Request>::poll_ready(&mut router, cx)).await?;
                router.call(request).await
            })
        }
    }
}

/// Every route of the API.
fn api_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(CHAT_COMPLETIONS, post(proxy::chat_completions))
        .route(Endpoint::Messages.path(), post(proxy::messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route(Endpoint::Responses.path(), post(proxy::responses))
        .route(Endpoint::Completions.path(), post(proxy::completions))
        .route(Endpoint::Embeddings.path(), post(proxy::embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/api/v1/key", get(key_info))
        .route("/api/v1/generation", get(generation))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(passthrough)
        .with_state(shared)
}

/// A known path with another method. Under `/v1/` the provider may serve it (`GET
/// /v1/chat/completions` lists stored completions): passed through, as any other call.
async fn method_not_allowed(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if request.uri().path().starts_with("/v1/") {
        return passthrough(State(shared), request).await;
    }
    unrouted(&shared, ProxyError::MethodNotAllowed)
}
