//! The operator without a cluster: what it plans for a namespace (pure), the exact API
//! conversations it holds (tower-test), its watch wiring (synthetic streams into
//! `Controller::for_stream`), leader election, and a real process against a fake API server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use http::{Method, Request, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sideyard::api::{ApiKeyBudget, ProviderRoute};
use sideyard::config::{CompiledConfig, LedgerEndpoint, Reason};
use sideyard::operator::controller::{
    self, Context, Error, FIELD_MANAGER, Stores, generation, reconcile, resource_version, secret_matters, triggers,
};
use sideyard::operator::events::Events;
use sideyard::operator::leader::{Elector, Leadership, LeaseSettings, LostLease};
use sideyard::operator::metrics::OperatorMetrics;
use sideyard::operator::plan::{
    CONFIG_SECRET, ConfigAction, ConnectedPod, HeldTarget, Inputs, Plan, Published, SECRET_LIMIT, SECRET_WARNING,
    config_group, group_key, plan,
};
use sideyard::operator::tls::{self, TlsSettings};
use tower_test::mock::Handle;

use common::cluster::{FakeApi, lease, list, not_found, operator_args, serve_fake_api, writes_to};

mod common;

// ---------------------------------------------------------------------------------------------
// Objects

const NS: &str = "team-a";

fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(1_700_000_000 + seconds).unwrap())
}

fn meta(name: &str, created: i64) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        resource_version: Some("1".into()),
        creation_timestamp: Some(at(created)),
        ..Default::default()
    }
}

fn route(name: &str, created: i64, spec: Value) -> Arc<ProviderRoute> {
    let mut route: ProviderRoute = serde_json::from_value(
        json!({"apiVersion": "sideyard.dev/v1alpha1", "kind": "ProviderRoute", "metadata": {}, "spec": spec}),
    )
    .unwrap();
    route.metadata = meta(name, created);
    Arc::new(route)
}

/// A route for `model` whose one target reads its key from Secret `keys`.
fn keyed_route(name: &str, model: &str, created: i64) -> Arc<ProviderRoute> {
    route(
        name,
        created,
        json!({"model": model, "targets": [{"name": "openai", "baseUrl": "https://api.example.com/v1",
            "credentials": {"secretRef": {"name": "keys", "key": "openai"}}}]}),
    )
}

/// Route `invoices`, for pods labelled `app: billing` only, its credential the key
/// `credential_key` of Secret `keys`.
fn billing_route(credential_key: &str) -> Arc<ProviderRoute> {
    route(
        "invoices",
        0,
        json!({"model": "invoices", "workloadSelector": {"matchLabels": {"app": "billing"}},
               "targets": [{"name": "openai", "baseUrl": "https://api.example.com/v1",
                            "credentials": {"secretRef": {"name": "keys", "key": credential_key}}}]}),
    )
}

fn budget(name: &str, created: i64, spec: Value) -> Arc<ApiKeyBudget> {
    let mut budget: ApiKeyBudget = serde_json::from_value(
        json!({"apiVersion": "sideyard.dev/v1alpha1", "kind": "ApiKeyBudget", "metadata": {}, "spec": spec}),
    )
    .unwrap();
    budget.metadata = meta(name, created);
    Arc::new(budget)
}

fn secret(name: &str, data: &[(&str, &str)]) -> Arc<Secret> {
    Arc::new(Secret {
        metadata: meta(name, 0),
        data: Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()),
        ..Default::default()
    })
}

fn keys() -> Arc<Secret> {
    secret("keys", &[("openai", "sk-upstream"), ("app", "sk-app")])
}

struct World {
    routes: Vec<Arc<ProviderRoute>>,
    budgets: Vec<Arc<ApiKeyBudget>>,
    secrets: Vec<Arc<Secret>>,
    published: Option<Published>,
    ledger: Option<LedgerEndpoint>,
    connected: Option<Vec<ConnectedPod>>,
    groups: BTreeMap<String, Vec<BTreeMap<String, String>>>,
    held: Option<BTreeMap<(String, String), HeldTarget>>,
}

impl World {
    fn new(routes: Vec<Arc<ProviderRoute>>, secrets: Vec<Arc<Secret>>) -> World {
        World {
            routes,
            budgets: Vec::new(),
            secrets,
            published: None,
            ledger: None,
            connected: None,
            groups: BTreeMap::new(),
            held: None,
        }
    }

    fn plan(&self) -> Plan {
        plan(&Inputs {
            namespace: NS,
            routes: &self.routes,
            budgets: &self.budgets,
            secrets: &self.secrets,
            published: self.published.as_ref(),
            now: at(1000).0,
            ledger: self.ledger.as_ref(),
            connected: self.connected.as_deref(),
            groups: &self.groups,
            held: self.held.as_ref(),
        })
    }

    /// What the cluster looks like after `plan` is carried out.
    fn apply(&mut self, plan: &Plan) {
        match &plan.config {
            ConfigAction::Keep => {}
            ConfigAction::Apply { published, .. } => self.published = Some(published.clone()),
            ConfigAction::Delete => self.published = None,
        }
        for (name, status) in &plan.routes {
            let r = self.routes.iter_mut().find(|r| r.name_any() == *name).unwrap();
            Arc::make_mut(r).status = Some(status.clone());
        }
        for (name, status) in &plan.budgets {
            let b = self.budgets.iter_mut().find(|b| b.name_any() == *name).unwrap();
            Arc::make_mut(b).status = Some(status.clone());
        }
    }
}

fn applied_config(plan: &Plan) -> (Secret, CompiledConfig) {
    let ConfigAction::Apply { secret, .. } = &plan.config else { panic!("expected a config write: {:?}", plan.config) };
    let content = &secret.data.as_ref().unwrap()["config.json"].0;
    (*secret.clone(), serde_json::from_slice(content).unwrap())
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> (&'a str, &'a str, &'a str) {
    let c = conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} in {conditions:?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn route_status<'a>(plan: &'a Plan, name: &str) -> &'a sideyard::api::ProviderRouteStatus {
    &plan.routes.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no status for {name}: {plan:?}")).1
}

fn event_reasons(plan: &Plan) -> Vec<(String, EventType, String)> {
    plan.events.iter().map(|e| (e.regarding.name.clone().unwrap(), e.type_, e.reason.clone())).collect()
}

// ---------------------------------------------------------------------------------------------
// What a namespace should look like

#[test]
fn a_valid_route_is_published_and_reported_ready() {
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    let plan = world.plan();

    let (secret, compiled) = applied_config(&plan);
    assert_eq!(secret.metadata.name.as_deref(), Some(CONFIG_SECRET));
    assert_eq!(secret.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(secret.labels()["app.kubernetes.io/managed-by"], "sideyard-operator");
    assert_eq!(secret.annotations()["sideyard.dev/config-version"], "1");
    assert_eq!(secret.annotations()["sideyard.dev/config-hash"], compiled.hash);
    assert_eq!(compiled.version, 1);
    let config = compiled.into_config().unwrap();
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.routes[0].targets[0].credential.as_ref().unwrap().expose(), "sk-upstream");

    let status = route_status(&plan, "chat");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        condition(&status.conditions, "Accepted"),
        ("True", "Accepted", "the spec is valid and its references resolve")
    );
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("True", "Compiled", "compiled into Secret sideyard-config, version 1")
    );
    assert_eq!(status.config_version, Some(1));
    assert_eq!(status.targets[0].name, "openai");
    assert_eq!(status.targets[0].credentials, "Resolved");
    assert_eq!(event_reasons(&plan), [("chat".into(), EventType::Normal, "Compiled".into())]);

    // A second pass over the result changes nothing: no write, no status, no event.
    world.apply(&plan);
    assert_eq!(world.plan(), Plan { config_bytes: plan.config_bytes, ..Plan::default() });
}

