//! `sideyard sidecar`: its flags, loading the configuration, the listeners, reloads and the
//! drain at shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::admin::admin_router;
use super::calls::service::{ApiService, api_service};
use super::cluster::fleet::{EndpointOverrides, FleetOptions};
use super::cluster::push::{self, Offer, PushOptions, Served};
use super::observe::{ObserverOptions, Observers};
use super::routing::health;
use super::shared::{Limits, Shared};
use super::state::Source;
use super::upstream::Clients;
use crate::api::units::parse_duration;
use crate::config::{ConfigError, ConfigErrors, Loaded, Sources, load, watch::watch as watch_sources};
use crate::traces::{TraceArgs, Traces};

/// `sideyard sidecar`.
#[derive(clap::Args, Debug)]
pub struct SidecarArgs {
    /// ProviderRoute and Secret YAML files, or directories of them (their *.yaml, *.yml and *.json
    /// files). Repeat the flag, or separate paths with commas.
    #[arg(short = 'f', long = "file", env = "SIDEYARD_FILES", value_delimiter = ',', required = true)]
    pub files: Vec<PathBuf>,

    /// The pod's labels, as the downward API writes them (`key="value"` lines). Routes and budgets
    /// whose `workloadSelector` does not select these labels are left out. Without it, every
    /// selector matches (standalone).
    #[arg(long, env = "SIDEYARD_POD_LABELS_FILE")]
    pub pod_labels_file: Option<PathBuf>,

    /// Address of the OpenAI-compatible API.
    #[arg(long, env = "SIDEYARD_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SIDEYARD_ADMIN_LISTEN", default_value = "127.0.0.1:7701")]
    pub admin_listen: SocketAddr,

    /// How often the files are checked for changes.
    #[arg(long, env = "SIDEYARD_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// On SIGTERM or SIGINT, how long in-flight requests and streams may take to finish.
    #[arg(long, env = "SIDEYARD_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SIDEYARD_MAX_REQUEST_BYTES", default_value_t = 32 << 20)]
    pub max_request_bytes: usize,

    /// Largest non-streamed upstream answer accepted, in bytes.
    #[arg(long, env = "SIDEYARD_MAX_RESPONSE_BYTES", default_value_t = 64 << 20)]
    pub max_response_bytes: usize,

    /// PEM file of extra certificate authorities to trust for upstream TLS, besides the bundled
    /// Mozilla roots (for providers behind a private CA). Read at start.
    #[arg(long, env = "SIDEYARD_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// Refuse requests without a known API key (401) on every route, not only on routes that an
    /// ApiKeyBudget covers.
    #[arg(long, env = "SIDEYARD_REQUIRE_KEY")]
    pub require_key: bool,

    /// Directory of the embedded budget ledger (`ledger.journal`), created when the first
    /// ApiKeyBudget is loaded. One sidecar per directory.
    #[arg(long, env = "SIDEYARD_STATE_DIR", default_value = ".sideyard")]
    pub state_dir: PathBuf,

    /// The operator's budget ledger (`https://…`), overriding the one the compiled configuration
    /// names. With it, budgets are leased from that ledger instead of kept in `--state-dir`.
    #[arg(long, env = "SIDEYARD_LEDGER_URL")]
    pub ledger_url: Option<String>,

    /// PEM certificates to trust for the ledger, overriding the compiled configuration's bundle.
    #[arg(long, env = "SIDEYARD_LEDGER_CA_FILE")]
    pub ledger_ca_file: Option<PathBuf>,

    /// The projected ServiceAccount token (audience `sideyard`) the sidecar presents to the
    /// ledger; re-read as the kubelet rotates it.
    #[arg(long, env = "SIDEYARD_LEDGER_TOKEN_FILE", default_value = "/var/run/secrets/sideyard.dev/token")]
    pub ledger_token_file: PathBuf,

    /// Write one log line per request (log target `sideyard::access`, in the `--log-format`): its
    /// endpoint, model, route, target, attempts, fallback reason, status, latency, tokens, cost,
    /// budget and request id. Never a key or a prompt.
    #[arg(long, env = "SIDEYARD_ACCESS_LOG")]
    pub access_log: bool,

    /// Keep a record of the last N requests for `GET /api/v1/generation?id=` (each about a
    /// kilobyte); 0 keeps none.
    #[arg(long, env = "SIDEYARD_GENERATIONS", default_value_t = 0)]
    pub generations: usize,

    #[command(flatten)]
    pub traces: TraceArgs,

    /// Record each traced request's messages and answer text in its span (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`, at most 64 KiB each). Off by default: prompts and answers often
    /// hold what should not leave the pod.
    #[arg(long, env = "SIDEYARD_TRACE_CONTENT")]
    pub trace_content: bool,
}

/// Why the sidecar stopped.
#[derive(Debug)]
pub enum SidecarError {
    /// The configuration is invalid; nothing was served.
    Config(ConfigErrors),
    /// A listener could not be opened, or the server failed.
    Io(String),
}

