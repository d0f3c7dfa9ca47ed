//! What a namespace should look like: its compiled configuration Secret, the status of each
//! ProviderRoute and ApiKeyBudget, and the events that report what changed.
//!
//! Pure: the reconciler feeds it what its caches hold and carries out the result; tests feed it
//! objects. The rules of the API are those of [`crate::config::analyse`], the same as standalone
//! mode's; this module only decides what the cluster sees of them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::api::{
    ApiKeyBudget, ApiKeyBudgetStatus, LEDGER_CONDITION, ProviderRoute, ProviderRouteStatus, TargetStatus,
};
use crate::config::{
    CompiledConfig, ConfigError, CredentialState, Document, Documents, LedgerEndpoint, ObjectOutcome, Resolver,
    analyse, content_hash,
};

/// The Secret each namespace's sidecars mount.
pub const CONFIG_SECRET: &str = "sideyard-config";
/// The key of the namespace's whole configuration: the operator's record and the stream's source,
/// never mounted whole by a pod injected now.
pub const CONFIG_KEY: &str = "config.json";
/// The pod label the injector sets to the pod's configuration group: pods of one group mount the
/// key `<group>.json`, which holds only what selects every pod of the group.
pub const CONFIG_GROUP_LABEL: &str = "sideyard.dev/config-group";
/// Labels that tell apart pods of one workload (revisions, ordinals, job runs): left out of the
/// group, so a workload's pods share one key across rollouts.
const VOLATILE_LABELS: [&str; 8] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
    "batch.kubernetes.io/job-completion-index",
    "job-completion-index",
];

/// A pod's configuration group: 16 hex digits of the SHA-256 of its labels but the volatile ones
/// (and the group label itself).
pub fn config_group(labels: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (key, value) in labels {
        if key != CONFIG_GROUP_LABEL && !VOLATILE_LABELS.contains(&key.as_str()) {
            hash.update(key.as_bytes());
            hash.update(b"=");
            hash.update(value.as_bytes());
            hash.update(b"\n");
        }
    }
    crate::config::hex(&hash.finalize()[..8])
}

/// The Secret key of a configuration group.
pub fn group_key(group: &str) -> String {
    format!("{group}.json")
}
pub const VERSION_ANNOTATION: &str = "sideyard.dev/config-version";
pub const HASH_ANNOTATION: &str = "sideyard.dev/config-hash";
/// Marks the Secrets the operator owns; it deletes no other.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "sideyard-operator";
/// The API server refuses a Secret whose data is larger.
pub const SECRET_LIMIT: usize = 1 << 20;
/// Above this, statuses and events warn that the limit is near.
pub const SECRET_WARNING: usize = SECRET_LIMIT / 10 * 9;

/// Condition types.
pub const ACCEPTED: &str = "Accepted";
pub const READY: &str = "Ready";
pub const NEAR_LIMIT: &str = "ConfigNearLimit";
/// On routes, while sidecars follow the configuration stream: whether every selected, connected
/// pod serves the version the route's generation is in.
pub const PROGRAMMED: &str = "Programmed";

/// The configuration a namespace has now, as far as the operator knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub version: u64,
    /// The bytes of [`CONFIG_KEY`].
    pub content: Vec<u8>,
    /// Each configuration group's key and bytes.
    pub groups: BTreeMap<String, Vec<u8>>,
    /// Whether the Secret carries the operator's label.
    pub ours: bool,
}

impl Published {
    /// Reads a `sideyard-config` Secret; one without a readable version counts as version 0.
    pub fn from_secret(secret: &Secret) -> Published {
        let version = secret.annotations().get(VERSION_ANNOTATION).and_then(|v| v.parse().ok()).unwrap_or(0);
        let data = secret.data.clone().unwrap_or_default();
        let content = data.get(CONFIG_KEY).map(|b| b.0.clone()).unwrap_or_default();
        let groups = data.into_iter().filter(|(key, _)| key != CONFIG_KEY).map(|(key, bytes)| (key, bytes.0)).collect();
        let ours = secret.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
        Published { version, content, groups, ours }
    }
}