#[test]
fn a_secret_that_appears_later_turns_secret_not_found_into_ready() {
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![]);
    let plan = world.plan();
    let status = route_status(&plan, "chat");
    let (_, reason, message) = condition(&status.conditions, "Accepted");
    assert_eq!(reason, "SecretNotFound");
    assert_eq!(message, "spec.targets[0].credentials: secret \"keys\" not found");
    assert_eq!(condition(&status.conditions, "Ready").1, "NotAccepted");
    assert_eq!(status.config_version, None);
    assert_eq!(status.targets[0].credentials, "SecretNotFound");
    assert_eq!(status.targets[0].message.as_deref(), Some("secret \"keys\" not found"));
    assert_eq!(event_reasons(&plan), [("chat".into(), EventType::Warning, "SecretNotFound".into())]);
    // The namespace still gets a configuration (with no routes), version 1.
    assert!(applied_config(&plan).1.config.routes.is_empty());
    world.apply(&plan);
    let not_found_since = route_status(&plan, "chat").conditions[0].last_transition_time.clone();

    // The Secret exists, without the key yet.
    world.secrets.push(secret("keys", &[("other", "x")]));
    let plan = world.plan();
    let status = route_status(&plan, "chat");
    assert_eq!(condition(&status.conditions, "Accepted").1, "KeyNotFound");
    assert_eq!(status.conditions[0].last_transition_time, not_found_since, "still False: the time stays");
    assert_eq!(event_reasons(&plan), [("chat".into(), EventType::Warning, "KeyNotFound".into())]);
    world.apply(&plan);

    world.secrets = vec![keys()];
    let plan = world.plan();
    let (_, compiled) = applied_config(&plan);
    assert_eq!(compiled.version, 2);
    assert_eq!(compiled.config.routes.len(), 1);
    let status = route_status(&plan, "chat");
    assert_eq!(condition(&status.conditions, "Accepted").0, "True");
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("True", "Compiled", "compiled into Secret sideyard-config, version 2")
    );
    assert_eq!(status.targets[0].credentials, "Resolved");
    assert_eq!(event_reasons(&plan), [("chat".into(), EventType::Normal, "Compiled".into())]);
}

#[test]
fn the_older_route_keeps_a_contested_model() {
    // The newer route is listed first: age decides, not order.
    let newer =
        route("newer", 50, json!({"model": "other", "aliases": ["chat"], "targets": [{"name": "m", "api": "mock"}]}));
    let older = route("older", 10, json!({"model": "chat", "targets": [{"name": "m", "api": "mock"}]}));
    let world = World::new(vec![newer, older], vec![]);
    let plan = world.plan();
    let (_, compiled) = applied_config(&plan);
    let served: Vec<_> = compiled.config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(served, ["older"]);
    let (status, reason, message) = condition(&route_status(&plan, "newer").conditions, "Accepted");
    assert_eq!((status, reason), ("False", "DuplicateModel"));
    assert_eq!(message, "spec.aliases[0]: model \"chat\" is already served by ProviderRoute team-a/older");
    assert_eq!(condition(&route_status(&plan, "older").conditions, "Ready").0, "True");
}

#[test]
fn the_older_route_stays_the_pass_through_default_and_the_newer_says_why_it_is_not_served() {
    let newer = route(
        "batches",
        50,
        json!({"model": "batches", "passthroughDefault": true, "targets": [{"name": "m", "api": "mock"}]}),
    );
    let older = route(
        "files",
        10,
        json!({"model": "files", "passthroughDefault": true, "targets": [{"name": "m", "api": "mock"}]}),
    );
    let world = World::new(vec![newer, older], vec![]);
    let plan = world.plan();
    let (_, compiled) = applied_config(&plan);
    let defaults: Vec<_> =
        compiled.config.routes.iter().filter(|r| r.passthrough_default).map(|r| r.name.as_str()).collect();
    assert_eq!(defaults, ["files"]);
    let (status, reason, message) = condition(&route_status(&plan, "batches").conditions, "Accepted");
    assert_eq!((status, reason), ("False", "DuplicatePassthroughDefault"));
    assert_eq!(
        message,
        "spec.passthroughDefault: ProviderRoute team-a/files is already the namespace's pass-through default; there is one per namespace"
    );
}

#[test]
fn a_route_created_in_the_same_second_never_takes_the_model_from_the_serving_one() {
    let serving = route("zeta", 10, json!({"model": "chat", "targets": [{"name": "m", "api": "mock"}]}));
    let mut world = World::new(vec![serving], vec![]);
    let plan = world.plan();
    world.apply(&plan);
    // Created in the same second (timestamps have whole seconds), with a name that sorts first.
    let newcomer = route("alpha", 10, json!({"model": "chat", "targets": [{"name": "m", "api": "mock"}]}));
    world.routes.insert(0, newcomer);
    let plan = world.plan();
    let served: Vec<_> = match &plan.config {
        ConfigAction::Keep => vec!["zeta".to_string()],
        ConfigAction::Apply { .. } => applied_config(&plan).1.config.routes.iter().map(|r| r.name.clone()).collect(),
        ConfigAction::Delete => panic!("the model is still served"),
    };
    assert_eq!(served, ["zeta"], "the serving route keeps the model");
    let (status, reason, message) = condition(&route_status(&plan, "alpha").conditions, "Accepted");
    assert_eq!((status, reason), ("False", "DuplicateModel"));
    assert_eq!(message, "spec.model: model \"chat\" is already served by ProviderRoute team-a/zeta");

    // Without a published configuration (nothing serves yet), the name breaks the tie.
    let fresh = World::new(world.routes.clone(), vec![]);
    let (_, compiled) = applied_config(&fresh.plan());
    assert_eq!(compiled.config.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["alpha"]);
}

#[test]
fn a_budget_being_served_keeps_its_key_against_a_newcomer() {
    let key = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}});
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    world.budgets = vec![budget("zeta", 10, key.clone())];
    let plan = world.plan();
    world.apply(&plan);
    world.budgets.insert(0, budget("alpha", 10, key));
    let plan = world.plan();
    let (_, reason, _) = condition(&plan.budgets.iter().find(|(n, _)| n == "alpha").unwrap().1.conditions, "Accepted");
    assert_eq!(reason, "DuplicateKey");
    assert!(plan.budgets.iter().all(|(n, _)| n != "zeta"), "the serving budget's status is unchanged: {plan:?}");
}

#[test]
fn a_key_template_issues_a_key_per_labelled_secret_of_its_namespace() {
    let labelled = |name: &str, key: &str, label: Option<&str>| {
        let mut s = (*secret(name, &[("key", key)])).clone();
        s.metadata.labels = label.map(|l| [("sideyard.dev/key".to_string(), l.to_string())].into());
        Arc::new(s)
    };
    let secrets = vec![
        keys(),
        labelled("alice", "sk-alice", Some("bots")),
        labelled("bob", "sk-bob", Some("other")),
        labelled("carol", "sk-carol", None),
    ];
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], secrets);
    world.budgets = vec![budget(
        "bots",
        0,
        json!({"keys": {"secretSelector": {"matchLabels": {"sideyard.dev/key": "bots"}}}, "limit": "5"}),
    )];
    let plan = world.plan();
    let (_, compiled) = applied_config(&plan);
    let names: Vec<&str> = compiled.config.budgets.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["bots:alice"], "only the Secret the template selects is a key");
    assert_eq!(compiled.config.budgets[0].limit, Some(5_000_000));
    let status = &plan.budgets.iter().find(|(n, _)| n == "bots").unwrap().1;
    assert_eq!(condition(&status.conditions, "Accepted").0, "True");
}

#[test]
fn budgets_are_compiled_with_their_key_hash_and_reported() {
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    world.budgets = vec![
        budget("bot", 0, json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "10"})),
        budget("copy", 5, json!({"key": {"secretRef": {"name": "keys", "key": "app"}}})),
        budget("ghost", 6, json!({"key": {"secretRef": {"name": "gone", "key": "k"}}})),
    ];
    let plan = world.plan();
    let (_, compiled) = applied_config(&plan);
    assert_eq!(compiled.config.budgets.len(), 1);
    assert_eq!(compiled.config.budgets[0].limit, Some(10_000_000));
    let status = |name: &str| &plan.budgets.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(condition(&status("bot").conditions, "Ready").0, "True");
    assert_eq!(status("bot").config_version, Some(1));
    assert_eq!(status("bot").ledger.spent, None, "spend belongs to the ledger");
    assert_eq!(condition(&status("copy").conditions, "Accepted").1, Reason::DuplicateKey.as_str());
    assert_eq!(condition(&status("ghost").conditions, "Accepted").1, "SecretNotFound");
    world.apply(&plan);
    assert!(world.plan().budgets.is_empty(), "steady budgets are not patched again");
    // The ledger's own condition is not the reconciler's to remove.
    let bot = world.budgets.iter_mut().find(|b| b.name_any() == "bot").unwrap();
    let ledger = Condition {
        type_: "Ledger".into(),
        status: "True".into(),
        reason: "Serving".into(),
        message: "kept by the ledger of operator replica op-1".into(),
        last_transition_time: at(5),
        observed_generation: None,
    };
    Arc::make_mut(bot).status.as_mut().unwrap().conditions.push(ledger);
    assert!(world.plan().budgets.is_empty(), "{:?}", world.plan().budgets);
}

