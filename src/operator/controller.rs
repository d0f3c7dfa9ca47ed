//! The reconciler: one namespace at a time, because a namespace's routes, budgets and Secrets
//! compile into one configuration together.
//!
//! Watches feed kube-runtime reflectors (the caches [`plan`] reads) and turn each relevant change
//! into a request to reconcile its namespace. A reconcile plans from the caches and, on the leader
//! only, applies the plan: the config Secret first, then statuses, then events, so a `Ready`
//! status never names a version that is not published yet.

use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use crate::traces::Traces;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::runtime::{Controller, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::leader::Leadership;
use super::metrics::{OperatorMetrics, ReconcileOutcome};
use super::plan::{CONFIG_GROUP_LABEL, CONFIG_SECRET, ConfigAction, Inputs, Plan, Published, plan};
use crate::api::{ApiKeyBudget, ApiKeyBudgetStatus, ProviderRoute, ProviderRouteStatus};
use crate::config::selector::Labels;
use crate::config::{LedgerEndpoint, status_owner};

/// The field manager of every write: server-side apply tracks the fields the operator owns under
/// it, so fields it stops setting are removed and nobody else's are touched.
pub const FIELD_MANAGER: &str = "sideyard-operator";
/// A namespace with Sideyard objects is reconciled again this often even without changes, to
/// repair what a missed event or a hand edit left behind.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How long the reconciler trusts its own last write over a cache that has not seen it yet.
const OWN_WRITES_TTL: Duration = Duration::from_secs(30);

/// The caches the reconciler reads.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub routes: Store<ProviderRoute>,
    pub budgets: Store<ApiKeyBudget>,
    pub secrets: Store<Secret>,
    /// Injected pods (those with a configuration group), metadata only.
    pub pods: Store<PartialObjectMeta<Pod>>,
}

impl Stores {
    /// Whether every cache holds a complete initial list: planning from a partial one would report
    /// Secrets as missing and publish configurations without them.
    pub fn ready(&self) -> bool {
        use futures::FutureExt;
        [
            self.namespaces.wait_until_ready().now_or_never(),
            self.routes.wait_until_ready().now_or_never(),
            self.budgets.wait_until_ready().now_or_never(),
            self.secrets.wait_until_ready().now_or_never(),
            self.pods.wait_until_ready().now_or_never(),
        ]
        .iter()
        .all(|r| matches!(r, Some(Ok(()))))
    }
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub leadership: Leadership,
    pub events: super::events::Events,
    pub metrics: Arc<OperatorMetrics>,
    pub own_writes: OwnWrites,
    /// Consecutive failures per namespace, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// The budget ledger, when this operator serves one: told each namespace's budgets.
    pub ledger: Option<Arc<super::ledger::FleetService>>,
    /// Where sidecars reach the ledger, and the CA they trust it by (once known).
    pub sidecar_ledger: Option<SidecarLedger>,
    /// Each namespace's published configuration, for the sidecars' streams.
    pub hub: Arc<super::push::ConfigHub>,
    /// The sidecars on those streams, for the routes' `Programmed` condition; `None` when the
    /// stream is not served.
    pub connections: Option<Arc<super::push::Connections>>,
    /// What the fleet holds of targets, for the routes' target health; `None` likewise.
    pub outages: Option<Arc<super::outages::Outages>>,
}

/// The ledger as sidecars see it: the Service URL and the serving certificate's CA (PEM).
pub struct SidecarLedger {
    pub url: String,
    pub ca: tokio::sync::watch::Receiver<Option<String>>,
}

impl SidecarLedger {
    /// `None` until the CA is known: sidecars keep their own ledgers until then.
    pub fn endpoint(&self) -> Option<LedgerEndpoint> {
        Some(LedgerEndpoint { url: self.url.clone(), ca_bundle: self.ca.borrow().clone()? })
    }
}

impl Context {
    /// Every write asks first: a replica whose lease lapsed writes nothing more.
    fn ensure_leader(&self) -> Result<(), Error> {
        if self.leadership.is_leader() { Ok(()) } else { Err(Error::NotLeader) }
    }
}

