//! Pushed configuration: the leader streams each sidecar the configuration of its own pod, the
//! current version when it connects and every newer one after, so a change is served within the
//! time of one reconcile instead of the kubelet's Secret refresh (a minute or two).
//!
//! `GET /config/v1/stream` on the ledger's listener, with the ledger's authentication and leader
//! redirect, answers newline-delimited [`CompiledConfig`] frames. The pod is the one the caller's
//! token is bound to; the operator reads its labels itself (a pod's own word is not trusted) and
//! sends only the routes and budgets whose `workloadSelector` selects it, credentials included.
//! A replica that stops leading ends its streams, so sidecars move to the new leader.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use http::{HeaderMap, StatusCode, header};
use tokio::sync::watch;

use super::leader::Leadership;
use super::ledger::{FleetService, LedgerError};
use super::metrics::OperatorMetrics;
use super::outages::{self, Held, Outages};
use super::plan::{ConnectedPod, Published};
use crate::config::selector::Labels;
use crate::config::{
    CONFIG_SERVED_PATH, CONFIG_STREAM_PATH, CompiledConfig, Config, HEALTH_REPORT_PATH, HealthReport, ServedVersion,
};

/// How often a stream checks that this replica still leads.
const LEADERSHIP_CHECK: Duration = Duration::from_secs(1);

/// A namespace's configuration as last published.
#[derive(Debug)]
pub struct Current {
    pub version: u64,
    pub config: Config,
    /// Frames made so far, by the labels they were selected for: the pods of one workload share
    /// labels, so a change is serialised once per workload rather than once per pod.
    frames: Mutex<HashMap<Labels, Bytes>>,
}

impl Current {
    pub fn new(version: u64, config: Config) -> Self {
        Current { version, config, frames: Mutex::default() }
    }
}

type Channel = watch::Sender<Option<Arc<Current>>>;

/// Each namespace's newest published configuration, for its streams to follow. A version is only
/// ever replaced by a higher one, so no stream sends an older version after a newer.
#[derive(Default)]
pub struct ConfigHub {
    namespaces: Mutex<HashMap<String, Channel>>,
}

impl ConfigHub {
    /// Makes `published` the namespace's current configuration, unless the hub has that version
    /// or a newer one.
    pub fn publish(&self, namespace: &str, published: &Published) {
        let channel = self.channel(namespace);
        if channel.borrow().as_ref().is_some_and(|c| c.version >= published.version) {
            return;
        }
        let config = serde_json::from_slice::<CompiledConfig>(&published.content)
            .map_err(|e| e.to_string())
            .and_then(CompiledConfig::into_config);
        let config = match config {
            Ok(config) => config,
            Err(error) => {
                // Only the operator writes it; a hand edit is repaired by the next reconcile.
                tracing::warn!(namespace, version = published.version, %error, "the published configuration cannot be read; not pushed");
                return;
            }
        };
        let current = Arc::new(Current::new(published.version, config));
        channel.send_if_modified(|slot| {
            let newer = slot.as_ref().is_none_or(|c| c.version < current.version);
            if newer {
                *slot = Some(current);
            }
            newer
        });
    }

    /// The namespace's configuration as it changes; `None` until one is published.
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<Option<Arc<Current>>> {
        self.channel(namespace).subscribe()
    }

    /// The namespace's current version, if any.
    pub fn version(&self, namespace: &str) -> Option<u64> {
        self.channel(namespace).borrow().as_ref().map(|c| c.version)
    }

    fn channel(&self, namespace: &str) -> Channel {
        let mut namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        namespaces.entry(namespace.to_string()).or_insert_with(|| watch::channel(None).0).clone()
    }
}

/// One frame of a pod's stream: the configuration of its namespace that selects `labels`,
/// hashed afresh, as one JSON line.
pub fn frame(namespace: &str, current: &Current, labels: &Labels) -> Bytes {
    if let Some(frame) = lock(&current.frames).get(labels) {
        return frame.clone();
    }
    let mut config = current.config.clone();
    config.retain_for(labels);
    let mut line = serde_json::to_vec(&CompiledConfig::new(namespace, current.version, config)).unwrap_or_default();
    line.push(b'\n');
    let frame = Bytes::from(line);
    lock(&current.frames).insert(labels.clone(), frame.clone());
    frame
}

/// The sidecars connected to this replica's streams, with the version each says it serves: what
/// the routes' `Programmed` condition counts.
#[derive(Default)]
pub struct Connections {
    pods: Mutex<HashMap<(String, String), Connection>>,
    /// Namespaces whose counts changed since the last [`Connections::take_changed`].
    changed: Mutex<BTreeSet<String>>,
}

struct Connection {
    /// Streams open (a reconnecting sidecar may briefly hold two).
    streams: usize,
    pod: ConnectedPod,
}