/// Everything the operator knows about one namespace.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub namespace: &'a str,
    pub routes: &'a [Arc<ProviderRoute>],
    pub budgets: &'a [Arc<ApiKeyBudget>],
    /// The namespace's Secrets (others are ignored).
    pub secrets: &'a [Arc<Secret>],
    pub published: Option<&'a Published>,
    pub now: Timestamp,
    /// The fleet's budget ledger (and configuration stream), written into every configuration.
    pub ledger: Option<&'a LedgerEndpoint>,
    /// The namespace's sidecars connected to the configuration stream; `None` when the stream is
    /// not served (then routes get no `Programmed` condition).
    pub connected: Option<&'a [ConnectedPod]>,
    /// The labels of the namespace's injected pods, by configuration group.
    pub groups: &'a BTreeMap<String, Vec<crate::config::selector::Labels>>,
    /// Targets the fleet holds, by (route `namespace/name`, target); `None` when the stream is not
    /// served (then targets report no health).
    pub held: Option<&'a BTreeMap<(String, String), HeldTarget>>,
}

/// Until when the fleet holds a target out of use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldTarget {
    pub ejected_until: Option<Timestamp>,
    pub cooling_until: Option<Timestamp>,
}

/// A sidecar connected to the configuration stream: its pod's labels and the version it says it
/// serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectedPod {
    pub labels: crate::config::selector::Labels,
    pub serves: Option<u64>,
}

/// What to change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub config: ConfigAction,
    /// Routes whose status differs from the desired one, with the status to apply.
    pub routes: Vec<(String, ProviderRouteStatus)>,
    pub budgets: Vec<(String, ApiKeyBudgetStatus)>,
    pub events: Vec<PlannedEvent>,
    /// Size of the compiled configuration; 0 without one.
    pub config_bytes: usize,
    /// The namespace's accepted budgets, compiled: what the ledger serves.
    pub compiled_budgets: Vec<crate::config::Budget>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub enum ConfigAction {
    /// The published configuration is the desired one (or there is none and none is needed).
    #[default]
    Keep,
    /// Apply this Secret, which publishes `version`.
    Apply { secret: Box<Secret>, published: Published },
    /// The namespace has no routes left: delete the Secret.
    Delete,
}

/// An event about one object.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedEvent {
    pub regarding: ObjectReference,
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

/// Credentials in a cluster come from Secrets: a pod's environment and files are not the
/// operator's to read.
struct ClusterResolver;

impl Resolver for ClusterResolver {
    fn env(&self, name: &str) -> Result<String, String> {
        Err(format!(
            "environment variable {name:?}: env credentials work in standalone mode only; in a cluster use secretRef"
        ))
    }
    fn file(&self, _: &str) -> std::io::Result<String> {
        Err(std::io::Error::other("file credentials work in standalone mode only; in a cluster use secretRef"))
    }
}

/// How the namespace's configuration stands after the plan is carried out.
enum Compiled {
    /// No routes, so no configuration.
    None,
    Published {
        version: u64,
        bytes: usize,
    },
    TooLarge {
        bytes: usize,
    },
}