#[test]
fn every_configuration_names_the_fleet_ledger_once_it_is_known() {
    let ledger = LedgerEndpoint { url: "https://sideyard-webhook.ops.svc:8444".into(), ca_bundle: "CA".into() };
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    let (_, compiled) = applied_config(&world.plan());
    assert_eq!(compiled.config.ledger, None, "not known yet: the sidecars keep their mounted configuration");
    world.ledger = Some(ledger.clone());
    let (_, compiled) = applied_config(&world.plan());
    assert_eq!(compiled.config.ledger.as_ref(), Some(&ledger), "without budgets too: the stream is there");
    world.budgets =
        vec![budget("bot", 0, json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "10"}))];
    let plan = world.plan();
    let (_, compiled) = applied_config(&plan);
    assert_eq!(compiled.config.ledger.as_ref(), Some(&ledger));
    world.apply(&plan);
    // A new CA is a new configuration.
    world.ledger = Some(LedgerEndpoint { ca_bundle: "CA2".into(), ..ledger });
    let (_, compiled) = applied_config(&world.plan());
    assert_eq!(compiled.config.ledger.unwrap().ca_bundle, "CA2");
}

#[test]
fn programmed_counts_the_selected_connected_pods_that_serve_the_routes_version() {
    let billing = billing_route("openai");
    let mut world = World::new(vec![keyed_route("chat", "chat", 0), billing], vec![keys()]);
    let pod = |app: &str, serves: Option<u64>| ConnectedPod { labels: [("app".into(), app.into())].into(), serves };
    let programmed = |plan: &Plan, route: &str| {
        let (status, reason, message) = condition(&route_status(plan, route).conditions, "Programmed");
        (status.to_string(), reason.to_string(), message.to_string())
    };
    // Without the stream, there is nothing to count.
    let plan = world.plan();
    assert!(route_status(&plan, "chat").conditions.iter().all(|c| c.type_ != "Programmed"));
    // Version 1 is being published: every connected pod lags until it says it serves it.
    world.connected = Some(vec![pod("web", None), pod("billing", None)]);
    let plan = world.plan();
    assert_eq!(
        programmed(&plan, "chat"),
        (
            "False".into(),
            "RollingOut".into(),
            "0 of 2 selected, connected pods serve configuration version 1; 2 lag behind".into()
        )
    );
    assert_eq!(
        programmed(&plan, "invoices").2,
        "0 of 1 selected, connected pods serve configuration version 1; 1 lag behind",
        "only the pods the route selects count"
    );
    world.apply(&plan);
    world.connected = Some(vec![pod("web", Some(1)), pod("billing", None)]);
    let plan = world.plan();
    assert_eq!(
        programmed(&plan, "chat").2,
        "1 of 2 selected, connected pods serve configuration version 1; 1 lag behind"
    );
    assert!(plan.routes.iter().all(|(name, _)| name != "invoices"), "the billing route's count did not change");
    world.apply(&plan);
    world.connected = Some(vec![pod("web", Some(1)), pod("billing", Some(2))]);
    let plan = world.plan();
    assert_eq!(
        programmed(&plan, "chat"),
        (
            "True".into(),
            "Programmed".into(),
            "all 2 selected, connected pods serve configuration version 1 or newer".into()
        )
    );
    world.apply(&plan);
    assert!(world.plan().routes.is_empty(), "nothing changed: no status write");
    world.connected = Some(vec![]);
    let plan = world.plan();
    assert_eq!(programmed(&plan, "chat").2, "no connected pod is selected; configuration version 1 is published");
}

#[test]
fn each_configuration_group_gets_only_what_selects_all_its_pods_and_versions_do_not_move_for_groups() {
    let billing = billing_route("invoices");
    let keys = secret("keys", &[("openai", "sk-upstream"), ("invoices", "sk-invoices")]);
    let mut world = World::new(vec![keyed_route("chat", "chat", 0), billing], vec![keys]);
    let labels = |app: &str, hash: &str| -> BTreeMap<String, String> {
        [("app".to_string(), app.to_string()), ("pod-template-hash".to_string(), hash.to_string())].into()
    };
    let (web, billing) = (labels("web", "5d4f"), labels("billing", "77aa"));
    assert_eq!(config_group(&web), config_group(&labels("web", "6c1e")), "one group across a workload's rollouts");
    assert_ne!(config_group(&web), config_group(&billing));
    world.groups = [
        (config_group(&web), vec![web.clone()]),
        (config_group(&billing), vec![billing.clone(), billing.clone()]),
        // A group whose pods were relabelled apart: only what selects both.
        ("mixed".to_string(), vec![web.clone(), billing.clone()]),
    ]
    .into();
    let plan = world.plan();
    let (secret, compiled) = applied_config(&plan);
    let data = secret.data.unwrap();
    let group = |key: &str| -> CompiledConfig { serde_json::from_slice(&data[key].0).unwrap() };
    let models = |c: &CompiledConfig| c.config.routes.iter().map(|r| r.model.clone()).collect::<Vec<_>>();
    assert_eq!(models(&compiled), ["chat", "invoices"], "config.json keeps the whole namespace");
    assert_eq!(models(&group(&group_key(&config_group(&web)))), ["chat"]);
    assert_eq!(models(&group(&group_key(&config_group(&billing)))), ["chat", "invoices"]);
    assert_eq!(models(&group("mixed.json")), ["chat"]);
    let web_bytes = String::from_utf8_lossy(&data[&group_key(&config_group(&web))].0).into_owned();
    assert!(!web_bytes.contains("sk-invoices"), "no credential of a route that does not select the group");
    assert_eq!(group("mixed.json").version, compiled.version);
    group("mixed.json").into_config().expect("each group's hash is of its own content");
    world.apply(&plan);
    assert_eq!(world.plan().config, ConfigAction::Keep, "nothing changed");

    // A new group is a new key, not a new version.
    world.groups.insert(config_group(&labels("batch", "1")), vec![labels("batch", "1")]);
    let plan = world.plan();
    let ConfigAction::Apply { published, .. } = &plan.config else { panic!("the new group is written") };
    assert_eq!((published.version, published.groups.len()), (compiled.version, 4));
    assert!(plan.routes.is_empty(), "statuses do not change with groups");
}

#[test]
fn targets_say_what_the_fleet_holds_of_them() {
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    let health = |plan: &Plan| {
        let target = &route_status(plan, "chat").targets[0];
        (target.health.clone(), target.held_until.clone())
    };
    // Without the stream there is no fleet to speak for.
    let plan = world.plan();
    assert_eq!(health(&plan), (None, None));
    world.apply(&plan);
    world.held = Some(BTreeMap::new());
    let plan = world.plan();
    assert_eq!(health(&plan), (Some("Healthy".into()), None));
    world.apply(&plan);
    let until = "2026-12-06T23:10:42.250Z".parse().unwrap();
    let ejected = HeldTarget { ejected_until: Some(until), cooling_until: None };
    world.held = Some([((format!("{NS}/chat"), "openai".to_string()), ejected)].into());
    let plan = world.plan();
    assert_eq!(health(&plan), (Some("Ejected".into()), Some("2026-12-06T23:10:42Z".into())), "to the second");
    world.apply(&plan);
    assert!(world.plan().routes.is_empty(), "the same hold writes nothing");
    world.held = Some(BTreeMap::new());
    assert_eq!(health(&world.plan()), (Some("Healthy".into()), None));
}

#[test]
fn env_and_file_credentials_are_refused_in_a_cluster() {
    let r = route(
        "env",
        0,
        json!({"model": "chat", "targets": [{"name": "a", "baseUrl": "https://a.example/v1", "credentials": {"env": "OPENAI_API_KEY"}}]}),
    );
    let plan = World::new(vec![r], vec![]).plan();
    let (status, reason, message) = condition(&route_status(&plan, "env").conditions, "Accepted");
    assert_eq!((status, reason), ("False", "Invalid"));
    assert!(message.contains("in a cluster use secretRef"), "{message}");
}

#[test]
fn the_last_route_deleted_removes_the_secret_and_only_ours() {
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    let plan = world.plan();
    world.apply(&plan);
    world.routes.clear();
    assert_eq!(world.plan().config, ConfigAction::Delete);

    // A Secret of that name that the operator did not create is left alone.
    world.published.as_mut().unwrap().ours = false;
    assert_eq!(world.plan().config, ConfigAction::Keep);
}

#[test]
fn a_published_config_changed_by_hand_is_replaced_with_the_next_version() {
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    let plan = world.plan();
    world.apply(&plan);
    world.published.as_mut().unwrap().content = b"{}".to_vec();
    let (_, compiled) = applied_config(&world.plan());
    assert_eq!(compiled.version, 2);
}

