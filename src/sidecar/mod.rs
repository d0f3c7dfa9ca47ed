//! The sidecar: an OpenAI-compatible API on localhost that routes each call to a provider.

mod attempt;
mod billing;
mod error;
mod h1;
mod health;
mod metrics;
pub mod plan;
mod proxy;
mod relay;
mod state;
mod stats;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use relay::SseFramer;
pub use state::{Limits, Shared};
pub use upstream::Clients;

use crate::api::BudgetState;
use crate::api::units::{format_micros, parse_duration};
use crate::config::{ConfigError, ConfigErrors, Loaded, Sources, load, watch::watch as watch_sources};

/// `switchyard sidecar`.
#[derive(clap::Args, Debug)]
pub struct SidecarArgs {
    /// ProviderRoute and Secret YAML files, or directories of them (their *.yaml, *.yml and *.json
    /// files). Repeat the flag, or separate paths with commas.
    #[arg(short = 'f', long = "file", env = "SWITCHYARD_FILES", value_delimiter = ',', required = true)]
    pub files: Vec<PathBuf>,

    /// The pod's labels, as the downward API writes them (`key="value"` lines). Routes and budgets
    /// whose `workloadSelector` does not select these labels are left out. Without it, every
    /// selector matches (standalone).
    #[arg(long, env = "SWITCHYARD_POD_LABELS_FILE")]
    pub pod_labels_file: Option<PathBuf>,

    /// Address of the OpenAI-compatible API.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SWITCHYARD_ADMIN_LISTEN", default_value = "127.0.0.1:7701")]
    pub admin_listen: SocketAddr,

    /// How often the files are checked for changes.
    #[arg(long, env = "SWITCHYARD_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// On SIGTERM or SIGINT, how long in-flight requests and streams may take to finish.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_REQUEST_BYTES", default_value_t = 32 << 20)]
    pub max_request_bytes: usize,

    /// Largest non-streamed upstream answer accepted, in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_RESPONSE_BYTES", default_value_t = 64 << 20)]
    pub max_response_bytes: usize,

    /// PEM file of extra certificate authorities to trust for upstream TLS, besides the bundled
    /// Mozilla roots (for providers behind a private CA). Read at start.
    #[arg(long, env = "SWITCHYARD_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// Refuse requests without a known API key (401) on every route, not only on routes that an
    /// ApiKeyBudget covers.
    #[arg(long, env = "SWITCHYARD_REQUIRE_KEY")]
    pub require_key: bool,

    /// Directory of the embedded budget ledger (`ledger.journal`), created when the first
    /// ApiKeyBudget is loaded. One sidecar per directory.
    #[arg(long, env = "SWITCHYARD_STATE_DIR", default_value = ".switchyard")]
    pub state_dir: PathBuf,
}

/// Why the sidecar stopped.
#[derive(Debug)]
pub enum SidecarError {
    /// The configuration is invalid; nothing was served.
    Config(ConfigErrors),
    /// A listener could not be opened, or the server failed.
    Io(String),
}

/// Loads the configuration, serves until SIGTERM or SIGINT, then drains.
pub async fn run(args: SidecarArgs) -> Result<(), SidecarError> {
    let sources = Sources { paths: args.files.clone(), pod_labels_file: args.pod_labels_file.clone() };
    let loaded = {
        let sources = sources.clone();
        tokio::task::spawn_blocking(move || load(&sources))
            .await
            .map_err(|e| SidecarError::Io(format!("loading the configuration failed: {e}")))?
            .map_err(SidecarError::Config)?
    };
    let clients = Clients::new(args.upstream_ca_file.as_deref()).map_err(|e| flag_error("--upstream-ca-file", e))?;
    let limits = Limits { max_request_bytes: args.max_request_bytes, max_response_bytes: args.max_response_bytes };
    let shared = Shared::new(&loaded.config, limits, clients, args.require_key, args.state_dir.clone())
        .map_err(|e| flag_error("--state-dir", e))?;
    let shared = Arc::new(shared);
    shared.metrics.config_version.set(loaded.version.unwrap_or(0));
    tracing::info!(routes = loaded.config.routes.len(), version = loaded.version, files = ?args.files, "configuration loaded");

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|e| SidecarError::Io(format!("cannot listen on {addr}: {e}")))
    };
    let api_listener = bind(args.listen).await?;
    let admin_listener = bind(args.admin_listen).await?;
    let api_addr = api_listener.local_addr().map_err(|e| SidecarError::Io(e.to_string()))?;
    let admin_addr = admin_listener.local_addr().map_err(|e| SidecarError::Io(e.to_string()))?;

    // Strategies read cached quantiles; recomputing them once a second keeps that off requests.
    let refresher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                shared.metrics.refresh_stats(health::now());
            }
        })
    };

    let reloader = {
        let shared = shared.clone();
        tokio::spawn(watch_sources(sources, args.reload_interval, loaded.fingerprint, move |result| {
            apply_reload(&shared, result)
        }))
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let api = serve_api(api_listener, api_service(shared.clone()), stopped(stop_rx.clone()));
    let mut api = tokio::spawn(api);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin =
        axum::serve(admin_listener, admin_router(shared.clone())).with_graceful_shutdown(stopped(admin_stop_rx));
    let admin = tokio::spawn(async move { admin.await });
    tracing::info!(api = %api_addr, admin = %admin_addr, "serving");

    tokio::select! {
        _ = crate::cli::shutdown_signal() => {}
        result = &mut api => {
            reloader.abort();
            refresher.abort();
            return Err(SidecarError::Io(format!("the API server stopped: {result:?}")));
        }
    }
    tracing::info!(drain_timeout = ?args.drain_timeout, "shutting down: draining in-flight requests");
    shared.draining.store(true, Ordering::Relaxed);
    reloader.abort();
    refresher.abort();
    let _ = stop_tx.send(true);
    if tokio::time::timeout(args.drain_timeout, &mut api).await.is_err() {
        tracing::warn!("drain timeout reached; closing the remaining connections");
        api.abort();
    }
    let _ = admin_stop_tx.send(true);
    let _ = admin.await;
    if let Some(ledger) = shared.ledger() {
        ledger.close();
    }
    tracing::info!("stopped");
    Ok(())
}