pub fn plan(inputs: &Inputs<'_>) -> Plan {
    let mut routes: Vec<&ProviderRoute> = inputs.routes.iter().map(Arc::as_ref).collect();
    let mut budgets: Vec<&ApiKeyBudget> = inputs.budgets.iter().map(Arc::as_ref).collect();
    // What is being served keeps what it holds: a route the published configuration serves keeps
    // its model names, a budget its key. Among the rest the older object claims first, and the
    // name breaks ties (creation times have whole seconds).
    let serving = Serving::of(inputs.published);
    routes.sort_by_cached_key(|r| claim_order(r.meta(), &serving.routes));
    budgets.sort_by_cached_key(|b| claim_order(b.meta(), &serving.budgets));

    let referenced = referenced_secrets(&routes, &budgets);
    let docs = Documents {
        routes: routes.iter().map(|r| Document { origin: None, object: (*r).clone() }).collect(),
        budgets: budgets.iter().map(|b| Document { origin: None, object: (*b).clone() }).collect(),
        secrets: inputs
            .secrets
            .iter()
            .filter(|s| s.metadata.name.as_deref().is_some_and(|n| referenced.contains(n)) || issues_a_key(&budgets, s))
            .map(|s| Document { origin: None, object: (**s).clone() })
            .collect(),
        compiled: Vec::new(),
    };
    let mut analysis = analyse(&docs, &ClusterResolver);
    // Every configuration names the ledger: its budgets lease there, and its sidecars take their
    // configuration stream from the same listener.
    analysis.config.ledger = inputs.ledger.cloned();

    let mut plan = Plan { compiled_budgets: analysis.config.budgets.clone(), ..Plan::default() };
    let compiled = if routes.is_empty() {
        // Nothing is compiled, so the ledger keeps no budget of the namespace.
        plan.compiled_budgets.clear();
        if inputs.published.is_some_and(|p| p.ours) {
            plan.config = ConfigAction::Delete;
        }
        Compiled::None
    } else {
        let current = inputs.published.map_or(0, |p| p.version);
        let unchanged = serialise(&CompiledConfig::new(inputs.namespace, current, analysis.config.clone()));
        // The version grows with the namespace's configuration only, not with its pods' groups.
        let (version, content) = if inputs.published.is_some_and(|p| p.content == unchanged) {
            (current, unchanged)
        } else {
            // Statuses remember versions too: a Secret deleted by hand does not restart the count.
            let reported = routes
                .iter()
                .filter_map(|r| r.status.as_ref()?.config_version)
                .chain(budgets.iter().filter_map(|b| b.status.as_ref()?.config_version))
                .max()
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0);
            let version = current.max(reported) + 1;
            (version, serialise(&CompiledConfig::new(inputs.namespace, version, analysis.config.clone())))
        };
        let groups: BTreeMap<String, Vec<u8>> = inputs
            .groups
            .iter()
            .map(|(group, pods)| {
                let mut config = analysis.config.clone();
                config.retain_for_all(pods);
                (group_key(group), serialise(&CompiledConfig::new(inputs.namespace, version, config)))
            })
            .collect();
        let bytes = content.len() + groups.iter().map(|(key, data)| key.len() + data.len()).sum::<usize>();
        let desired = Published { version, content, groups, ours: true };
        if bytes > SECRET_LIMIT {
            Compiled::TooLarge { bytes }
        } else {
            if inputs.published != Some(&desired) {
                let secret = config_secret(inputs.namespace, &desired, &content_hash(&analysis.config));
                plan.config = ConfigAction::Apply { secret: Box::new(secret), published: desired };
            }
            Compiled::Published { version, bytes }
        }
    };
    plan.config_bytes = match compiled {
        Compiled::Published { bytes, .. } | Compiled::TooLarge { bytes } => bytes,
        Compiled::None => 0,
    };

    let outcome =
        |kind: &str, name: &str| analysis.outcomes.iter().find(|o| o.object.kind == kind && o.object.name == name);
    for route in &routes {
        let Some(outcome) = outcome("ProviderRoute", &route.name_any()) else { continue };
        let current = route.status.clone().unwrap_or_default();
        let (mut conditions, version) = conditions(outcome, &compiled, route.meta(), &current.conditions, inputs.now);
        if let Some(pods) = inputs.connected {
            conditions.push(programmed(route, version, pods, &current.conditions, inputs.now));
        }
        let desired = ProviderRouteStatus {
            observed_generation: route.metadata.generation,
            conditions,
            config_version: version,
            targets: outcome
                .credentials
                .iter()
                .map(|t| target_status(t, inputs.held.map(|h| h.get(&(route_id(route), t.target.clone())))))
                .collect(),
            target_names: Some(route.spec.targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(",")),
        };
        events(&mut plan.events, *route, &current.conditions, &desired.conditions);
        if desired != current {
            plan.routes.push((route.name_any(), desired));
        }
    }
    for budget in &budgets {
        let Some(outcome) = outcome("ApiKeyBudget", &budget.name_any()) else { continue };
        let current = budget.status.clone().unwrap_or_default();
        let (conditions, version) = conditions(outcome, &compiled, budget.meta(), &current.conditions, inputs.now);
        // Spend, balance and state belong to the ledger; this only owns what compile decides.
        let desired = ApiKeyBudgetStatus {
            observed_generation: budget.metadata.generation,
            conditions,
            config_version: version,
            ..Default::default()
        };
        let mine = ApiKeyBudgetStatus {
            observed_generation: current.observed_generation,
            // The ledger's condition is the ledger's to keep.
            conditions: current.conditions.iter().filter(|c| c.type_ != LEDGER_CONDITION).cloned().collect(),
            config_version: current.config_version,
            ..Default::default()
        };
        events(&mut plan.events, *budget, &current.conditions, &desired.conditions);
        if desired != mine {
            plan.budgets.push((budget.name_any(), desired));
        }
    }
    plan
}