#[test]
fn versions_keep_growing_when_the_secret_is_deleted_by_hand() {
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![keys()]);
    for _ in 0..3 {
        let plan = world.plan();
        world.apply(&plan);
        world.published.as_mut().unwrap().content.clear(); // force a new version each time
    }
    assert_eq!(world.published.as_ref().unwrap().version, 3);
    world.published = None;
    let (_, compiled) = applied_config(&world.plan());
    assert_eq!(compiled.version, 4, "the routes' statuses say version 3 was published");
}

#[test]
fn the_secret_size_limit_warns_then_refuses() {
    // The key is most of the configuration's size.
    let big = |bytes: usize| secret("keys", &[("openai", &"k".repeat(bytes))]);
    let mut world = World::new(vec![keyed_route("chat", "chat", 0)], vec![big(SECRET_WARNING + 100)]);
    let plan = world.plan();
    let (_, compiled) = applied_config(&plan);
    assert_eq!(compiled.version, 1);
    let status = route_status(&plan, "chat");
    assert_eq!(condition(&status.conditions, "Ready").0, "True");
    let (near, _, message) = condition(&status.conditions, "ConfigNearLimit");
    assert_eq!(near, "True");
    assert!(message.contains(&format!("of the {SECRET_LIMIT}-byte Secret limit")), "{message}");
    assert!(event_reasons(&plan).contains(&("chat".into(), EventType::Warning, "ConfigNearLimit".into())));
    world.apply(&plan);

    world.secrets = vec![big(SECRET_LIMIT)];
    let plan = world.plan();
    assert_eq!(plan.config, ConfigAction::Keep, "the previous configuration stays");
    let status = route_status(&plan, "chat");
    let (ready, reason, _) = condition(&status.conditions, "Ready");
    assert_eq!((ready, reason), ("False", "ConfigTooLarge"));
    assert!(event_reasons(&plan).contains(&("chat".into(), EventType::Warning, "ConfigTooLarge".into())));
}

#[test]
fn budgets_in_a_namespace_without_routes_are_not_ready() {
    let mut world = World::new(vec![], vec![keys()]);
    world.budgets = vec![budget("bot", 0, json!({"key": {"sha256": "a".repeat(64)}}))];
    let plan = world.plan();
    assert_eq!(plan.config, ConfigAction::Keep);
    let status = &plan.budgets[0].1;
    assert_eq!(condition(&status.conditions, "Accepted").0, "True");
    assert_eq!(condition(&status.conditions, "Ready").1, "NoRoutes");
    assert!(plan.compiled_budgets.is_empty(), "the ledger is given nothing to grant for");
}

// ---------------------------------------------------------------------------------------------
// API conversations: the reconciler against a scripted API server

type ApiServer = Handle<Request<Body>, Response<Body>>;

fn store<K>(objects: &[Arc<K>]) -> (Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(K::clone(o)));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (reader, writer)
}

fn namespace() -> Arc<Namespace> {
    Arc::new(Namespace { metadata: ObjectMeta { name: Some(NS.into()), ..Default::default() }, ..Default::default() })
}

struct Cluster {
    ctx: Arc<Context>,
    server: ApiServer,
    routes: Writer<ProviderRoute>,
    secrets: Writer<Secret>,
    _others: (Writer<Namespace>, Writer<ApiKeyBudget>, Writer<PartialObjectMeta<Pod>>),
}

fn cluster(routes: &[Arc<ProviderRoute>], secrets: &[Arc<Secret>], leadership: Leadership) -> Cluster {
    let (service, server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let (namespaces, ns_writer) = store(&[namespace()]);
    let (routes, routes_writer) = store(routes);
    let (budgets, budgets_writer) = store::<ApiKeyBudget>(&[]);
    let (secrets, secrets_writer) = store(secrets);
    let (pods, pods_writer) = store::<PartialObjectMeta<Pod>>(&[]);
    let events = Events::new(client.clone(), FIELD_MANAGER, "test");
    let ctx = Arc::new(Context {
        client,
        stores: Stores { namespaces, routes, budgets, secrets, pods },
        leadership,
        events,
        metrics: Arc::new(OperatorMetrics::default()),
        own_writes: Default::default(),
        failures: Default::default(),
        ledger: None,
        sidecar_ledger: None,
        hub: Default::default(),
        connections: None,
        outages: None,
    });
    Cluster {
        ctx,
        server,
        routes: routes_writer,
        secrets: secrets_writer,
        _others: (ns_writer, budgets_writer, pods_writer),
    }
}

/// How long a scripted API conversation waits for the operator's next request or for the script
/// to end: a regression fails the test instead of hanging it. Generous, as some tests run on a
/// paused clock where the operator's own timers come first.
const CONVERSATION: Duration = Duration::from_secs(60);

/// Waits for a scripted conversation (or another spawned task) to end, within [`CONVERSATION`].
async fn finished<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(CONVERSATION, task)
        .await
        .unwrap_or_else(|_| panic!("the scripted conversation did not end within {CONVERSATION:?}"))
        .expect("the scripted conversation failed")
}

/// One request the operator must make next: its method, path and query; answered with `status`
/// and `reply(body)`. Returns the request's JSON body.
async fn expect(
    server: &mut ApiServer,
    method: Method,
    path: &str,
    query: &[(&str, &str)],
    status: u16,
    reply: impl FnOnce(&Value) -> Value,
) -> Value {
    let (request, respond) = tokio::time::timeout(CONVERSATION, server.next_request())
        .await
        .unwrap_or_else(|_| panic!("the operator made no {method} {path} request within {CONVERSATION:?}"))
        .expect("the operator's client is gone");
    assert_eq!((request.method(), request.uri().path()), (&method, path), "{request:?}");
    let pairs: Vec<(String, String)> = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map(|(k, v)| (k.into(), v.into())).unwrap_or((p.into(), String::new())))
        .collect();
    for (k, v) in query {
        assert!(pairs.contains(&(k.to_string(), v.to_string())), "{k}={v} missing from {:?}", request.uri());
    }
    if method == Method::PATCH {
        let content_type = request.headers()[http::header::CONTENT_TYPE].to_str().unwrap();
        assert_eq!(content_type, "application/apply-patch+yaml", "writes are server-side applies");
    }
    let body = request.into_body().collect_bytes().await.unwrap();
    let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
    let reply = serde_json::to_vec(&reply(&body)).unwrap();
    respond.send_response(Response::builder().status(status).body(Body::from(reply)).unwrap());
    body
}

const APPLY: &[(&str, &str)] = &[("fieldManager", FIELD_MANAGER), ("force", "true")];

fn with_status(route: &ProviderRoute, status: &Value) -> Value {
    let mut v = serde_json::to_value(route).unwrap();
    v["status"] = status.clone();
    v
}

/// Answers the three writes of a publishing reconcile and returns their bodies.
async fn publishing_conversation(server: &mut ApiServer, route: &ProviderRoute) -> (Value, Value, Value) {
    let secret_path = format!("/api/v1/namespaces/{NS}/secrets/{CONFIG_SECRET}");
    let secret = expect(server, Method::PATCH, &secret_path, APPLY, 200, Value::clone).await;
    let status_path = format!("/apis/sideyard.dev/v1alpha1/namespaces/{NS}/providerroutes/{}/status", route.name_any());
    let status = expect(server, Method::PATCH, &status_path, APPLY, 200, |b| with_status(route, &b["status"])).await;
    let event_path = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
    let event = expect(server, Method::POST, &event_path, &[], 201, Value::clone).await;
    (secret, status, event)
}

