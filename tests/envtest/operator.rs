//! The operator process against the real API server, running with a token of the chart's own
//! ServiceAccount under the chart's rendered RBAC: reconcile, statuses, Events, the Lease, the
//! webhook certificate and caBundle, with not one request forbidden.

use serde_json::{Value, json};

use crate::common::cluster::replica_args;
use crate::common::helm::{NAMESPACE, template};
use crate::common::{self, Process};
use crate::server::{ApiServer, kubeconfig};
use crate::{cluster_or_skip, namespace};

/// Operators reconcile every namespace, so two at once would fight over the same Secrets: the
/// tests that run one take turns.
pub async fn one_operator_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// `kubectl apply -f -` of `objects` as cluster admin.
pub fn apply(server: &ApiServer, objects: &[Value]) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let out = server.kubectl_as(&server.admin_kubeconfig, &["apply", "-f", "-"], Some(&list.to_string()));
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
}

/// `kubectl get ARGS -o json` as cluster admin: the object, or None when there is none.
pub fn get(server: &ApiServer, args: &[&str]) -> Option<Value> {
    let args = [&["get"], args, &["-o", "json"]].concat();
    let out = server.kubectl(&args);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("kubectl's JSON"))
}

/// A kubeconfig for a token of the ServiceAccount `name` in `namespace`.
pub fn service_account_kubeconfig(server: &ApiServer, namespace: &str, name: &str) -> std::path::PathBuf {
    let out = server.kubectl(&["create", "token", name, "-n", namespace, "--duration=2h"]);
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = server.dir.join(format!("{namespace}-{name}.kubeconfig"));
    let text = kubeconfig(&server.url, &server.ca_pem, &format!("token: {token}"))
        .replace("namespace: default", &format!("namespace: {namespace}"));
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// `sideyard operator ARGS`, logging JSON lines, as the identity `kubeconfig` names; once it runs,
/// the process and its `operator running` line.
pub fn start_operator(args: &[&str], kubeconfig: &std::path::Path) -> (Process, Value) {
    let args = [args, &["--log-format", "json"]].concat();
    let kubeconfig = kubeconfig.to_str().expect("a UTF-8 path");
    let (process, line) = Process::start(&args, &[("KUBECONFIG", kubeconfig)], "operator running");
    (process, serde_json::from_str(&line).expect("a JSON log line"))
}

/// The chart as `helm template` renders it by default, installed in its namespace.
pub async fn install_chart(server: &ApiServer) {
    let client = server.admin().await;
    if get(server, &["namespace", NAMESPACE]).is_none() {
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("namespace");
        kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
            .create(&Default::default(), &ns)
            .await
            .expect("create the chart's namespace");
    }
    let docs = template(&[]).expect("helm template");
    apply(server, &docs);
}

/// Waits (within [`common::PATIENCE`]) for `check`, failing with the operator's log.
pub async fn until<F, Fut>(operator: &Process, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for: {what}; the operator's log:\n{}",
            operator.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The condition of `type_` in an object's status.
pub fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

#[tokio::test(flavor = "multi_thread")]
async fn under_the_charts_rbac_the_operator_reconciles_leads_and_keeps_the_webhook_ca_without_a_403() {
    let server = cluster_or_skip!();
    let _turn = one_operator_at_a_time().await;
    install_chart(server).await;
    let client = server.admin().await;
    let team = namespace(&client, "team", json!({})).await;

    let kubeconfig = service_account_kubeconfig(server, NAMESPACE, "sideyard-operator");
    let (operator, _) = start_operator(
        &replica_args(
            "op-rbac",
            "127.0.0.1:0",
            &["--lease-namespace", NAMESPACE, "--log", "info,sideyard::operator=debug"],
        ),
        &kubeconfig,
    );

    let route = |name: &str, model: &str, secret: &str| {
        json!({
            "apiVersion": "sideyard.dev/v1alpha1", "kind": "ProviderRoute",
            "metadata": {"name": name, "namespace": team},
            "spec": {"model": model, "targets": [
                {"name": "openai", "baseUrl": "https://api.openai.com/v1", "credentials": {"secretRef": {"name": secret, "key": "key"}}},
                {"name": "backup", "baseUrl": "http://10.0.0.7:8000/v1"},
                {"name": "demo", "api": "mock"},
            ]}
        })
    };
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": team}, "stringData": {"key": "sk-1"}});
    apply(server, &[secret, route("chat", "chat", "keys")]);

    let routes = |name: &str| get(server, &["proute", name, "-n", &team]);
    until(&operator, "the route is Ready and the config Secret published", || async {
        let ready = routes("chat").is_some_and(|r| condition(&r, "Ready").is_some_and(|c| c["status"] == "True"));
        ready && get(server, &["secret", "sideyard-config", "-n", &team]).is_some()
    })
    .await;
    let table = String::from_utf8_lossy(&server.kubectl(&["get", "proute", "-n", &team]).stdout).into_owned();
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..5], ["chat", "chat", "priority", "openai,backup,demo", "True"], "{table}");

    // Events through events.k8s.io, as kubectl shows them.
    until(&operator, "a Compiled event", || async {
        get(server, &["events.events.k8s.io", "-n", &team])
            .is_some_and(|list| list["items"].as_array().into_iter().flatten().any(|e| e["reason"] == "Compiled"))
    })
    .await;

    // A missing Secret, and two routes of one model created in the same second.
    apply(
        server,
        &[route("orphan", "orphan", "missing"), route("twin-a", "twin", "keys"), route("twin-b", "twin", "keys")],
    );
    until(&operator, "the orphan says SecretNotFound, one twin DuplicateModel", || async {
        let reason = |name: &str| routes(name).and_then(|r| condition(&r, "Accepted").map(|c| c["reason"].clone()));
        let twins = [reason("twin-a"), reason("twin-b")];
        reason("orphan") == Some("SecretNotFound".into())
            && twins.contains(&Some("DuplicateModel".into()))
            && twins.contains(&Some("Accepted".into()))
    })
    .await;

    // Deleting a route takes it out of the published configuration.
    let version = |secret: &Value| secret["metadata"]["annotations"]["sideyard.dev/config-version"].clone();
    let before = get(server, &["secret", "sideyard-config", "-n", &team]).expect("config");
    let out = server.kubectl(&["delete", "proute", "chat", "-n", &team]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until(&operator, "a new configuration without the route", || async {
        get(server, &["secret", "sideyard-config", "-n", &team]).is_some_and(|s| version(&s) != version(&before))
    })
    .await;

    // The Lease, the webhook's certificate Secret and the caBundle it keeps.
    let lease = get(server, &["lease", "sideyard-operator", "-n", NAMESPACE]).expect("the Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "op-rbac");
    until(&operator, "the caBundle is the CA of the webhook's Secret", || async {
        let ca = get(server, &["secret", "sideyard-webhook-tls", "-n", NAMESPACE]).map(|s| s["data"]["ca.crt"].clone());
        let bundle = get(server, &["mutatingwebhookconfiguration", "sideyard"])
            .map(|c| c["webhooks"][0]["clientConfig"]["caBundle"].clone());
        ca.is_some_and(|ca| ca.is_string() && Some(ca) == bundle)
    })
    .await;

    let log = operator.log();
    // The API server's refusals say `forbidden` (a bare 403 would match timestamps); reconcile
    // errors are logged at debug, which this operator logs.
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something under the chart's RBAC:\n{log}"
    );
}

/// MicroTime as the API server writes it (`2026-12-06T19:17:06.938123Z`), in microseconds since
/// the epoch.
fn micros(time: &Value) -> i64 {
    let parsed: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime =
        serde_json::from_value(time.clone()).unwrap_or_else(|e| panic!("{time}: {e}"));
    parsed.0.as_microsecond()
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_is_killed_the_other_replica_takes_the_lease_after_it_expires_and_reconciles() {
    let server = cluster_or_skip!();
    let _turn = one_operator_at_a_time().await;
    let client = server.admin().await;
    let ops = namespace(&client, "failover", json!({})).await;
    let lease_seconds = 3;
    let short_lease =
        ["--lease-namespace", &ops, "--lease-duration", "3s", "--renew-deadline", "2s", "--retry-period", "500ms"];
    let replica =
        |identity| start_operator(&replica_args(identity, "127.0.0.1:0", &short_lease), &server.admin_kubeconfig).0;
    let mut first = replica("op-a");
    until(&first, "op-a leads", || async { first.log().contains("became the leader") }).await;
    let second = replica("op-b");

    // kill -9: no release of the Lease, so the other must wait for it to expire.
    first.child.kill().expect("kill -9");
    first.wait_exit();
    let held = get(server, &["lease", "sideyard-operator", "-n", &ops]).expect("the Lease");
    assert_eq!(held["spec"]["holderIdentity"], "op-a");
    until(&second, "op-b takes the Lease", || async {
        get(server, &["lease", "sideyard-operator", "-n", &ops]).is_some_and(|l| l["spec"]["holderIdentity"] == "op-b")
    })
    .await;
    let taken = get(server, &["lease", "sideyard-operator", "-n", &ops]).expect("the Lease");
    let waited = micros(&taken["spec"]["acquireTime"]) - micros(&held["spec"]["renewTime"]);
    assert!(waited >= lease_seconds * 1_000_000, "op-b took a Lease op-a still held: {waited} µs after its renewal");
    eprintln!("op-b took the Lease {:.2}s after op-a's last renewal (lease {lease_seconds}s)", waited as f64 / 1e6);
    assert_eq!(taken["spec"]["leaseTransitions"].as_i64(), held["spec"]["leaseTransitions"].as_i64().map(|n| n + 1));

    // The new leader writes: a route applied now is compiled.
    let team = namespace(&client, "after-failover", json!({})).await;
    apply(
        server,
        &[
            json!({"apiVersion": "sideyard.dev/v1alpha1", "kind": "ProviderRoute", "metadata": {"name": "chat", "namespace": team},
                  "spec": {"model": "chat", "targets": [{"name": "m", "api": "mock"}]}}),
        ],
    );
    until(&second, "op-b publishes the configuration", || async {
        get(server, &["secret", "sideyard-config", "-n", &team]).is_some()
    })
    .await;
}

/// An Event series is a repeat of one note; a new note is a new Event (it used to be counted on
/// the first, which kept saying "version 8" after versions 10 and 12).
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_event_becomes_a_series_and_a_new_note_a_new_event() {
    let server = cluster_or_skip!();
    let client = server.admin().await;
    let team = namespace(&client, "events", json!({})).await;
    let events = sideyard::operator::events::Events::new(client, "sideyard-operator", "op-events");
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("sideyard.dev/v1alpha1".into()),
        kind: Some("ProviderRoute".into()),
        name: Some("chat".into()),
        namespace: Some(team.clone()),
        uid: Some("7c5d3a4e-0000-4000-8000-000000000001".into()),
        ..Default::default()
    };
    let normal = kube::runtime::events::EventType::Normal;
    for note in ["version 8", "version 8", "version 8", "version 10", "version 12"] {
        events.publish(&regarding, normal, "Compiled", note).await.expect("posted");
    }
    let list = get(server, &["events.events.k8s.io", "-n", &team]).expect("events");
    let mut seen: Vec<(String, i64)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["note"].as_str().unwrap_or_default().to_string(), e["series"]["count"].as_i64().unwrap_or(1)))
        .collect();
    seen.sort();
    assert_eq!(seen, [("version 10".into(), 1), ("version 12".into(), 1), ("version 8".into(), 3)]);
}