/// The order in which objects claim what only one may have: those being served first, then by
/// creation time, then by name.
fn claim_order(meta: &ObjectMeta, serving: &HashSet<String>) -> (bool, Option<Timestamp>, String) {
    let name = meta.name.clone().unwrap_or_default();
    (!serving.contains(&name), meta.creation_timestamp.as_ref().map(|t| t.0), name)
}

/// The routes and budgets, by name, that the namespace's published configuration serves.
#[derive(Default)]
struct Serving {
    routes: HashSet<String>,
    budgets: HashSet<String>,
}

impl Serving {
    /// Read leniently: only names are needed, and a configuration an older operator published
    /// must still count.
    fn of(published: Option<&Published>) -> Serving {
        #[derive(serde::Deserialize)]
        struct Names {
            name: String,
        }
        #[derive(serde::Deserialize)]
        struct Content {
            #[serde(default)]
            routes: Vec<Names>,
            #[serde(default)]
            budgets: Vec<Names>,
        }
        #[derive(serde::Deserialize)]
        struct PublishedNames {
            config: Content,
        }
        let Some(document) = published.and_then(|p| serde_json::from_slice::<PublishedNames>(&p.content).ok()) else {
            return Serving::default();
        };
        Serving {
            routes: document.config.routes.into_iter().map(|r| r.name).collect(),
            budgets: document.config.budgets.into_iter().map(|b| b.name).collect(),
        }
    }
}