#[tokio::test]
async fn reconcile_publishes_the_config_then_the_status_then_an_event_and_a_second_pass_writes_nothing() {
    let chat = keyed_route("chat", "chat", 0);
    let Cluster { ctx, mut server, .. } = cluster(std::slice::from_ref(&chat), &[keys()], Leadership::fixed(true));
    let api = tokio::spawn(async move {
        let bodies = publishing_conversation(&mut server, &chat).await;
        (bodies, server)
    });
    let action = reconcile(namespace(), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(controller::RESYNC));
    let ((secret, status, event), server) = finished(api).await;

    assert_eq!(secret["apiVersion"], "v1");
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["metadata"]["annotations"]["sideyard.dev/config-version"], "1");
    assert_eq!(secret["metadata"]["labels"]["app.kubernetes.io/managed-by"], "sideyard-operator");
    let content = common::base64_decode(secret["data"]["config.json"].as_str().unwrap());
    let compiled: CompiledConfig = serde_json::from_slice(&content).unwrap();
    assert_eq!(compiled.version, 1);
    assert_eq!(compiled.config.routes[0].name, "chat");

    assert_eq!(status["apiVersion"], "sideyard.dev/v1alpha1");
    assert_eq!(status["kind"], "ProviderRoute");
    assert_eq!(status["status"]["observedGeneration"], 1);
    assert_eq!(status["status"]["configVersion"], 1);
    assert_eq!(status["status"]["conditions"][1]["type"], "Ready");
    assert_eq!(status["status"]["conditions"][1]["status"], "True");
    assert_eq!(status["status"]["targets"][0], json!({"name": "openai", "credentials": "Resolved"}));

    assert_eq!(event["reason"], "Compiled");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["regarding"]["kind"], "ProviderRoute");
    assert_eq!(event["regarding"]["name"], "chat");
    assert_eq!(event["reportingController"], FIELD_MANAGER);
    assert_eq!(event["note"], "compiled into Secret sideyard-config, version 1");

    // The caches have not seen the writes yet; the operator remembers them, so a second pass
    // writes nothing (any request would fail: the API server is gone).
    drop(server);
    assert_eq!(reconcile(namespace(), ctx.clone()).await.unwrap(), Action::requeue(controller::RESYNC));
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("sideyard_operator_reconciles_total{kind=\"ProviderRoute\",result=\"success\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("sideyard_operator_config_writes_total 1"), "{metrics}");
    assert!(metrics.contains("sideyard_operator_status_writes_total 1"), "{metrics}");
    assert!(metrics.contains("sideyard_operator_events_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_follower_writes_nothing() {
    let Cluster { ctx, server, .. } = cluster(&[keyed_route("chat", "chat", 0)], &[keys()], Leadership::fixed(false));
    drop(server);
    assert_eq!(reconcile(namespace(), ctx.clone()).await.unwrap(), Action::await_change());
    assert!(ctx.metrics.render().contains("sideyard_operator_config_writes_total 0"));
}

#[tokio::test]
async fn a_lease_lost_mid_write_stops_the_writes_that_follow() {
    let chat = keyed_route("chat", "chat", 0);
    let (leadership, switch) = Leadership::switched(true);
    let Cluster { ctx, mut server, .. } = cluster(std::slice::from_ref(&chat), &[keys()], leadership);
    let api = tokio::spawn(async move {
        let path = format!("/api/v1/namespaces/{NS}/secrets/{CONFIG_SECRET}");
        // The lease lapses while the config write is in flight.
        expect(&mut server, Method::PATCH, &path, APPLY, 200, |body| {
            switch.set(false);
            body.clone()
        })
        .await;
        server
    });
    let error = reconcile(namespace(), ctx.clone()).await.unwrap_err();
    let server = finished(api).await;
    assert!(matches!(error, Error::NotLeader), "{error}");
    drop(server); // no status patch or event was attempted: the conversation ended with the Secret
    let metrics = ctx.metrics.render();
    assert!(metrics.contains("sideyard_operator_status_writes_total 0"), "{metrics}");
    assert!(metrics.contains("result=\"not_leader\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_secret_created_later_makes_the_route_ready_with_the_next_version() {
    let chat = keyed_route("chat", "chat", 0);
    let Cluster { ctx, mut server, mut secrets, .. } =
        cluster(std::slice::from_ref(&chat), &[], Leadership::fixed(true));
    let api = tokio::spawn(async move {
        let first = publishing_conversation(&mut server, &chat).await;
        let second = publishing_conversation(&mut server, &chat).await;
        (first, second)
    });
    reconcile(namespace(), ctx.clone()).await.unwrap();
    // The Secret is created; the watch puts it in the cache.
    secrets.apply_watcher_event(&watcher::Event::Apply((*keys()).clone()));
    reconcile(namespace(), ctx.clone()).await.unwrap();
    let ((secret1, status1, event1), (secret2, status2, event2)) = finished(api).await;

    assert_eq!(secret1["metadata"]["annotations"]["sideyard.dev/config-version"], "1");
    assert_eq!(status1["status"]["conditions"][0]["reason"], "SecretNotFound");
    assert_eq!(status1["status"]["targets"][0]["credentials"], "SecretNotFound");
    assert_eq!((event1["type"].as_str(), event1["reason"].as_str()), (Some("Warning"), Some("SecretNotFound")));

    assert_eq!(secret2["metadata"]["annotations"]["sideyard.dev/config-version"], "2");
    assert_eq!(status2["status"]["conditions"][0]["status"], "True");
    assert_eq!(status2["status"]["conditions"][1]["message"], "compiled into Secret sideyard-config, version 2");
    assert_eq!(status2["status"]["configVersion"], 2);
    assert_eq!((event2["type"].as_str(), event2["reason"].as_str()), (Some("Normal"), Some("Compiled")));
}

#[tokio::test]
async fn the_last_route_deleted_deletes_the_config_secret() {
    let chat = keyed_route("chat", "chat", 0);
    let Cluster { ctx, mut server, mut routes, .. } =
        cluster(std::slice::from_ref(&chat), &[keys()], Leadership::fixed(true));
    let api = tokio::spawn(async move {
        publishing_conversation(&mut server, &chat).await;
        let path = format!("/api/v1/namespaces/{NS}/secrets/{CONFIG_SECRET}");
        let success = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
        expect(&mut server, Method::DELETE, &path, &[], 200, |_| success).await;
    });
    reconcile(namespace(), ctx.clone()).await.unwrap();
    routes.apply_watcher_event(&watcher::Event::Delete((*keyed_route("chat", "chat", 0)).clone()));
    reconcile(namespace(), ctx.clone()).await.unwrap();
    finished(api).await;
    assert!(ctx.metrics.render().contains("sideyard_operator_config_deletes_total 1"));
}

#[tokio::test]
async fn a_refused_write_fails_the_reconcile_before_any_status_is_written() {
    let Cluster { ctx, mut server, .. } =
        cluster(&[keyed_route("chat", "chat", 0)], &[keys()], Leadership::fixed(true));
    let api = tokio::spawn(async move {
        let path = format!("/api/v1/namespaces/{NS}/secrets/{CONFIG_SECRET}");
        let refusal = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd is down", "reason": "InternalError", "code": 500});
        expect(&mut server, Method::PATCH, &path, APPLY, 500, |_| refusal).await;
    });
    let error = reconcile(namespace(), ctx.clone()).await.unwrap_err();
    finished(api).await;
    assert!(matches!(error, Error::Kube { step: "apply_config", .. }), "{error}");
    assert!(error.to_string().contains("etcd is down"), "{error}");
    let retry = controller::error_policy(namespace(), &error, ctx.clone());
    assert_eq!(retry, Action::requeue(Duration::from_secs(1)));
    assert_eq!(controller::error_policy(namespace(), &error, ctx.clone()), Action::requeue(Duration::from_secs(2)));
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("sideyard_operator_reconciles_total{kind=\"ProviderRoute\",result=\"apply_config\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("sideyard_operator_status_writes_total 0"), "{metrics}");
}

// ---------------------------------------------------------------------------------------------
// Leader election

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

fn elector(identity: &str) -> (Elector, Leadership, ApiServer) {
    let (service, server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = Api::<Lease>::namespaced(Client::new(service, "ops"), "ops");
    let settings = LeaseSettings {
        name: "sideyard-operator".into(),
        namespace: "ops".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
        ledger_url: Some(format!("https://{identity}.example:8444")),
    };
    let (elector, leadership) = Elector::new(api, settings);
    (elector, leadership, server)
}

fn lease_path() -> String {
    format!("{LEASES}/sideyard-operator")
}

#[tokio::test(start_paused = true)]
async fn the_first_replica_creates_the_lease_leads_and_releases_it_on_shutdown() {
    let (elector, leadership, mut server) = elector("pod-a");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(elector.run(async move {
        let _ = stop_rx.await;
    }));

    expect(&mut server, Method::GET, &lease_path(), &[], 404, |_| not_found()).await;
    let created = expect(&mut server, Method::POST, LEASES, &[], 201, Value::clone).await;
    assert_eq!(created["spec"]["holderIdentity"], "pod-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);

    // Renewal: a compare-and-swap on the resourceVersion it read.
    expect(&mut server, Method::GET, &lease_path(), &[], 200, |_| lease("pod-a", "11")).await;
    assert!(leadership.is_leader());
    let renewed = expect(&mut server, Method::PUT, &lease_path(), &[], 200, Value::clone).await;
    assert_eq!(renewed["metadata"]["resourceVersion"], "11");
    assert_eq!(renewed["spec"]["holderIdentity"], "pod-a");
    assert_ne!(renewed["spec"]["renewTime"], "2026-11-25T00:00:00.000000Z");

    // Shutdown gives the lease up so that another replica need not wait for it to expire.
    stop_tx.send(()).unwrap();
    expect(&mut server, Method::GET, &lease_path(), &[], 200, |_| lease("pod-a", "12")).await;
    let released = expect(&mut server, Method::PUT, &lease_path(), &[], 200, Value::clone).await;
    assert_eq!(released["spec"].get("holderIdentity"), None);
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(finished(running).await, Ok(()));
    assert!(!leadership.is_leader());
}

#[tokio::test(start_paused = true)]
async fn a_held_lease_is_taken_over_only_after_a_whole_duration_unrenewed() {
    let (mut elector, _, mut server) = elector("pod-b");

    let api = tokio::spawn(async move {
        // Seen at 0 s, then again at 10 s: the holder is within its lease; nothing is written.
        expect(&mut server, Method::GET, &lease_path(), &[], 200, |_| lease("pod-a", "20")).await;
        expect(&mut server, Method::GET, &lease_path(), &[], 200, |_| lease("pod-a", "20")).await;
        // The holder renewed (a new version) at 14 s: the wait starts over.
        expect(&mut server, Method::GET, &lease_path(), &[], 200, |_| lease("pod-a", "21")).await;
        expect(&mut server, Method::GET, &lease_path(), &[], 200, |_| lease("pod-a", "21")).await;
        // Unchanged for 16 s since 14 s: taken over.
        expect(&mut server, Method::GET, &lease_path(), &[], 200, |_| lease("pod-a", "21")).await;
        expect(&mut server, Method::PUT, &lease_path(), &[], 200, Value::clone).await
    });
    assert!(!elector.try_acquire_or_renew().await.unwrap());
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!elector.try_acquire_or_renew().await.unwrap());
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(!elector.try_acquire_or_renew().await.unwrap());
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(!elector.try_acquire_or_renew().await.unwrap(), "14 s unrenewed is within the 15 s lease");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(elector.try_acquire_or_renew().await.unwrap());
    let taken = finished(api).await;
    assert_eq!(taken["spec"]["holderIdentity"], "pod-b");
    assert_eq!(taken["spec"]["leaseTransitions"], 4);
    assert_eq!(taken["metadata"]["resourceVersion"], "21");
}

#[tokio::test(start_paused = true)]
async fn losing_a_race_for_the_lease_is_not_leading() {
    let (mut elector, _, mut server) = elector("pod-b");
    let api = tokio::spawn(async move {
        expect(&mut server, Method::GET, &lease_path(), &[], 404, |_| not_found()).await;
        let conflict =
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409});
        expect(&mut server, Method::POST, LEASES, &[], 409, |_| conflict).await;
    });
    assert!(!elector.try_acquire_or_renew().await.unwrap());
    finished(api).await;
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_leading_and_reports_the_lost_lease() {
    let (elector, leadership, mut server) = elector("pod-a");
    let running = tokio::spawn(elector.run(std::future::pending()));
    expect(&mut server, Method::GET, &lease_path(), &[], 404, |_| not_found()).await;
    expect(&mut server, Method::POST, LEASES, &[], 201, Value::clone).await;
    let failing = tokio::spawn(async move {
        let unavailable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503});
        loop {
            let Some((_, respond)) = server.next_request().await else { return };
            let body = Body::from(serde_json::to_vec(&unavailable).unwrap());
            respond.send_response(Response::builder().status(503).body(body).unwrap());
        }
    });
    let lost = finished(running).await.unwrap_err();
    assert_eq!(lost, LostLease("not renewed within 10s".into()));
    assert!(!leadership.is_leader());
    failing.abort();
}

// ---------------------------------------------------------------------------------------------
// The webhook certificate

fn tls_settings() -> TlsSettings {
    TlsSettings {
        service: "sideyard-webhook".into(),
        namespace: "ops".into(),
        secret: "sideyard-webhook-tls".into(),
        webhook_configuration: "sideyard".into(),
    }
}

fn webhook_configuration(ca_bundle: Option<&str>) -> Value {
    let mut hook = json!({
        "name": "pods.sideyard.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
        "clientConfig": {"service": {"name": "sideyard-webhook", "namespace": "ops", "path": "/mutate-pods"}}
    });
    if let Some(ca) = ca_bundle {
        hook["clientConfig"]["caBundle"] = ca.into();
    }
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
           "metadata": {"name": "sideyard", "resourceVersion": "3"}, "webhooks": [hook]})
}

#[tokio::test]
async fn the_leader_issues_the_webhook_certificate_and_publishes_its_ca() {
    let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "ops");
    let api = tokio::spawn(async move {
        let secret_path = "/api/v1/namespaces/ops/secrets/sideyard-webhook-tls";
        expect(&mut server, Method::GET, secret_path, &[], 404, |_| not_found()).await;
        let secret = expect(&mut server, Method::PATCH, secret_path, APPLY, 200, Value::clone).await;
        let config_path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/sideyard";
        expect(&mut server, Method::GET, config_path, &[], 200, |_| webhook_configuration(None)).await;
        let config = expect(&mut server, Method::PATCH, config_path, APPLY, 200, Value::clone).await;
        (secret, config)
    });
    let pem = tls::managed_round(&client, &Leadership::fixed(true), &tls_settings()).await.unwrap().unwrap();
    let (cert, key) = (pem.cert, pem.key);
    let (secret, config) = finished(api).await;

    assert_eq!(secret["type"], "kubernetes.io/tls");
    let served = String::from_utf8(common::base64_decode(secret["data"]["tls.crt"].as_str().unwrap())).unwrap();
    assert_eq!(served, cert);
    assert!(String::from_utf8(common::base64_decode(secret["data"]["tls.key"].as_str().unwrap())).unwrap() == key);
    let ca = common::base64_decode(secret["data"]["ca.crt"].as_str().unwrap());
    assert_eq!(pem.ca.unwrap().as_bytes(), ca, "the CA that sidecars are given for the ledger");
    assert_eq!(
        secret["metadata"]["annotations"]["sideyard.dev/dns-names"],
        "sideyard-webhook,sideyard-webhook.ops,sideyard-webhook.ops.svc,sideyard-webhook.ops.svc.cluster.local"
    );
    // Only the caBundle of our webhook is applied; the chart owns the rest.
    assert_eq!(
        config["webhooks"],
        json!([{"name": "pods.sideyard.dev", "clientConfig": {"caBundle": secret["data"]["ca.crt"]}}])
    );
    assert_eq!(common::base64_decode(config["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap()), ca);
}

#[tokio::test]
async fn a_follower_only_reads_the_webhook_certificate_and_a_current_one_is_left_alone() {
    let cert = tls::issue(&tls::dns_names("sideyard-webhook", "ops"), None, std::time::SystemTime::now()).unwrap();
    let secret = serde_json::to_value(cert.to_secret("sideyard-webhook-tls", "ops")).unwrap();
    let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "ops");
    let answer = secret.clone();
    let api = tokio::spawn(async move {
        let secret_path = "/api/v1/namespaces/ops/secrets/sideyard-webhook-tls";
        expect(&mut server, Method::GET, secret_path, &[], 200, move |_| answer).await;
        server
    });
    let loaded = tls::managed_round(&client, &Leadership::fixed(false), &tls_settings()).await.unwrap();
    let pem = tls::Pem { cert: cert.cert.clone(), key: cert.key.clone(), ca: Some(cert.ca_cert.clone()) };
    assert_eq!(loaded, Some(pem.clone()));
    drop(finished(api).await);

    // The leader, with a current certificate and caBundle: reads, writes nothing.
    let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "ops");
    let ca_bundle = serde_json::to_value(ByteString(cert.ca_cert.as_bytes().to_vec())).unwrap();
    let api = tokio::spawn(async move {
        let secret_path = "/api/v1/namespaces/ops/secrets/sideyard-webhook-tls";
        expect(&mut server, Method::GET, secret_path, &[], 200, move |_| secret).await;
        let config_path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/sideyard";
        let current = webhook_configuration(ca_bundle.as_str());
        expect(&mut server, Method::GET, config_path, &[], 200, move |_| current).await;
        server
    });
    let loaded = tls::managed_round(&client, &Leadership::fixed(true), &tls_settings()).await.unwrap();
    assert_eq!(loaded, Some(pem));
    drop(finished(api).await); // any write after the reads would have failed the round
}

// ---------------------------------------------------------------------------------------------
// Watch wiring

fn with(route: &Arc<ProviderRoute>, namespace: &str, generation: i64, version: &str) -> ProviderRoute {
    let mut r = ProviderRoute::clone(route);
    r.metadata.namespace = Some(namespace.into());
    r.metadata.generation = Some(generation);
    r.metadata.resource_version = Some(version.into());
    r
}

#[tokio::test]
async fn spec_changes_and_deletions_trigger_their_namespace_but_status_writes_do_not() {
    let chat = keyed_route("chat", "chat", 0);
    let a1 = with(&chat, "a", 1, "1");
    let b1 = with(&chat, "b", 1, "2");
    let c1 = with(&chat, "c", 1, "3");
    let mut a1_status = with(&chat, "a", 1, "4");
    a1_status.status = Some(Default::default());
    let a2 = with(&chat, "a", 2, "5");
    let events = vec![
        watcher::Event::Init,
        watcher::Event::InitApply(a1.clone()),
        watcher::Event::InitApply(b1.clone()),
        watcher::Event::InitApply(c1.clone()),
        watcher::Event::InitDone,
        watcher::Event::Apply(a1_status),  // the operator's own status write: nothing
        watcher::Event::Apply(a2.clone()), // a spec change: a
        watcher::Event::Delete(b1),        // b
        // The watch starts over; c was deleted while it was down.
        watcher::Event::Init,
        watcher::Event::InitApply(a2),
        watcher::Event::InitDone,
    ];
    let requests: Vec<String> =
        triggers(stream::iter(events.into_iter().map(Ok)), generation, |_, _| true).map(|r| r.name).collect().await;
    assert_eq!(requests, ["a", "b", "c", "a", "b", "c"]);
}

#[tokio::test]
async fn only_referenced_secrets_and_the_config_secret_matter() {
    let (routes, _w1) = store(&[keyed_route("chat", "chat", 0)]);
    let (budgets, _w2) = store(&[budget("bot", 0, json!({"key": {"secretRef": {"name": "app-key", "key": "k"}}}))]);
    assert!(secret_matters(&routes, &budgets, NS, "keys"));
    assert!(secret_matters(&routes, &budgets, NS, "app-key"));
    assert!(secret_matters(&routes, &budgets, NS, CONFIG_SECRET));
    assert!(!secret_matters(&routes, &budgets, NS, "tls-cert"));
    assert!(!secret_matters(&routes, &budgets, "elsewhere", "keys"), "references are namespaced");

    let secret_events = vec![
        watcher::Event::Apply(Secret { metadata: meta("tls-cert", 0), ..Default::default() }),
        watcher::Event::Apply((*keys()).clone()),
    ];
    let requests: Vec<String> =
        triggers(stream::iter(secret_events.into_iter().map(Ok)), resource_version, move |ns, name| {
            secret_matters(&routes, &budgets, ns, name)
        })
        .map(|r| r.name)
        .collect()
        .await;
    assert_eq!(requests, [NS]);
}

#[tokio::test]
async fn the_controller_reconciles_each_namespace_it_is_asked_to() {
    let ns = |name: &str| Namespace {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        ..Default::default()
    };
    let (namespaces, _writer) = store(&[Arc::new(ns("a")), Arc::new(ns("b")), Arc::new(ns("c"))]);
    let chat = keyed_route("chat", "chat", 0);
    let route_events =
        vec![watcher::Event::Init, watcher::Event::InitApply(with(&chat, "b", 1, "1")), watcher::Event::InitDone];
    // Watches do not end; the streams stay open until the controller is shut down.
    let requests =
        triggers(stream::iter(route_events.into_iter().map(Ok)).chain(stream::pending()), generation, |_, _| true);
    let namespace_watch = stream::iter([Ok(ns("a"))]).chain(stream::pending());
    let metrics = Arc::new(OperatorMetrics::default());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = controller::controller(namespace_watch, namespaces, requests, metrics.clone())
        .graceful_shutdown_on(async move {
            let _ = stopped.await;
        })
        .run(
            |n: Arc<Namespace>, seen: Arc<tokio::sync::mpsc::UnboundedSender<String>>| async move {
                let _ = seen.send(n.name_any());
                Ok::<_, std::convert::Infallible>(Action::await_change())
            },
            |_, _, _| Action::await_change(),
            Arc::new(seen_tx),
        );
    let running = tokio::spawn(run.collect::<Vec<_>>());
    let mut reconciled = Vec::new();
    for _ in 0..2 {
        let name = tokio::time::timeout(CONVERSATION, seen.recv()).await.expect("a reconcile within the limit");
        reconciled.push(name.expect("the controller is running"));
    }
    reconciled.sort();
    assert_eq!(reconciled, ["a", "b"]);
    stop.send(()).unwrap();
    let results = finished(running).await;
    assert_eq!(results.len(), 2, "c had no change and was left alone: {results:?}");
    assert!(metrics.render().contains("sideyard_operator_queue_depth 2"), "both requests were counted as queued");
}

// ---------------------------------------------------------------------------------------------
// The real process against a fake API server on 127.0.0.1

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_process_leads_publishes_reports_and_releases_its_lease() {
    let api = one_route_cluster();
    let kubeconfig = serve_fake_api(api.clone()).await;
    let kubeconfig = kubeconfig.to_str().unwrap();
    let args = operator_args(&["--log-format", "json"]);
    let (mut process, line) = common::Process::start(&args, &[("KUBECONFIG", kubeconfig)], "operator running");
    let running: Value = serde_json::from_str(&line).expect("a JSON log line");
    let admin: std::net::SocketAddr = running["admin"].as_str().unwrap().parse().unwrap();
    let webhook: std::net::SocketAddr = running["webhook"].as_str().unwrap().parse().unwrap();

    let config_path = format!("/api/v1/namespaces/{NS}/secrets/{CONFIG_SECRET}");
    let status_path = format!("/apis/sideyard.dev/v1alpha1/namespaces/{NS}/providerroutes/chat/status");
    common::eventually("the config and the status are written", || async {
        !writes_to(&api, "PATCH", &status_path).is_empty()
    })
    .await;
    let lease = writes_to(&api, "POST", "/apis/coordination.k8s.io/v1/namespaces/ops/leases");
    assert_eq!(lease[0]["spec"]["holderIdentity"], "op-1");
    // Version 1, and version 2 once the ledger's CA is known (then the configuration names it).
    let config = writes_to(&api, "PATCH", &config_path);
    let compiled: CompiledConfig =
        serde_json::from_slice(&common::base64_decode(config[0]["data"]["config.json"].as_str().unwrap())).unwrap();
    assert_eq!(compiled.version, 1);
    assert_eq!(compiled.config.routes[0].targets[0].credential.as_ref().unwrap().expose(), "sk-upstream");
    let status = &writes_to(&api, "PATCH", &status_path)[0]["status"];
    assert_eq!(status["conditions"][1]["reason"], "Compiled");
    let events_path = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
    common::eventually("the event is posted", || async { !writes_to(&api, "POST", &events_path).is_empty() }).await;
    assert_eq!(writes_to(&api, "POST", &events_path)[0]["reason"], "Compiled");
    let log = process.log();
    assert!(log.contains(r#""spans":["reconciling object{object.ref="#), "spans as plain text: {log}");
    assert!(!log.contains('\u{1b}'), "no terminal escape codes in JSON lines: {log}");

    let metrics = common::get(admin, "/metrics").await.body;
    assert_eq!(common::metric(&metrics, "sideyard_operator_leader"), 1);
    let names_ledger = || {
        let config = writes_to(&api, "PATCH", &config_path);
        let last = config.last().map(|c| common::base64_decode(c["data"]["config.json"].as_str().unwrap()));
        last.is_some_and(|c| String::from_utf8_lossy(&c).contains("\"ledger\""))
    };
    common::eventually("a configuration that names the ledger", || async { names_ledger() }).await;
    let metrics = common::get(admin, "/metrics").await.body;
    let written = writes_to(&api, "PATCH", &config_path).len() as u64;
    assert_eq!(common::metric(&metrics, "sideyard_operator_config_writes_total"), written);
    assert!(metrics.contains(&format!("sideyard_operator_config_bytes{{namespace=\"{NS}\"}}")), "{metrics}");
    common::eventually("ready, with the webhook certificate issued", || async {
        common::get(admin, "/readyz").await.status == 200
    })
    .await;
    assert_eq!(common::get(admin, "/healthz").await.status, 200);

    // The webhook serves HTTPS with the certificate the leader issued into its Secret.
    let tls_secret = writes_to(&api, "PATCH", "/api/v1/namespaces/ops/secrets/sideyard-webhook-tls");
    let ca = String::from_utf8(common::base64_decode(tls_secret[0]["data"]["ca.crt"].as_str().unwrap())).unwrap();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bot", "namespace": NS},
                     "spec": {"containers": [{"name": "app", "image": "example/bot:1"}]}});
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": NS, "operation": "CREATE",
        "userInfo": {"username": "tester"}, "object": pod, "dryRun": false}});
    let (status, answer, _) = common::https_post(
        webhook,
        &ca,
        "sideyard-webhook.ops.svc",
        "/mutate-pods",
        serde_json::to_vec(&review).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(
        (answer["response"]["uid"].as_str(), answer["response"]["allowed"].as_bool()),
        (Some("u-1"), Some(true))
    );
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let metrics = common::get(admin, "/metrics").await.body;
    assert_eq!(common::metric(&metrics, "sideyard_webhook_pods_total{result=\"injected\"}"), 1);
    assert!(!process.log().contains("sk-upstream"), "credentials never reach the log");

    process.terminate();
    assert!(process.wait_exit().success(), "{}", process.log());
    let released = writes_to(&api, "PUT", "/apis/coordination.k8s.io/v1/namespaces/ops/leases/sideyard-operator");
    assert!(released.last().is_some_and(|l| l["spec"].get("holderIdentity").is_none()), "{released:?}");
}

