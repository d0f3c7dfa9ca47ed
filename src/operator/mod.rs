//! `sideyard operator`: compiles each namespace's ProviderRoutes, ApiKeyBudgets and the Secrets
//! they refer to into the `sideyard-config` Secret its sidecars mount, and reports on every
//! object in its status and in events. See docs/operator.md.

pub mod controller;
pub mod events;
pub mod inject;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod outages;
pub mod plan;
pub mod push;
pub mod tls;
pub mod webhook;

use crate::traces::{TraceArgs, Traces};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use http::{StatusCode, header};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::{Api, Client, CustomResourceExt, Resource};
use tokio::net::TcpListener;

use self::controller::{
    Context, SidecarLedger, Stores, controller, error_policy, generation, reconcile, resource_version, secret_matters,
    triggers,
};
use self::events::Events;
use self::inject::InjectArgs;
use self::leader::{Elector, Leadership, LeaseSettings};
use self::ledger::{FleetService, KubeReviewer, KubeStatusStore};
use self::metrics::OperatorMetrics;
use self::outages::Outages;
use self::push::{ConfigHub, ConfigPush, Connections, KubePods};
use self::tls::{CertSource, CertStore, TlsSettings};
use self::webhook::Webhook;
use crate::api::units::parse_duration;
use crate::api::{ApiKeyBudget, ProviderRoute};

/// `sideyard operator`.
#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SIDEYARD_ADMIN_LISTEN", default_value = "0.0.0.0:7801")]
    pub admin_listen: SocketAddr,

    /// Elect one leader among the replicas through a Lease; only the leader writes. Turn off only
    /// when exactly one replica runs.
    #[arg(long, env = "SIDEYARD_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Name of the coordination.k8s.io Lease the replicas elect a leader with.
    #[arg(long, env = "SIDEYARD_LEASE_NAME", default_value = "sideyard-operator")]
    pub lease_name: String,

    /// Namespace of the Lease. Default: the operator's own namespace (from its service account,
    /// or the kubeconfig context).
    #[arg(long, env = "SIDEYARD_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's identity in the Lease; must differ between replicas. Default: the host name
    /// (the pod name in a cluster).
    #[arg(long, env = "SIDEYARD_IDENTITY")]
    pub identity: Option<String>,

    /// How long a Lease stays valid without renewal before another replica may take it.
    #[arg(long, env = "SIDEYARD_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How long the leader keeps writing without a successful renewal; shorter than the lease
    /// duration, so that no two replicas write at once.
    #[arg(long, env = "SIDEYARD_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,

    /// How often the Lease is renewed, or tried for by the other replicas.
    #[arg(long, env = "SIDEYARD_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,

    /// Serve the sidecar injection webhook (`POST /mutate-pods`, HTTPS).
    #[arg(long, env = "SIDEYARD_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook: bool,

    /// Address of the injection webhook.
    #[arg(long, env = "SIDEYARD_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub webhook_listen: SocketAddr,

    /// The webhook's Service (in the operator's namespace): the certificate is issued for its DNS
    /// names.
    #[arg(long, env = "SIDEYARD_WEBHOOK_SERVICE", default_value = "sideyard-webhook")]
    pub webhook_service: String,

    /// The Secret (in the operator's namespace) where the leader keeps the webhook's CA and
    /// certificate.
    #[arg(long, env = "SIDEYARD_WEBHOOK_SECRET", default_value = "sideyard-webhook-tls")]
    pub webhook_secret: String,

    /// The MutatingWebhookConfiguration whose caBundle the leader keeps current.
    #[arg(long, env = "SIDEYARD_WEBHOOK_CONFIGURATION", default_value = "sideyard")]
    pub webhook_configuration: String,

    /// Read the webhook's certificate from `tls.crt` and `tls.key` in this directory (for
    /// cert-manager) instead of managing it; they are reloaded when they change.
    #[arg(long, env = "SIDEYARD_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<std::path::PathBuf>,

    /// How often the webhook certificate is checked for renewal (and, from files, for changes).
    #[arg(long, env = "SIDEYARD_WEBHOOK_CERT_CHECK", default_value = "1h", value_parser = parse_duration)]
    pub webhook_cert_check: Duration,

    /// Serve the fleet's budget ledger to sidecars (HTTPS, HTTP/2), with the webhook's
    /// certificate; only the leader grants.
    #[arg(long, env = "SIDEYARD_LEDGER", default_value_t = true, action = clap::ArgAction::Set)]
    pub ledger: bool,

    /// Address of the budget ledger.
    #[arg(long, env = "SIDEYARD_LEDGER_LISTEN", default_value = "0.0.0.0:8444")]
    pub ledger_listen: SocketAddr,

    /// This replica's own ledger URL, which the leader writes on the Lease so that the other
    /// replicas can name it to sidecars that reach them. Default: `https://<POD_IP>:<port>`
    /// when the POD_IP variable is set (the chart sets it).
    #[arg(long, env = "SIDEYARD_LEDGER_URL")]
    pub ledger_url: Option<String>,

    /// The URL sidecars reach the ledger at, written with the CA into every namespace's
    /// configuration that has budgets. Default:
    /// `https://<webhook-service>.<operator namespace>.svc:<ledger port>`.
    #[arg(long, env = "SIDEYARD_LEDGER_SERVICE_URL")]
    pub ledger_service_url: Option<String>,

    #[command(flatten)]
    pub inject: InjectArgs,

    #[command(flatten)]
    pub traces: TraceArgs,
}