fn referenced_secrets<'a>(routes: &[&'a ProviderRoute], budgets: &[&'a ApiKeyBudget]) -> HashSet<&'a str> {
    let from_routes =
        routes.iter().flat_map(|r| &r.spec.targets).filter_map(|t| t.credentials.as_ref()?.secret_ref.as_ref());
    let from_budgets = budgets.iter().filter_map(|b| b.spec.key.as_ref()?.secret_ref.as_ref());
    from_routes.chain(from_budgets).map(|r| r.name.as_str()).collect()
}

/// Whether a budget's `keys` template selects the Secret: it is then a key of its own.
fn issues_a_key(budgets: &[&ApiKeyBudget], secret: &Secret) -> bool {
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    budgets
        .iter()
        .filter_map(|b| b.spec.keys.as_ref())
        .any(|k| crate::config::selector::matches(&k.secret_selector, &labels))
}

fn serialise(compiled: &CompiledConfig) -> Vec<u8> {
    // Plain data with string keys: serialising it cannot fail.
    serde_json::to_vec(compiled).unwrap_or_default()
}

/// The Secret that publishes `published`, whose configuration's content hash is `hash`.
pub fn config_secret(namespace: &str, published: &Published, hash: &str) -> Secret {
    let mut data = BTreeMap::from([(CONFIG_KEY.to_string(), ByteString(published.content.clone()))]);
    data.extend(published.groups.iter().map(|(key, bytes)| (key.clone(), ByteString(bytes.clone()))));
    Secret {
        metadata: ObjectMeta {
            name: Some(CONFIG_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                ("app.kubernetes.io/part-of".into(), "sideyard".into()),
            ])),
            annotations: Some(BTreeMap::from([
                (VERSION_ANNOTATION.into(), published.version.to_string()),
                (HASH_ANNOTATION.into(), hash.into()),
            ])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The `Accepted`, `Ready` and (near the size limit) `ConfigNearLimit` conditions of an object,
/// and the configuration version it is in.
fn conditions(
    outcome: &ObjectOutcome,
    compiled: &Compiled,
    meta: &ObjectMeta,
    current: &[Condition],
    now: Timestamp,
) -> (Vec<Condition>, Option<i64>) {
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(type_, ok, reason, message, meta, current, now)
    };
    let accepted = match outcome.errors.first() {
        None => condition(ACCEPTED, true, "Accepted", "the spec is valid and its references resolve".into()),
        Some(first) => condition(ACCEPTED, false, first.reason.as_str(), problems(&outcome.errors)),
    };
    let mut version = None;
    let ready = match compiled {
        _ if !outcome.accepted() => condition(
            READY,
            false,
            "NotAccepted",
            "not in the namespace's configuration: see the Accepted condition".into(),
        ),
        Compiled::Published { version: v, .. } => {
            version = Some(i64::try_from(*v).unwrap_or(i64::MAX));
            condition(READY, true, "Compiled", format!("compiled into Secret {CONFIG_SECRET}, version {v}"))
        }
        Compiled::TooLarge { bytes } => condition(
            READY,
            false,
            "ConfigTooLarge",
            format!(
                "the namespace's compiled configuration is {bytes} bytes, over the {SECRET_LIMIT}-byte Secret limit; the previous configuration stays in place"
            ),
        ),
        // Budgets in a namespace without routes: there is nothing to compile them into.
        Compiled::None => condition(
            READY,
            false,
            "NoRoutes",
            "the namespace has no ProviderRoute, so there is no configuration to compile into".into(),
        ),
    };
    let mut conditions = vec![accepted, ready];
    if let Compiled::Published { bytes, .. } = compiled
        && *bytes > SECRET_WARNING
    {
        let message = format!(
            "the namespace's compiled configuration is {bytes} bytes of the {SECRET_LIMIT}-byte Secret limit; split routes across namespaces or remove unused ones"
        );
        conditions.push(condition(NEAR_LIMIT, true, "ConfigNearLimit", message));
    }
    (conditions, version)
}

/// A condition of an object whose conditions are `current` now: its transition time moves only
/// when its status does.
fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    meta: &ObjectMeta,
    current: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = current
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: meta.generation,
        last_transition_time: since,
    }
}

/// The `Programmed` condition of a route in configuration `version` (none: not served): how many
/// of the connected pods its `workloadSelector` selects serve that version or a newer one.
fn programmed(
    route: &ProviderRoute,
    version: Option<i64>,
    pods: &[ConnectedPod],
    current: &[Condition],
    now: Timestamp,
) -> Condition {
    let condition = |ok: bool, reason: &str, message: String| {
        condition(PROGRAMMED, ok, reason, message, route.meta(), current, now)
    };
    let Some(version) = version.and_then(|v| u64::try_from(v).ok()) else {
        return condition(false, "NotReady", "not in the namespace's configuration: see the Ready condition".into());
    };
    let selector = route.spec.workload_selector.as_ref();
    let selected: Vec<&ConnectedPod> =
        pods.iter().filter(|p| selector.is_none_or(|s| crate::config::selector::matches(s, &p.labels))).collect();
    let serving = selected.iter().filter(|p| p.serves.is_some_and(|v| v >= version)).count();
    let lagging = selected.len() - serving;
    if lagging == 0 {
        let message = match serving {
            0 => format!("no connected pod is selected; configuration version {version} is published"),
            n => format!("all {n} selected, connected pods serve configuration version {version} or newer"),
        };
        condition(true, "Programmed", message)
    } else {
        let message = format!(
            "{serving} of {} selected, connected pods serve configuration version {version}; {lagging} lag behind",
            selected.len()
        );
        condition(false, "RollingOut", message)
    }
}