/// Loads the configuration, serves until `shutdown` completes (SIGTERM or SIGINT, in the binary),
/// then drains.
pub async fn run(args: SidecarArgs, shutdown: impl Future<Output = ()>) -> Result<(), SidecarError> {
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
    let fleet = FleetOptions {
        url: args.ledger_url.clone(),
        ca_file: args.ledger_ca_file.clone(),
        token_file: args.ledger_token_file.clone(),
    };
    let push = PushOptions {
        overrides: EndpointOverrides::read(&fleet).map_err(|e| flag_error("--ledger-ca-file", e))?,
        token_file: fleet.token_file.clone(),
        labels_file: args.pod_labels_file.clone(),
        check_interval: args.reload_interval,
    };
    let shared =
        Shared::new(&loaded.config, loaded.version, limits, clients, args.require_key, args.state_dir.clone(), fleet)
            .map_err(|e| flag_error("budgets", e))?;
    let mut shared = shared;
    let traces = Traces::start(&args.traces, "sideyard-sidecar", Some(shared.clients.connector()))
        .map_err(|e| flag_error("traces", e))?;
    if args.trace_content && traces.is_none() {
        tracing::warn!("--trace-content has no effect without an OTLP endpoint (--otlp-endpoint)");
    }
    let options = ObserverOptions {
        access_log: args.access_log,
        generations: args.generations,
        trace_content: args.trace_content,
    };
    shared.observers = Observers::new(options, traces);
    let shared = Arc::new(shared);
    tracing::info!(routes = loaded.config.routes.len(), version = loaded.version, files = ?args.files, "configuration loaded");
    warn_if_every_request_is_refused(args.require_key, &loaded.config);
    let served = Arc::new(Served::new(&shared, loaded.version, loaded.config));

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
                shared.states.refresh_stats(health::now());
            }
        })
    };

    let reloader = {
        let (shared, served) = (shared.clone(), served.clone());
        let counter = shared.clone();
        tokio::spawn(watch_sources(
            sources,
            args.reload_interval,
            loaded.fingerprint,
            move |result| apply_reload(&shared, &served, result),
            move || counter.states.source_checks.inc(),
        ))
    };
    // In a cluster, the operator's stream; it waits while the configuration names no ledger.
    let pusher = tokio::spawn(push::follow(shared.clone(), served, push));

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
        () = shutdown => {}
        result = &mut api => {
            reloader.abort();
            refresher.abort();
            pusher.abort();
            return Err(SidecarError::Io(format!("the API server stopped: {result:?}")));
        }
    }
    tracing::info!(drain_timeout = ?args.drain_timeout, "shutting down: draining in-flight requests");
    shared.draining.store(true, Ordering::Relaxed);
    reloader.abort();
    refresher.abort();
    pusher.abort();
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
    if let Some(fleet) = shared.fleet() {
        fleet.close(Duration::from_secs(5)).await;
    }
    if let Some(traces) = shared.observers.as_ref().and_then(|o| o.traces.as_ref()) {
        traces.flush(Duration::from_secs(5)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// `--require-key` refuses every request without a known key: with no ApiKeyBudget, that is all
/// of them, which is rarely what was meant.
fn warn_if_every_request_is_refused(require_key: bool, config: &crate::config::Config) {
    if require_key && config.budgets.is_empty() {
        warn_every_request_refused();
    }
}

fn warn_every_request_refused() {
    tracing::warn!(
        "--require-key is set and the configuration has no ApiKeyBudget: every request will be refused with 401 until one is added"
    );
}

/// A configuration error that comes from a flag rather than the YAML.
fn flag_error(flag: &str, message: String) -> SidecarError {
    SidecarError::Config(ConfigError::input(flag, message).into())
}

fn apply_reload(shared: &Shared, served: &Served, result: Result<Loaded, ConfigErrors>) {
    match result {
        Ok(loaded) => {
            let (routes, budgets) = (loaded.config.routes.len(), loaded.config.budgets.len());
            let none_kept = shared.require_key && budgets == 0;
            match served.offer(shared, Source::Files, loaded.version, loaded.config) {
                Offer::Applied => {
                    shared.states.reloads_ok.inc();
                    shared.states.last_reload_ok.set(1);
                    tracing::info!(routes, budgets, version = loaded.version, "configuration reloaded");
                    if none_kept {
                        warn_every_request_refused();
                    }
                }
                // Read well; the stream brought this version or a newer one first.
                Offer::Unchanged | Offer::Older => {
                    shared.states.reloads_ok.inc();
                    shared.states.last_reload_ok.set(1);
                }
                Offer::Rejected(e) => {
                    shared.states.reloads_failed.inc();
                    shared.states.last_reload_ok.set(0);
                    tracing::error!(error = %e, "configuration rejected; still serving the previous one");
                }
            }
        }
        Err(errors) => {
            shared.states.reloads_failed.inc();
            shared.states.last_reload_ok.set(0);
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
async fn serve_api(listener: TcpListener, app: ApiService, stop: impl Future<Output = ()>) -> std::io::Result<()> {
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