/// Why the operator stopped.
#[derive(Debug)]
pub enum OperatorError {
    /// A flag is invalid.
    Usage(String),
    /// It could not start, or stopped because of a failure.
    Failed(String),
}

/// Secrets that never hold credentials, left out of the watch to save memory.
const IGNORED_SECRETS: &str = "type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1";

/// Runs the operator until `signal` completes (SIGTERM, in the binary), or until it loses its
/// lease.
pub async fn run(args: OperatorArgs, signal: impl Future<Output = ()>) -> Result<(), OperatorError> {
    if args.leader_elect && !(args.retry_period < args.renew_deadline && args.renew_deadline < args.lease_duration) {
        return Err(OperatorError::Usage(
            "--retry-period must be shorter than --renew-deadline, and --renew-deadline shorter than --lease-duration"
                .into(),
        ));
    }
    let inject_params = args.inject.params().map_err(OperatorError::Usage)?;
    let client = Client::try_default().await.map_err(|e| {
        OperatorError::Failed(format!(
            "cannot configure a Kubernetes client (no kubeconfig, and not in a cluster?): {e}"
        ))
    })?;
    check_crds(&client).await?;
    // Reconciles and ledger calls are traced when an OTLP endpoint is configured.
    if let Some(traces) = Traces::start(&args.traces, "sideyard-operator", None).map_err(OperatorError::Usage)? {
        Traces::set_global(traces);
    }

    let metrics = Arc::new(OperatorMetrics::default());
    let identity = args.identity.clone().unwrap_or_else(hostname);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shutdown = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let ledger_url = args.ledger.then(|| {
        args.ledger_url.clone().or_else(|| {
            let ip = std::env::var("POD_IP").ok().filter(|ip| !ip.is_empty())?;
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
            Some(format!("https://{host}:{}", args.ledger_listen.port()))
        })
    });
    let (leadership, election, leader_url) = if args.leader_elect {
        let settings = LeaseSettings {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_string()),
            identity: identity.clone(),
            lease_duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
            ledger_url: ledger_url.clone().flatten(),
        };
        tracing::info!(lease = %settings.name, namespace = %settings.namespace, %identity, "joining the leader election");
        let (elector, leadership) =
            Elector::new(Api::<Lease>::namespaced(client.clone(), &settings.namespace), settings);
        let leader_url = elector.leader_url();
        (leadership, Some(tokio::spawn(elector.run(shutdown()))), leader_url)
    } else {
        (Leadership::fixed(true), None, tokio::sync::watch::channel(ledger_url.clone().flatten()).1)
    };
    let leader_gauge = {
        let (mut leadership, metrics) = (leadership.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                metrics.leader.set(u64::from(leadership.is_leader()));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    acquired = leadership.acquired() => if !acquired { tokio::time::sleep(Duration::from_secs(1)).await },
                }
            }
        })
    };

    let (namespaces, ns_writer) = reflector::store();
    let (routes, routes_writer) = reflector::store();
    let (budgets, budgets_writer) = reflector::store();
    let (secrets, secrets_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    let stores = Stores {
        namespaces: namespaces.clone(),
        routes: routes.clone(),
        budgets: budgets.clone(),
        secrets,
        pods: pods.clone(),
    };
    let route_events = watcher::watcher(Api::<ProviderRoute>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(routes_writer);
    let budget_events = watcher::watcher(Api::<ApiKeyBudget>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(budgets_writer);
    let secret_events =
        watcher::watcher(Api::<Secret>::all(client.clone()), watcher::Config::default().fields(IGNORED_SECRETS))
            .default_backoff()
            .reflect(secrets_writer);
    // Injected pods' labels, metadata only: which configuration groups each namespace needs.
    let pod_events = watcher::watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default().labels(plan::CONFIG_GROUP_LABEL),
    )
    .default_backoff()
    .reflect(pods_writer);
    let (admin, admin_addr) = listen(args.admin_listen).await?;
    let own_namespace = args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    // The webhook and the ledger serve one certificate, for the webhook Service's names.
    let certs = (args.webhook || args.ledger).then(|| {
        let certs = Arc::new(CertStore::default());
        let source = match &args.webhook_cert_dir {
            Some(dir) => CertSource::Files(dir.clone()),
            None => CertSource::Managed(TlsSettings {
                service: args.webhook_service.clone(),
                namespace: own_namespace.clone(),
                secret: args.webhook_secret.clone(),
                webhook_configuration: args.webhook_configuration.clone(),
            }),
        };
        let keeper =
            tls::keep_current(client.clone(), leadership.clone(), source, certs.clone(), args.webhook_cert_check);
        tokio::spawn(keeper);
        certs
    });
    let webhook_addr = match (&certs, args.webhook) {
        (Some(certs), true) => {
            let (listener, addr) = listen(args.webhook_listen).await?;
            let hook = Arc::new(Webhook { params: inject_params, metrics: metrics.clone() });
            tokio::spawn(tls::serve_https(listener, webhook::router(hook), certs.clone(), shutdown()));
            Some(addr)
        }
        _ => None,
    };
    // Sidecars' configuration streams are served with the ledger, on its listener.
    let hub = Arc::new(ConfigHub::default());
    let connections = args.ledger.then(|| Arc::new(Connections::default()));
    let outages = args.ledger.then(|| Arc::new(Outages::default()));
    let ledger = match (&certs, args.ledger) {
        (Some(certs), true) => {
            let (listener, addr) = listen(args.ledger_listen).await?;
            let service = FleetService::new(
                // Lease ids unique to this replica's term: a restarted pod starts a new prefix.
                format!("{identity}-{}", ledger::now_ms()),
                leadership.clone(),
                Arc::new(KubeReviewer(client.clone())),
                Arc::new(KubeStatusStore::new(client.clone(), identity.clone())),
                metrics.clone(),
                leader_url,
            );
            tokio::spawn(service.clone().keep_persisted(shutdown()));
            let push = Arc::new(ConfigPush {
                hub: hub.clone(),
                connections: connections.clone().unwrap_or_default(),
                outages: outages.clone().unwrap_or_default(),
                pods: Arc::new(KubePods { client: client.clone(), injected: pods.clone() }),
                ledger: service.clone(),
                leadership: leadership.clone(),
                metrics: metrics.clone(),
            });
            let routes = ledger::router(service.clone()).merge(push::router(push));
            tokio::spawn(tls::serve_https(listener, routes, certs.clone(), shutdown()));
            Some((service, addr))
        }
        _ => None,
    };
    let (ledger, ledger_addr) = match ledger {
        Some((service, addr)) => (Some(service), addr.to_string()),
        None => (None, "off".to_string()),
    };
    let sidecar_ledger = match (&ledger, &certs) {
        (Some(_), Some(certs)) => Some(SidecarLedger {
            url: args.ledger_service_url.clone().unwrap_or_else(|| {
                format!("https://{}.{own_namespace}.svc:{}", args.webhook_service, args.ledger_listen.port())
            }),
            ca: certs.watch_ca(),
        }),
        _ => None,
    };
    let ca_changes = match &sidecar_ledger {
        Some(s) => controller::on_ca_change(s.ca.clone(), namespaces.clone()).boxed(),
        None => futures::stream::empty().boxed(),
    };
    let rollout = match (&connections, &outages) {
        (Some(c), Some(o)) => push::rollout_changes(c.clone(), o.clone()).boxed(),
        _ => futures::stream::empty().boxed(),
    };
    let requests = futures::stream::select_all([
        triggers(route_events, generation, |_, _| true).boxed(),
        triggers(budget_events, generation, |_, _| true).boxed(),
        triggers(secret_events, resource_version, move |ns, name| secret_matters(&routes, &budgets, ns, name)).boxed(),
        triggers(pod_events, controller::labels, |_, _| true).boxed(),
        controller::on_leadership(leadership.clone(), namespaces.clone()).boxed(),
        ca_changes,
        rollout,
    ]);
    let admin_state = Arc::new(Admin { stores: stores.clone(), metrics: metrics.clone(), certs });
    let admin =
        tokio::spawn(axum::serve(admin, admin_router(admin_state)).with_graceful_shutdown(shutdown()).into_future());

    let events = Events::new(client.clone(), controller::FIELD_MANAGER, identity);
    let ctx = Arc::new(Context {
        client: client.clone(),
        stores,
        leadership,
        events,
        metrics: metrics.clone(),
        own_writes: Default::default(),
        failures: Default::default(),
        ledger,
        sidecar_ledger,
        hub,
        connections,
        outages,
    });
    let controller = controller(controller::namespace_watch(&client, ns_writer), namespaces, requests, metrics)
        .graceful_shutdown_on(shutdown())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile request not carried out");
            }
        });
    let webhook_addr = webhook_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(admin = %admin_addr, webhook = %webhook_addr, ledger = %ledger_addr, "operator running");

    let mut election = election;
    let outcome = tokio::select! {
        _ = controller => Ok(()),
        () = signal => {
            tracing::info!("shutting down");
            Ok(())
        }
        lost = async { match election.as_mut() { Some(e) => e.await, None => std::future::pending().await } } => match lost {
            Ok(Err(lost)) => Err(OperatorError::Failed(format!("{lost}; exiting so that a restart joins as a follower"))),
            _ => Ok(()),
        },
    };
    // Stop the controller and the admin server, and release the lease if held.
    let _ = shutdown_tx.send(true);
    if let Some(election) = election
        && !election.is_finished()
    {
        let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    }
    leader_gauge.abort();
    let _ = admin.await;
    if let Some(traces) = Traces::global() {
        traces.flush(Duration::from_secs(5)).await;
    }
    outcome
}