/// Why a reconcile failed.
#[derive(Debug)]
pub enum Error {
    /// An API call failed.
    Kube { step: &'static str, source: kube::Error },
    /// The lease lapsed before a write: the write was not made.
    NotLeader,
    /// The ledger could not load a budget's stored status.
    Ledger { step: &'static str, message: String },
}

impl Error {
    /// The metric label of the failed step.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube { step, .. } | Error::Ledger { step, .. } => step,
            Error::NotLeader => "not_leader",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Kube { step, source } => write!(f, "{step}: {source}"),
            Error::NotLeader => f.write_str("the leader lease lapsed; nothing more was written"),
            Error::Ledger { step, message } => write!(f, "{step}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// The reconciler's own recent writes. The caches learn of them through the watch a little later;
/// until then, planning from the cache alone would publish a version number twice or repeat an
/// event.
#[derive(Default)]
pub struct OwnWrites {
    configs: Mutex<HashMap<String, (Option<Published>, Instant)>>,
    routes: StatusCache<ProviderRouteStatus>,
    budgets: StatusCache<ApiKeyBudgetStatus>,
}

/// Statuses by (namespace, name), with when they were written.
type StatusCache<S> = Mutex<HashMap<(String, String), (S, Instant)>>;

impl OwnWrites {
    /// The namespace's published configuration: the cache's, unless a newer own write is not in
    /// it yet.
    fn published(&self, namespace: &str, cached: Option<Published>) -> Option<Published> {
        let mut configs = lock(&self.configs);
        let Some((written, at)) = configs.get(namespace).cloned() else { return cached };
        let cache_caught_up = match (&written, &cached) {
            (Some(w), Some(c)) => c.version > w.version || (c.version == w.version && c.groups == w.groups),
            (None, None) => true,
            _ => false,
        };
        if cache_caught_up || at.elapsed() > OWN_WRITES_TTL {
            configs.remove(namespace);
            return cached;
        }
        written
    }

    /// `object` with the status last written for it, if the cache may not show that yet.
    fn with_status<K, S>(map: &StatusCache<S>, object: &Arc<K>) -> Arc<K>
    where
        K: Resource + Clone + HasStatus<S>,
        S: Clone,
    {
        let key = (object.namespace().unwrap_or_default(), object.name_any());
        let mut map = lock(map);
        match map.get(&key) {
            Some((status, at)) if at.elapsed() <= OWN_WRITES_TTL => {
                let mut object = K::clone(object);
                object.set_status(status.clone());
                Arc::new(object)
            }
            Some(_) => {
                map.remove(&key);
                object.clone()
            }
            None => object.clone(),
        }
    }
}

/// The status subresource of a Sideyard object.
pub trait HasStatus<S> {
    fn set_status(&mut self, status: S);
}

impl HasStatus<ProviderRouteStatus> for ProviderRoute {
    fn set_status(&mut self, status: ProviderRouteStatus) {
        self.status = Some(status);
    }
}

impl HasStatus<ApiKeyBudgetStatus> for ApiKeyBudget {
    fn set_status(&mut self, status: ApiKeyBudgetStatus) {
        // The ledger's fields stay as the cache has them.
        let current = self.status.get_or_insert_with(Default::default);
        current.observed_generation = status.observed_generation;
        current.conditions = status.conditions;
        current.config_version = status.config_version;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reconciles one namespace.
pub async fn reconcile(namespace: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = namespace.name_any();
    ctx.metrics.dequeued(&ns);
    if !ctx.stores.ready() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    // Followers keep their caches warm and write nothing; the new leader reconciles everything.
    if !ctx.leadership.is_leader() || namespace.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let started = std::time::Instant::now();
    let in_ns = |o: &dyn ResourceNamespace| o.ns() == Some(ns.as_str());
    let routes: Vec<_> = ctx
        .stores
        .routes
        .state_filter(|r| in_ns(r))
        .iter()
        .map(|r| OwnWrites::with_status(&ctx.own_writes.routes, r))
        .collect();
    let budgets: Vec<_> = ctx
        .stores
        .budgets
        .state_filter(|b| in_ns(b))
        .iter()
        .map(|b| OwnWrites::with_status(&ctx.own_writes.budgets, b))
        .collect();
    let secrets = ctx.stores.secrets.state_filter(|s| in_ns(s));
    let cached = secrets.iter().find(|s| s.name_any() == CONFIG_SECRET).map(|s| Published::from_secret(s));
    let published = ctx.own_writes.published(&ns, cached);
    if routes.is_empty() && budgets.is_empty() && published.is_none() {
        if let Some(ledger) = &ctx.ledger {
            // The namespace's last budget is gone: so is its book.
            let _ = ledger.sync_namespace(&ns, &[]).await;
        }
        return Ok(Action::await_change());
    }

    let ledger_endpoint = ctx.sidecar_ledger.as_ref().and_then(SidecarLedger::endpoint);
    let connected = ctx.connections.as_ref().map(|c| c.in_namespace(&ns));
    let held = ctx.outages.as_ref().map(|o| o.held(&ns, Instant::now(), Timestamp::now()));
    let mut groups: BTreeMap<String, Vec<Labels>> = BTreeMap::new();
    for pod in ctx.stores.pods.state_filter(|p| in_ns(p)) {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if let Some(group) = labels.get(CONFIG_GROUP_LABEL) {
            groups.entry(group.clone()).or_default().push(labels.clone());
        }
    }
    let plan = plan(&Inputs {
        namespace: &ns,
        routes: &routes,
        budgets: &budgets,
        secrets: &secrets,
        published: published.as_ref(),
        now: Timestamp::now(),
        ledger: ledger_endpoint.as_ref(),
        connected: connected.as_deref(),
        groups: &groups,
        held: held.as_ref(),
    });
    let compiled_budgets = plan.compiled_budgets.clone();
    let pushed = match &plan.config {
        ConfigAction::Apply { published, .. } => Some(published.clone()),
        ConfigAction::Keep => published,
        ConfigAction::Delete => None,
    };
    let mut result = apply(&ctx, &ns, plan).await;
    if result.is_ok()
        && let Some(pushed) = &pushed
    {
        // Once the Secret holds it: a sidecar never serves a version the API server may not keep.
        ctx.hub.publish(&ns, pushed);
    }
    if result.is_ok() {
        let informed = ctx.stores.budgets.state_filter(|b| in_ns(b));
        result = sync_ledger(&ctx, &ns, &informed, &compiled_budgets).await;
    }
    ctx.metrics.reconcile_duration.observe(started.elapsed());
    let outcome = match &result {
        Ok(()) => ReconcileOutcome::Success,
        Err(e) => ReconcileOutcome::Error(e.label()),
    };
    if let Some(traces) = Traces::global() {
        let attributes = vec![
            KeyValue::new("k8s.namespace.name", ns.clone()),
            KeyValue::new("sideyard.routes", routes.len() as i64),
            KeyValue::new("sideyard.budgets", budgets.len() as i64),
            KeyValue::new("sideyard.result", outcome.label()),
        ];
        let error = result.as_ref().err().map(ToString::to_string);
        let start = SystemTime::now().checked_sub(started.elapsed()).unwrap_or(SystemTime::UNIX_EPOCH);
        traces.record(None, SpanKind::Internal, format!("reconcile {ns}"), start, attributes, error);
    }
    ctx.metrics.reconciled("ProviderRoute", outcome, routes.len());
    ctx.metrics.reconciled("ApiKeyBudget", outcome, budgets.len());
    result?;
    lock(&ctx.failures).remove(&ns);
    Ok(Action::requeue(RESYNC))
}

/// Gives the ledger the namespace's compiled budgets, and makes every other budget whose status
/// still says a ledger keeps it say that none does: a budget no longer compiled (its routes are
/// gone), or every budget when this operator runs with `--ledger=false`. Checked on every
/// reconcile, so a restart or a write that raced the change cannot leave it saying so.
async fn sync_ledger(
    ctx: &Context,
    ns: &str,
    budgets: &[Arc<ApiKeyBudget>],
    compiled: &[crate::config::Budget],
) -> Result<(), Error> {
    let (dropped, reason, message) = match &ctx.ledger {
        Some(ledger) => {
            // The ledger learns each budget's terms here, and loads a new one's stored spend.
            let dropped = ledger
                .sync_namespace(ns, compiled)
                .await
                .map_err(|message| Error::Ledger { step: "load_ledger_status", message })?;
            (
                dropped,
                "NotServed",
                "not in the namespace's compiled configuration (see the Ready condition): the ledger grants \
                 nothing for it; leases already granted run out",
            )
        }
        None => (
            Vec::new(),
            "LedgerOff",
            "the operator runs with --ledger=false: each sidecar keeps this budget in its own ledger; the \
             figures here are the last the fleet's ledger wrote",
        ),
    };
    // A template's status holds the books of the keys it issued: kept while any of them is.
    let kept = |name: &str| ctx.ledger.is_some() && compiled.iter().any(|b| status_owner(&b.name) == name);
    let says_kept = |b: &ApiKeyBudget| b.status.as_ref().is_some_and(ApiKeyBudgetStatus::kept_by_ledger);
    // What the ledger just dropped, and what the informer's copy (not our own writes', which
    // leave the ledger's condition out) still says is kept.
    let mut stale: Vec<String> =
        budgets.iter().filter(|b| says_kept(b) && !kept(&b.name_any())).map(|b| b.name_any()).collect();
    stale.extend(dropped);
    stale.sort();
    stale.dedup();
    let store = super::ledger::KubeStatusStore::new(ctx.client.clone(), "controller");
    for name in stale {
        super::ledger::retire(&store, ns, &name, reason, message)
            .await
            .map_err(|message| Error::Ledger { step: "retire_ledger_status", message })?;
    }
    Ok(())
}

/// Namespaced objects, for one filter over the three caches.
trait ResourceNamespace {
    fn ns(&self) -> Option<&str>;
}

impl<K: Resource> ResourceNamespace for K {
    fn ns(&self) -> Option<&str> {
        self.meta().namespace.as_deref()
    }
}

/// Retries a failed namespace with exponential backoff: 1 s, 2 s, 4 s … at most 5 minutes.
pub fn error_policy(namespace: Arc<Namespace>, error: &Error, ctx: Arc<Context>) -> Action {
    let ns = namespace.name_any();
    let mut failures = lock(&ctx.failures);
    let n = failures.entry(ns.clone()).or_default();
    *n = n.saturating_add(1);
    let delay = Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300));
    tracing::warn!(namespace = %ns, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Carries out a plan; each write first checks that this replica still leads.
async fn apply(ctx: &Context, ns: &str, plan: Plan) -> Result<(), Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();

    ctx.metrics.config_bytes(ns, plan.config_bytes);

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match plan.config {
        ConfigAction::Keep => {}
        ConfigAction::Apply { secret, published } => {
            ctx.ensure_leader()?;
            secrets
                .patch(CONFIG_SECRET, &params, &Patch::Apply(&*secret))
                .await
                .map_err(|source| Error::Kube { step: "apply_config", source })?;
            tracing::info!(namespace = %ns, version = published.version, bytes = published.content.len(), "published the compiled configuration");
            lock(&ctx.own_writes.configs).insert(ns.to_string(), (Some(published), Instant::now()));
            ctx.metrics.config_writes.inc();
        }
        ConfigAction::Delete => {
            ctx.ensure_leader()?;
            match secrets.delete(CONFIG_SECRET, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => return Err(Error::Kube { step: "delete_config", source }),
            }
            tracing::info!(namespace = %ns, "deleted the configuration of a namespace without routes");
            lock(&ctx.own_writes.configs).insert(ns.to_string(), (None, Instant::now()));
            ctx.metrics.config_deletes.inc();
        }
    }

    write_statuses::<ProviderRoute, _>(ctx, ns, plan.routes, &ctx.own_writes.routes).await?;
    write_statuses::<ApiKeyBudget, _>(ctx, ns, plan.budgets, &ctx.own_writes.budgets).await?;

    for event in plan.events {
        ctx.ensure_leader()?;
        // Events are informational: a refused one must not hold back the namespace.
        match ctx.events.publish(&event.regarding, event.type_, &event.reason, &event.note).await {
            Ok(()) => ctx.metrics.events_posted.inc(),
            Err(error) => {
                ctx.metrics.events_failed.inc();
                tracing::warn!(namespace = %ns, %error, reason = %event.reason, "could not post an event");
            }
        }
    }
    Ok(())
}

/// Applies the operator's part of each object's status, and remembers it; an object deleted
/// meanwhile is skipped.
async fn write_statuses<K, S>(
    ctx: &Context,
    ns: &str,
    statuses: Vec<(String, S)>,
    written: &StatusCache<S>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug,
    S: Serialize,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for (name, status) in statuses {
        ctx.ensure_leader()?;
        let body = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
        match api.patch_status(&name, &params, &Patch::Apply(&body)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(source) => return Err(Error::Kube { step: "patch_status", source }),
        }
        lock(written).insert((ns.to_string(), name), (status, Instant::now()));
        ctx.metrics.status_writes.inc();
    }
    Ok(())
}

/// The namespaces to reconcile when the objects of one watch change.
///
/// Routes and budgets count as changed when they appear, go away, or get a new `generation`
/// (a spec change): the operator's own status writes change none of these, so they do not come
/// back as work. Unlike kube-runtime's generation predicate, deletions pass, including those
/// only noticed when a watch starts over and lists again.
pub fn triggers<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    fingerprint: fn(&K) -> Option<String>,
    relevant: impl Fn(&str, &str) -> bool + Send + 'static,
) -> impl Stream<Item = ObjectRef<Namespace>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    // (namespace, name) -> (uid, fingerprint) of every object seen.
    let mut seen: HashMap<(String, String), (Option<String>, Option<String>)> = HashMap::new();
    // Objects listed so far in a re-list.
    let mut listed: Option<HashSet<(String, String)>> = None;
    events
        .filter_map(|event| async move {
            match event {
                Ok(event) => Some(event),
                Err(error) => {
                    tracing::warn!(%error, kind = %std::any::type_name::<K>(), "watch failed; retrying");
                    None
                }
            }
        })
        .flat_map(move |event| {
            let mut changed: Vec<(String, String)> = Vec::new();
            let key =
                |o: &K| (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default());
            let mut touch = |o: &K, seen: &mut HashMap<_, _>| {
                let value = (o.meta().uid.clone(), fingerprint(o));
                if seen.insert(key(o), value.clone()).as_ref() != Some(&value) {
                    changed.push(key(o));
                }
            };
            match event {
                watcher::Event::Apply(o) => touch(&o, &mut seen),
                watcher::Event::Delete(o) => {
                    seen.remove(&key(&o));
                    changed.push(key(&o));
                }
                watcher::Event::Init => listed = Some(HashSet::new()),
                watcher::Event::InitApply(o) => {
                    listed.get_or_insert_with(HashSet::new).insert(key(&o));
                    touch(&o, &mut seen);
                }
                watcher::Event::InitDone => {
                    let listed = listed.take().unwrap_or_default();
                    let gone: Vec<_> = seen.keys().filter(|k| !listed.contains(*k)).cloned().collect();
                    for k in gone {
                        seen.remove(&k);
                        changed.push(k);
                    }
                }
            }
            let requests: Vec<ObjectRef<Namespace>> = changed
                .into_iter()
                .filter(|(ns, name)| !ns.is_empty() && relevant(ns, name))
                .map(|(ns, _)| ObjectRef::new(&ns))
                .collect();
            stream::iter(requests)
        })
}

/// The spec fingerprint of a Sideyard object.
pub fn generation<K: Resource>(o: &K) -> Option<String> {
    o.meta().generation.map(|g| g.to_string())
}

/// A pod counts when its labels change (they choose its group and what selects it).
pub fn labels<K: Resource>(o: &K) -> Option<String> {
    o.meta().labels.as_ref().map(|labels| format!("{labels:?}"))
}

/// Every change to a Secret counts.
pub fn resource_version(o: &Secret) -> Option<String> {
    o.metadata.resource_version.clone()
}

/// Whether a Secret matters to its namespace's configuration: the operator's own, one that a
/// route or budget there refers to, or any Secret of a namespace with a `keys` template (a label
/// added or taken away issues or revokes a key, and the event has only the Secret as it is now).
pub fn secret_matters(routes: &Store<ProviderRoute>, budgets: &Store<ApiKeyBudget>, ns: &str, name: &str) -> bool {
    if name == CONFIG_SECRET {
        return true;
    }
    let in_ns = |meta: &kube::api::ObjectMeta| meta.namespace.as_deref() == Some(ns);
    routes
        .find(|r| {
            in_ns(&r.metadata)
                && r.spec
                    .targets
                    .iter()
                    .any(|t| t.credentials.as_ref().and_then(|c| c.secret_ref.as_ref()).is_some_and(|s| s.name == name))
        })
        .is_some()
        || budgets
            .find(|b| {
                in_ns(&b.metadata)
                    && (b.spec.keys.is_some()
                        || b.spec.key.as_ref().and_then(|k| k.secret_ref.as_ref()).is_some_and(|s| s.name == name))
            })
            .is_some()
}

/// The controller over namespaces: `namespaces` is its own watch, `requests` every other reason
/// to reconcile a namespace.
pub fn controller(
    namespaces: impl Stream<Item = Result<Namespace, watcher::Error>> + Send + 'static,
    store: Store<Namespace>,
    requests: impl Stream<Item = ObjectRef<Namespace>> + Send + 'static,
    metrics: Arc<OperatorMetrics>,
) -> Controller<Namespace> {
    let counted = metrics.clone();
    let namespaces = namespaces.inspect(move |n| {
        if let Ok(n) = n {
            counted.queued(&n.name_any());
        }
    });
    let requests = requests.inspect(move |r| metrics.queued(&r.name));
    Controller::for_stream(namespaces, store).reconcile_on(requests)
}

/// Every namespace in the cache, each time this replica becomes the leader.
pub fn on_leadership(
    leadership: Leadership,
    namespaces: Store<Namespace>,
) -> impl Stream<Item = ObjectRef<Namespace>> + Send + 'static {
    stream::unfold(leadership, move |mut leadership| {
        let namespaces = namespaces.clone();
        async move {
            if !leadership.acquired().await {
                return None;
            }
            let all: Vec<_> = namespaces.state().iter().map(|n| ObjectRef::from_obj(n.as_ref())).collect();
            Some((stream::iter(all), leadership))
        }
    })
    .flatten()
}

/// Every namespace, each time the ledger's CA changes: their configurations carry it.
pub fn on_ca_change(
    ca: tokio::sync::watch::Receiver<Option<String>>,
    namespaces: Store<Namespace>,
) -> impl Stream<Item = ObjectRef<Namespace>> + Send + 'static {
    stream::unfold(ca, move |mut ca| {
        let namespaces = namespaces.clone();
        async move {
            ca.changed().await.ok()?;
            let all: Vec<_> = namespaces.state().iter().map(|n| ObjectRef::from_obj(n.as_ref())).collect();
            Some((stream::iter(all), ca))
        }
    })
    .flatten()
}

/// The namespace watch for the controller, feeding `writer`.
pub fn namespace_watch(
    client: &Client,
    writer: kube::runtime::reflector::store::Writer<Namespace>,
) -> impl Stream<Item = Result<Namespace, watcher::Error>> + Send + 'static {
    watcher::watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
}