/// Every problem of an object, without the object's name (the status is on the object).
fn problems(errors: &[ConfigError]) -> String {
    let each =
        errors.iter().map(|e| if e.path.is_empty() { e.message.clone() } else { format!("{}: {}", e.path, e.message) });
    each.collect::<Vec<_>>().join("; ")
}

/// A target's status: its credentials, and what the fleet holds of it (`held`: `None` when the
/// stream is not served, `Some(None)` when nothing is held).
fn target_status(t: &crate::config::TargetCredential, held: Option<Option<&HeldTarget>>) -> TargetStatus {
    let (credentials, message) = match &t.state {
        CredentialState::NotConfigured => ("NotConfigured", None),
        CredentialState::Resolved => ("Resolved", None),
        CredentialState::Unresolved { reason, message } => (reason.as_str(), Some(message.clone())),
    };
    let (health, held_until) = match held {
        None => (None, None),
        Some(held) => {
            let held = held.copied().unwrap_or_default();
            let seconds = |t: Timestamp| rfc3339_seconds(t);
            match (held.ejected_until, held.cooling_until) {
                (Some(until), _) => (Some("Ejected"), Some(seconds(until))),
                (None, Some(until)) => (Some("CoolingDown"), Some(seconds(until))),
                (None, None) => (Some("Healthy"), None),
            }
        }
    };
    TargetStatus {
        name: t.target.clone(),
        credentials: credentials.into(),
        message,
        health: health.map(String::from),
        held_until,
    }
}

/// `namespace/name`, as routes are named in metrics and by sidecars.
fn route_id(route: &ProviderRoute) -> String {
    format!("{}/{}", route.namespace().unwrap_or_default(), route.name_any())
}

/// A time to the second, so that a status does not change with sub-second jitter.
fn rfc3339_seconds(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second()).unwrap_or(t).to_string()
}

/// Events for the conditions that changed: a problem appearing or changing, readiness gained, and
/// the size warnings. Steady states post nothing.
fn events<K: Resource<DynamicType = ()>>(
    out: &mut Vec<PlannedEvent>,
    object: &K,
    before: &[Condition],
    after: &[Condition],
) {
    let find = |list: &[Condition], type_: &str| list.iter().find(|c| c.type_ == type_).cloned();
    let mut post = |type_: EventType, c: &Condition| {
        out.push(PlannedEvent {
            regarding: object.object_ref(&()),
            type_,
            reason: c.reason.clone(),
            note: truncate(&c.message, 1024),
        })
    };
    let changed = |type_: &str| {
        let (old, new) = (find(before, type_), find(after, type_));
        let differs = old.as_ref().map(|c| (&c.status, &c.reason)) != new.as_ref().map(|c| (&c.status, &c.reason));
        new.filter(|_| differs)
    };
    if let Some(c) = changed(ACCEPTED).filter(|c| c.status == "False") {
        post(EventType::Warning, &c);
    }
    if let Some(c) = changed(READY) {
        match (c.status.as_str(), c.reason.as_str()) {
            ("True", _) => post(EventType::Normal, &c),
            (_, "ConfigTooLarge") => post(EventType::Warning, &c),
            _ => {}
        }
    }
    if let Some(c) = changed(NEAR_LIMIT) {
        post(EventType::Warning, &c);
    }
}

/// At most `max` bytes, cut at a character boundary (events.k8s.io refuses longer notes).
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}...", crate::api::units::prefix(s, max - 3))
}