/// A configuration error that comes from a flag rather than the YAML.
fn flag_error(flag: &str, message: String) -> SidecarError {
    SidecarError::Config(ConfigError::input(flag, message).into())
}

fn apply_reload(shared: &Shared, result: Result<Loaded, ConfigErrors>) {
    match result {
        Ok(loaded) => match shared.apply(&loaded.config) {
            Ok(()) => {
                shared.metrics.reloads_ok.inc();
                shared.metrics.last_reload_ok.set(1);
                shared.metrics.config_version.set(loaded.version.unwrap_or(0));
                tracing::info!(
                    routes = loaded.config.routes.len(),
                    budgets = loaded.config.budgets.len(),
                    version = loaded.version,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                shared.metrics.reloads_failed.inc();
                shared.metrics.last_reload_ok.set(0);
                tracing::error!(error = %e, "configuration rejected; still serving the previous one");
            }
        },
        Err(errors) => {
            shared.metrics.reloads_failed.inc();
            shared.metrics.last_reload_ok.set(0);
            for e in &errors.0 {
                tracing::error!(error = %e, "configuration rejected; still serving the previous one");
            }
        }
    }
}

/// Serves the API until `stop` completes, then waits for the connections in flight to finish.
///
/// Like `axum::serve`, with the connection settings a sidecar needs: TCP_NODELAY, and read buffers
/// capped at 8 KiB so that a thousand open streams stay cheap (hyper would grow them to 16 KiB).
async fn serve_api(listener: TcpListener, app: Api, stop: impl Future<Output = ()>) -> std::io::Result<()> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().max_buf_size(8 * 1024);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = tcp.set_nodelay(true);
        let connection =
            builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), app.clone()).into_owned();
        tokio::spawn(graceful.watch(connection));
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The OpenAI-compatible API, as served: see [`Api`].
pub fn api_service(shared: Arc<Shared>) -> Api {
    Api { router: api_router(shared.clone()), shared }
}

const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

/// The API's service: `POST /v1/chat/completions`, nearly every request a sidecar serves, goes
/// straight to its handler; everything else goes through the router, which also owns that path
/// for its other methods (405). Matching the one hot call by hand skips axum's per-request
/// routing, extension map and boxed futures, about 6% of a request's instructions
/// (docs/benchmarks.md).
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
    router: Router,
}

type ApiFuture = std::pin::Pin<Box<dyn Future<Output = Result<Response, std::convert::Infallible>> + Send>>;

impl<B> hyper::service::Service<http::Request<B>> for Api
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
        .route("/v1/models", get(models))
        .route("/api/v1/key", get(key_info))
        .method_not_allowed_fallback(proxy::method_not_allowed)
        .fallback(proxy::unknown_path)
        .with_state(shared)
}