/// A fake API server with one route in team-a.
fn one_route_cluster() -> Arc<FakeApi> {
    let chat = serde_json::to_value(&*keyed_route("chat", "chat", 0)).unwrap();
    let secret = serde_json::to_value(&*keys()).unwrap();
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    let routes = "/apis/sideyard.dev/v1alpha1/providerroutes";
    let budgets = "/apis/sideyard.dev/v1alpha1/apikeybudgets";
    Arc::new(FakeApi {
        crds_installed: true,
        lists: BTreeMap::from([
            (routes.into(), list("ProviderRoute", "sideyard.dev/v1alpha1", vec![chat])),
            (budgets.into(), list("ApiKeyBudget", "sideyard.dev/v1alpha1", vec![])),
            ("/api/v1/namespaces".into(), list("Namespace", "v1", vec![ns])),
            ("/api/v1/secrets".into(), list("Secret", "v1", vec![secret])),
        ]),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_process_exits_when_another_replica_takes_its_lease() {
    let api = one_route_cluster();
    let kubeconfig = serve_fake_api(api.clone()).await;
    let args = operator_args(&["--retry-period", "100ms", "--renew-deadline", "1s", "--lease-duration", "2s"]);
    let (mut process, _) =
        common::Process::start(&args, &[("KUBECONFIG", kubeconfig.to_str().unwrap())], "operator running");
    common::eventually("op-1 leads", || async { process.log().contains("became the leader") }).await;
    api.stolen.store(true, std::sync::atomic::Ordering::Relaxed);
    let status = process.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", process.log());
    let expected = "lost the leader lease: another replica holds it; exiting so that a restart joins as a follower";
    assert!(process.log().contains(expected), "{}", process.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_refuses_to_start_without_its_crds() {
    let kubeconfig = serve_fake_api(Arc::new(FakeApi::default())).await;
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sideyard"))
            .args(["operator", "--admin-listen", "127.0.0.1:0", "--webhook-listen", "127.0.0.1:0"])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the ProviderRoute CustomResourceDefinition (providerroutes.sideyard.dev) is not installed"),
        "{stderr}"
    );
    assert!(stderr.contains("sideyard crd | kubectl apply --server-side -f -"), "{stderr}");
}

/// One route and one budget (limit 10.00, its key in Secret `keys`) in team-a.
fn budget_cluster() -> Arc<FakeApi> {
    let api = Arc::into_inner(one_route_cluster()).unwrap();
    let bot = budget("bot", 0, json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "10"}));
    let mut lists = api.lists;
    lists.insert(
        "/apis/sideyard.dev/v1alpha1/apikeybudgets".into(),
        list("ApiKeyBudget", "sideyard.dev/v1alpha1", vec![serde_json::to_value(&*bot).unwrap()]),
    );
    Arc::new(FakeApi { lists, ..api })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_process_serves_the_ledger_over_https_and_keeps_it_in_the_status() {
    let api = budget_cluster();
    let kubeconfig = serve_fake_api(api.clone()).await;
    let args = operator_args(&["--ledger-url", "https://10.1.2.3:8444", "--log-format", "json"]);
    let (mut process, line) =
        common::Process::start(&args, &[("KUBECONFIG", kubeconfig.to_str().unwrap())], "operator running");
    let running: Value = serde_json::from_str(&line).expect("a JSON log line");
    let admin: std::net::SocketAddr = running["admin"].as_str().unwrap().parse().unwrap();
    let ledger: std::net::SocketAddr = running["ledger"].as_str().unwrap().parse().unwrap();
    let status_path = format!("/apis/sideyard.dev/v1alpha1/namespaces/{NS}/apikeybudgets/bot/status");
    let status =
        || api.statuses.lock().unwrap().get(status_path.trim_end_matches("/status")).cloned().unwrap_or_default();
    common::eventually("the ledger has loaded the budget and written its figures", || async {
        status()["remaining"] == "10"
    })
    .await;
    assert_eq!((status()["spent"].as_str(), status()["state"].as_str()), (Some("0"), Some("Active")));
    let lease = writes_to(&api, "POST", "/apis/coordination.k8s.io/v1/namespaces/ops/leases");
    assert_eq!(lease[0]["metadata"]["annotations"]["sideyard.dev/ledger-url"], "https://10.1.2.3:8444");
    common::eventually("the certificate is issued", || async { common::get(admin, "/readyz").await.status == 200 })
        .await;
    let tls_secret = writes_to(&api, "PATCH", "/api/v1/namespaces/ops/secrets/sideyard-webhook-tls");
    let ca = String::from_utf8(common::base64_decode(tls_secret[0]["data"]["ca.crt"].as_str().unwrap())).unwrap();

    let call = |path: &'static str, token: Option<&'static str>, body: Value| {
        let ca = ca.clone();
        async move {
            let body = serde_json::to_vec(&body).unwrap();
            let (status, answer, _) =
                common::https_call(ledger, &ca, "sideyard-webhook.ops.svc", path, body, token, true).await.unwrap();
            (status.as_u16(), serde_json::from_slice::<Value>(&answer).unwrap_or(Value::Null))
        }
    };
    let pod_a = Some("team-a:pod-a");
    let (code, grant) = call("/ledger/v1/lease", pod_a, json!({"budget": "bot", "want": {"credit": 4_000_000}})).await;
    assert_eq!(code, 200, "{grant}");
    assert_eq!((grant["mode"].as_str(), grant["granted"]["credit"].as_u64()), (Some("lease"), Some(4_000_000)));
    // Persisted before it was answered.
    assert_eq!(status()["outstanding"], "4");
    assert_eq!(status()["leases"][0]["holder"], "pod-a");
    let lease_id = grant["leaseId"].as_str().unwrap().to_string();
    let (code, figures) = call(
        "/ledger/v1/report",
        pod_a,
        json!({"budget": "bot", "leaseId": lease_id, "used": {"credit": 1_500_000}, "done": true}),
    )
    .await;
    assert_eq!(code, 200, "{figures}");
    // A report is written with the ledger's next batch, not before its answer.
    common::eventually("the report reaches the status", || async { status()["spent"] == "1.5" }).await;
    assert_eq!((status()["remaining"].as_str(), status()["outstanding"].as_str()), (Some("8.5"), Some("0")));
    let ledger_writes = writes_to(&api, "PATCH", &status_path);
    assert!(ledger_writes.iter().any(|w| w["status"].get("leases").is_some()), "{ledger_writes:?}");

    let (code, refused) = call("/ledger/v1/lease", Some("wrong-audience"), json!({"budget": "bot", "want": {}})).await;
    assert_eq!((code, refused["error"]["code"].as_str()), (401, Some("unauthorized")));
    assert!(refused["error"]["message"].as_str().unwrap().contains("sideyard"), "{refused}");
    let (code, _) = call("/ledger/v1/lease", None, json!({"budget": "bot", "want": {}})).await;
    assert_eq!(code, 401);
    let (code, _) = call("/ledger/v1/lease", Some("team-b:pod-x"), json!({"budget": "bot", "want": {}})).await;
    assert_eq!(code, 404, "team-b has no budget bot");
    let (code, refused) =
        call("/ledger/v1/lease", Some("team-b:pod-x"), json!({"budget": "team-a/bot", "want": {}})).await;
    assert_eq!((code, refused["error"]["code"].as_str()), (403, Some("forbidden")), "team-a's is not its to touch");
    assert!(refused["error"]["message"].as_str().unwrap().contains("team-b"), "{refused}");

    let metrics = common::get(admin, "/metrics").await.body;
    assert_eq!(common::metric(&metrics, "sideyard_ledger_calls_total{call=\"lease\",result=\"ok\"}"), 1);
    assert_eq!(common::metric(&metrics, "sideyard_ledger_token_reviews_total{result=\"refused\"}"), 2);
    process.terminate();
    assert!(process.wait_exit().success(), "{}", process.log());
}