impl Connections {
    fn connect(&self, namespace: &str, pod: &str, labels: &Labels) {
        let mut pods = lock(&self.pods);
        let entry = pods
            .entry((namespace.to_string(), pod.to_string()))
            .or_insert_with(|| Connection { streams: 0, pod: ConnectedPod { labels: labels.clone(), serves: None } });
        entry.streams += 1;
        entry.pod.labels.clone_from(labels);
        self.touch(namespace);
    }

    fn disconnect(&self, namespace: &str, pod: &str) {
        let mut pods = lock(&self.pods);
        let key = (namespace.to_string(), pod.to_string());
        if let Some(entry) = pods.get_mut(&key) {
            entry.streams = entry.streams.saturating_sub(1);
            if entry.streams == 0 {
                pods.remove(&key);
            }
        }
        self.touch(namespace);
    }

    /// Records what a connected pod serves; a pod without a stream here is not counted.
    pub fn served(&self, namespace: &str, pod: &str, version: u64) {
        let mut pods = lock(&self.pods);
        if let Some(entry) = pods.get_mut(&(namespace.to_string(), pod.to_string()))
            && entry.pod.serves != Some(version)
        {
            entry.pod.serves = Some(version);
            self.touch(namespace);
        }
    }

    /// The namespace's connected pods.
    pub fn in_namespace(&self, namespace: &str) -> Vec<ConnectedPod> {
        let pods = lock(&self.pods);
        pods.iter().filter(|((ns, _), _)| ns == namespace).map(|(_, c)| c.pod.clone()).collect()
    }

    /// The namespaces whose pods connected, left or served something new since the last call.
    pub fn take_changed(&self) -> BTreeSet<String> {
        std::mem::take(&mut *lock(&self.changed))
    }

    fn touch(&self, namespace: &str) {
        lock(&self.changed).insert(namespace.to_string());
    }
}

/// Every second, the namespaces whose connected pods changed, to be reconciled again so that their
/// routes' `Programmed` condition follows: at most one status write a second per route, however
/// many pods report.
pub fn rollout_changes(
    connections: Arc<Connections>,
    outages: Arc<Outages>,
) -> impl futures::Stream<Item = kube::runtime::reflector::ObjectRef<k8s_openapi::api::core::v1::Namespace>> {
    let tick = tokio::time::interval(Duration::from_secs(1));
    futures::stream::unfold((connections, outages, tick), |(connections, outages, mut tick)| async move {
        tick.tick().await;
        let mut changed = connections.take_changed();
        changed.extend(outages.take_changed(tokio::time::Instant::now()));
        let changed = changed.into_iter().map(|ns| kube::runtime::reflector::ObjectRef::new(&ns));
        Some((futures::stream::iter(changed), (connections, outages, tick)))
    })
    .flatten()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pod as the operator reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: Option<String>,
    pub labels: Labels,
}

/// Reads pods: the API server, or a script in tests.
pub trait Pods: Send + Sync + 'static {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<Option<PodMeta>, String>>;
}

type PodStore = kube::runtime::reflector::Store<kube::api::PartialObjectMeta<k8s_openapi::api::core::v1::Pod>>;

/// The cluster's pods: the operator's cache of injected pods, else a metadata-only `get` (RBAC:
/// `get` on pods), so that a fleet reconnecting after a leader change costs the API server nothing
/// but the pods it has not seen yet.
pub struct KubePods {
    pub client: kube::Client,
    pub injected: PodStore,
}

impl Pods for KubePods {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<Option<PodMeta>, String>> {
        let meta = |m: kube::api::ObjectMeta| PodMeta { uid: m.uid, labels: m.labels.unwrap_or_default() };
        let cached = self.injected.get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace));
        Box::pin(async move {
            if let Some(pod) = cached {
                return Ok(Some(meta(pod.metadata.clone())));
            }
            let api = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), namespace);
            let pod = api.get_metadata_opt(name).await.map_err(|e| e.to_string())?;
            Ok(pod.map(|p| meta(p.metadata)))
        })
    }
}

/// The configuration stream's service.
pub struct ConfigPush {
    pub hub: Arc<ConfigHub>,
    pub connections: Arc<Connections>,
    /// What the sidecars report of their targets' outages, pushed back to them all.
    pub outages: Arc<Outages>,
    pub pods: Arc<dyn Pods>,
    pub ledger: Arc<FleetService>,
    pub leadership: Leadership,
    pub metrics: Arc<OperatorMetrics>,
}

/// The stream's route, served beside the ledger's.
pub fn router(push: Arc<ConfigPush>) -> Router {
    Router::new()
        .route(CONFIG_STREAM_PATH, get(stream))
        .route(CONFIG_SERVED_PATH, post(served))
        .route(HEALTH_REPORT_PATH, post(health))
        .with_state(push)
}