/// Fails with a clear message when a CRD is missing, rather than watching in vain.
async fn check_crds(client: &Client) -> Result<(), OperatorError> {
    async fn check<K>(client: &Client) -> Result<(), OperatorError>
    where
        K: Resource<DynamicType = ()> + CustomResourceExt + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match Api::<K>::all(client.clone()).list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(OperatorError::Failed(format!(
                "the {} CustomResourceDefinition ({}) is not installed: install the sideyard-crds chart, or run `sideyard crd | kubectl apply --server-side -f -`",
                K::kind(&()),
                K::crd_name()
            ))),
            Err(e) => Err(OperatorError::Failed(format!("cannot list {}: {e}", K::plural(&())))),
        }
    }
    check::<ProviderRoute>(client).await?;
    check::<ApiKeyBudget>(client).await
}

async fn listen(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), OperatorError> {
    let listener =
        TcpListener::bind(addr).await.map_err(|e| OperatorError::Failed(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| OperatorError::Failed(e.to_string()))?;
    Ok((listener, bound))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sideyard-operator".into())
}

struct Admin {
    stores: Stores,
    metrics: Arc<OperatorMetrics>,
    /// The webhook's certificate, when it serves the webhook: not ready before it has one.
    certs: Option<Arc<CertStore>>,
}

fn admin_router(state: Arc<Admin>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(admin): State<Arc<Admin>>| async move {
                if !admin.stores.ready() {
                    (StatusCode::SERVICE_UNAVAILABLE, "the caches are still loading\n")
                } else if admin.certs.as_ref().is_some_and(|c| !c.loaded()) {
                    (StatusCode::SERVICE_UNAVAILABLE, "the webhook has no certificate yet\n")
                } else {
                    (StatusCode::OK, "ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(admin): State<Arc<Admin>>| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], admin.metrics.render()).into_response()
            }),
        )
        .with_state(state)
}