/// Health, readiness and metrics.
pub fn admin_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(axum::extract::State(shared): axum::extract::State<Arc<Shared>>) -> Response {
    // A sidecar exists only once a configuration is loaded; it stops being ready when it drains.
    if proxy::is_ready(&shared) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

async fn metrics(axum::extract::State(shared): axum::extract::State<Arc<Shared>>) -> Response {
    let mut text = shared.metrics.render(health::now());
    render_budgets(&shared, &mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Per-budget metrics, from the ledger.
fn render_budgets(shared: &Shared, out: &mut String) {
    use std::fmt::Write;
    let Some(ledger) = shared.ledger() else { return };
    let snapshot = shared.snapshot.load();
    let mut budgets: Vec<_> = snapshot.budgets().collect();
    budgets.sort_by(|a, b| a.id.cmp(&b.id));
    let now = ledger.now();
    let h = crate::metrics::header;
    h(out, "switchyard_budget_spent", "gauge", "Credits spent in the current period.");
    for b in &budgets {
        let spend = b.account.view(b.period, now);
        let _ = writeln!(out, "switchyard_budget_spent{{budget=\"{}\"}} {}", b.id, format_micros(spend.spent));
    }
    h(out, "switchyard_budget_remaining", "gauge", "Credits left in the current period (budgets with a limit).");
    for b in &budgets {
        if let Some(left) = b.remaining(&b.account.view(b.period, now)) {
            let _ = writeln!(out, "switchyard_budget_remaining{{budget=\"{}\"}} {}", b.id, format_micros(left));
        }
    }
    h(out, "switchyard_budget_state", "gauge", "1 for the budget's state: Active, Low or Exhausted.");
    for b in &budgets {
        let state = b.state(&b.account.view(b.period, now));
        for s in [BudgetState::Active, BudgetState::Low, BudgetState::Exhausted] {
            let _ = writeln!(
                out,
                "switchyard_budget_state{{budget=\"{}\",state=\"{}\"}} {}",
                b.id,
                s.as_str(),
                u8::from(s == state)
            );
        }
    }
    type Read = fn(&crate::budget::Account) -> u64;
    let counters: [(&str, &str, Read); 4] = [
        ("switchyard_budget_reservations_in_flight", "Reservations held by requests in flight.", |a| {
            a.in_flight.load(Ordering::Relaxed)
        }),
        ("switchyard_budget_insufficient_credits_total", "Requests refused with 402.", |a| a.refused.get()),
        ("switchyard_budget_rate_limited_total", "Requests refused with 429 by the key's rate limit.", |a| {
            a.rate_limited.get()
        }),
        (
            "switchyard_budget_estimated_costs_total",
            "Answers billed on an estimate: the provider reported no usage.",
            |a| a.estimated.get(),
        ),
    ];
    for (name, help, value) in counters {
        h(out, name, if name.ends_with("_total") { "counter" } else { "gauge" }, help);
        for b in &budgets {
            let _ = writeln!(out, "{name}{{budget=\"{}\"}} {}", b.id, value(&b.account));
        }
    }
    h(out, "switchyard_ledger_available", "gauge", "1 while the ledger can record spend durably.");
    let _ = writeln!(out, "switchyard_ledger_available {}", u8::from(ledger.is_available()));
}

/// `GET /api/v1/key`: the caller's key in OpenRouter's shape; credits as decimal numbers.
async fn key_info(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    request: axum::extract::Request,
) -> Response {
    let snapshot = shared.snapshot.load();
    let budget = billing::bearer(request.headers()).and_then(|key| snapshot.budget(&billing::key_hash(key)));
    let (Some(budget), Some(ledger)) = (budget, shared.ledger()) else {
        let missing = billing::bearer(request.headers()).is_none();
        return error::ProxyError::Unauthorized { missing }.into_response();
    };
    let spend = budget.account.view(budget.period, ledger.now());
    let number = |micros: Option<u64>| micros.map_or_else(|| "null".to_string(), format_micros);
    let reset = match budget.period {
        crate::api::Period::Never => "null".to_string(),
        p => format!("\"{}\"", p.as_str()),
    };
    // Written by hand so the credit amounts stay exact decimals, never floats.
    let body = format!(
        r#"{{"data":{{"label":{label},"limit":{limit},"limit_reset":{reset},"limit_remaining":{remaining},"usage":{usage},"usage_daily":{daily},"usage_weekly":{weekly},"usage_monthly":{monthly},"is_free_tier":false,"state":"{state}","period_start":"{start}"}}}}"#,
        label = serde_json::Value::from(budget.id.as_str()),
        limit = number(budget.limit),
        remaining = number(budget.remaining(&spend)),
        usage = format_micros(spend.total),
        daily = format_micros(spend.day),
        weekly = format_micros(spend.week),
        monthly = format_micros(spend.month),
        state = budget.state(&spend).as_str(),
        start = crate::budget::period::rfc3339(spend.period_start),
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /v1/models`: every model name served, in OpenAI's list shape, each with its route's
/// targets, their health and recent performance under `switchyard`.
async fn models(axum::extract::State(shared): axum::extract::State<Arc<Shared>>) -> Response {
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
                    "health": metrics::health_state(t.state.health.admission(now)),
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