async fn stream(State(push): State<Arc<ConfigPush>>, headers: HeaderMap) -> Response {
    match open(&push, &headers).await {
        Ok((namespace, pod, labels)) => {
            push.metrics.config_stream("opened");
            let frames = frames(push, namespace, pod, labels);
            ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(frames)).into_response()
        }
        Err((result, error)) => {
            push.metrics.config_stream(result);
            error.into_response()
        }
    }
}

/// A sidecar's report: its namespace, its pod and the body, or the error answer.
async fn pod_report<T: serde::de::DeserializeOwned>(
    push: &ConfigPush,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, String, T), LedgerError> {
    let caller = push.ledger.authenticate(headers).await?;
    let report = serde_json::from_slice(body).map_err(|e| {
        LedgerError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("invalid request body: {e}"))
    })?;
    let pod = caller
        .bound_pod
        .ok_or_else(|| LedgerError::new(StatusCode::FORBIDDEN, "forbidden", "the token is bound to no pod"))?;
    Ok((caller.namespace, pod.name, report))
}

fn no_content(result: Result<(), LedgerError>) -> Response {
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// What a sidecar reports on `POST /config/v1/served`: `{"version": 7}`, the version it serves.
async fn served(State(push): State<Arc<ConfigPush>>, headers: HeaderMap, body: Bytes) -> Response {
    no_content(pod_report(&push, &headers, &body).await.map(|(namespace, pod, served): (_, _, ServedVersion)| {
        push.connections.served(&namespace, &pod, served.version);
    }))
}

/// What a sidecar reports on `POST /config/v1/health`: its own ejections and cooldowns, pushed to
/// the namespace's other sidecars when they are news.
async fn health(State(push): State<Arc<ConfigPush>>, headers: HeaderMap, body: Bytes) -> Response {
    no_content(pod_report(&push, &headers, &body).await.map(|(namespace, pod, report): (_, _, HealthReport)| {
        let current = push.hub.subscribe(&namespace).borrow().clone();
        let policy = |route: &str| {
            let routes = &current.as_ref()?.config.routes;
            routes.iter().find(|r| format!("{}/{}", r.namespace, r.name) == route).map(|r| r.health)
        };
        if push.outages.report(&namespace, &pod, &report, &policy, tokio::time::Instant::now()) {
            push.metrics.fleet_holds.inc();
            tracing::info!(%namespace, %pod, outages = ?report.targets, "a sidecar's outage is pushed to its namespace's sidecars");
        }
    }))
}

/// The caller's namespace, pod and its labels, or why it gets no stream (with the metric label).
async fn open(push: &ConfigPush, headers: &HeaderMap) -> Result<(String, String, Labels), (&'static str, LedgerError)> {
    let caller = push.ledger.authenticate(headers).await.map_err(|e| ("refused", e))?;
    let forbidden = |message: String| ("refused", LedgerError::new(StatusCode::FORBIDDEN, "forbidden", message));
    let Some(bound) = caller.bound_pod else {
        return Err(forbidden(
            "the token is bound to no pod: the configuration stream serves the pod a projected ServiceAccount token \
             (audience sideyard) is bound to, as the injector mounts it"
                .into(),
        ));
    };
    let pod = push.pods.get(&caller.namespace, &bound.name).await.map_err(|e| {
        let message = format!("cannot read pod {}/{}: {e}", caller.namespace, bound.name);
        tracing::warn!(%message, "a sidecar's configuration stream is refused");
        ("error", LedgerError::new(StatusCode::SERVICE_UNAVAILABLE, "pod_unreadable", message))
    })?;
    match pod {
        Some(pod) if bound.uid.is_none() || pod.uid == bound.uid => Ok((caller.namespace, bound.name, pod.labels)),
        _ => Err(forbidden(format!(
            "pod {}/{} that the token is bound to does not exist (any more)",
            caller.namespace, bound.name
        ))),
    }
}

/// The frames of one stream: the current version as soon as there is one, then each newer one,
/// until this replica stops leading or the sidecar goes.
fn frames(
    push: Arc<ConfigPush>,
    namespace: String,
    pod: String,
    labels: Labels,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    struct Open {
        push: Arc<ConfigPush>,
        namespace: String,
        labels: Labels,
        changes: watch::Receiver<Option<Arc<Current>>>,
        sent: Option<u64>,
        /// The fleet's outages: told once the first configuration is out, then at each change.
        held: watch::Receiver<Held>,
        held_due: bool,
        _connected: Connected,
    }
    let changes = push.hub.subscribe(&namespace);
    let held = push.outages.subscribe(&namespace);
    let connected = Connected::new(&push, &namespace, &pod, &labels);
    let open = Open { push, namespace, labels, changes, sent: None, held, held_due: true, _connected: connected };
    futures::stream::unfold(open, |mut open| async move {
        let mut check = tokio::time::interval(LEADERSHIP_CHECK);
        loop {
            let current = open.changes.borrow_and_update().clone();
            if let Some(current) = current.filter(|c| open.sent.is_none_or(|v| v < c.version)) {
                let frame = frame(&open.namespace, &current, &open.labels);
                open.sent = Some(current.version);
                open.push.metrics.config_frame(frame.len());
                return Some((Ok(frame), open));
            }
            if open.sent.is_some() && open.held_due {
                open.held_due = false;
                let held = open.held.borrow_and_update().clone();
                if let Some(frame) = outages::frame(&held, tokio::time::Instant::now()) {
                    open.push.metrics.config_frame(frame.len());
                    return Some((Ok(frame), open));
                }
            }
            tokio::select! {
                changed = open.changes.changed() => if changed.is_err() { return None },
                changed = open.held.changed(), if open.sent.is_some() => match changed {
                    Ok(()) => open.held_due = true,
                    Err(_) => return None,
                },
                _ = check.tick() => if !open.push.leadership.is_leader() { return None },
            }
        }
    })
}

/// Counts a stream's pod as connected for as long as the stream lives.
struct Connected {
    metrics: Arc<OperatorMetrics>,
    connections: Arc<Connections>,
    outages: Arc<Outages>,
    namespace: String,
    pod: String,
}

impl Connected {
    fn new(push: &ConfigPush, namespace: &str, pod: &str, labels: &Labels) -> Self {
        push.metrics.config_streams.inc();
        push.connections.connect(namespace, pod, labels);
        Connected {
            metrics: push.metrics.clone(),
            connections: push.connections.clone(),
            outages: push.outages.clone(),
            namespace: namespace.into(),
            pod: pod.into(),
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.metrics.config_streams.dec();
        self.connections.disconnect(&self.namespace, &self.pod);
        self.outages.forget(&self.namespace, &self.pod);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(version: u64, config: &Config) -> Published {
        let content = serde_json::to_vec(&CompiledConfig::new("team-a", version, config.clone())).unwrap();
        Published { version, content, ours: true, ..Published::default() }
    }

    #[tokio::test]
    async fn an_injected_pod_is_read_from_the_cache_and_another_from_the_api_server() {
        use kube::api::{ObjectMeta, PartialObjectMeta};
        use kube::runtime::watcher::Event;
        let (service, mut server) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let (injected, mut writer) = kube::runtime::reflector::store();
        let pod = PartialObjectMeta::<k8s_openapi::api::core::v1::Pod> {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("team-a".into()),
                uid: Some("uid-1".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Default::default()
        };
        writer.apply_watcher_event(&Event::Apply(pod));
        let pods = KubePods { client: kube::Client::new(service, "team-a"), injected };
        let cached = tokio::time::timeout(Duration::from_secs(10), pods.get("team-a", "web-1")).await;
        let cached = cached.expect("answered without an API call").expect("no error");
        assert_eq!(cached, Some(PodMeta { uid: Some("uid-1".into()), labels: [("app".into(), "web".into())].into() }));
        // Not in the cache: one GET of its metadata, and 404 is no pod.
        let answer = async {
            let (request, send) = server.next_request().await.expect("a GET");
            assert_eq!(request.uri().path(), "/api/v1/namespaces/team-a/pods/other");
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            let mut response = http::Response::new(kube::client::Body::from(status.to_string().into_bytes()));
            *response.status_mut() = http::StatusCode::NOT_FOUND;
            send.send_response(response);
        };
        let (missing, ()) =
            tokio::time::timeout(Duration::from_secs(10), futures::future::join(pods.get("team-a", "other"), answer))
                .await
                .expect("in time");
        assert_eq!(missing, Ok(None));
    }

    #[test]
    fn the_hub_only_ever_moves_to_a_newer_version() {
        let hub = ConfigHub::default();
        let mut changes = hub.subscribe("team-a");
        assert_eq!(hub.version("team-a"), None);
        hub.publish("team-a", &published(3, &Config::default()));
        assert_eq!(hub.version("team-a"), Some(3));
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        hub.publish("team-a", &published(2, &Config::default()));
        hub.publish("team-a", &published(3, &Config::default()));
        assert_eq!(hub.version("team-a"), Some(3));
        assert!(!changes.has_changed().unwrap(), "an older or equal version is not a change");
        let garbled = Published { version: 9, content: b"{not json".to_vec(), ours: true, ..Published::default() };
        hub.publish("team-a", &garbled);
        assert_eq!(hub.version("team-a"), Some(3), "an unreadable configuration is not pushed");
        assert_eq!(hub.version("team-b"), None, "namespaces are apart");
    }
}
