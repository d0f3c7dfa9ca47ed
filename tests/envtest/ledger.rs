//! The budget ledger with real tokens: a sidecar presenting a ServiceAccount token bound to its
//! Pod (audience `sideyard`) spends its namespace's budget, and the spend and leases are in
//! `ApiKeyBudget.status` in the API server; a token of another namespace, of another audience,
//! or bound to a deleted Pod gets nothing. The operator runs under the chart's RBAC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::cluster::{ledger_sidecar, replica_args};
use crate::common::helm::NAMESPACE;
use crate::common::{self, Process, base64_decode, metric, read, send_as, temp_dir};
use crate::operator::{
    apply, condition, get, install_chart, one_operator_at_a_time, service_account_kubeconfig, start_operator, until,
};
use crate::server::{ApiServer, free_port};
use crate::{cluster_or_skip, namespace};

const KEY: &str = "sk-app";
const CHAT: &str = r#"{"model":"chat","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

/// Creates a Pod record with `labels` (nothing runs it) and returns its uid.
pub fn pod(server: &ApiServer, ns: &str, name: &str, labels: Value) -> String {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
                     "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "example/bot:1"}]}});
    apply(server, &[pod]);
    let stored = get(server, &["pod", name, "-n", ns]).expect("the pod");
    stored["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// A token of `ns`'s default ServiceAccount for `audience`, bound to the Pod `pod` when given.
pub fn token(server: &ApiServer, ns: &str, audience: &str, pod: Option<(&str, &str)>) -> String {
    let mut args = vec!["create", "token", "default", "-n", ns, "--audience", audience, "--duration=1h"];
    let bound;
    if let Some((name, uid)) = pod {
        bound = [format!("--bound-object-name={name}"), format!("--bound-object-uid={uid}")];
        args.extend(["--bound-object-kind", "Pod", &bound[0], &bound[1]]);
    }
    let out = server.kubectl(&args);
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A sidecar of pod `pod` on the configuration in `config_dir`, presenting `token`.
pub fn sidecar(config_dir: &Path, pod: &str, token: &str) -> (Process, SocketAddr, SocketAddr) {
    let state = temp_dir(&format!("ledger-{pod}"));
    let token_file = state.join("token");
    std::fs::write(&token_file, token).expect("token file");
    ledger_sidecar(config_dir, &state, &token_file, pod)
}

/// Operator replicas under the chart's RBAC whose ledger (and configuration stream) listens on
/// `port`, at the `url` every configuration names.
pub struct LedgerReplicas {
    pub port: u16,
    pub url: String,
    kubeconfig: PathBuf,
    cert_dir: String,
}

impl LedgerReplicas {
    pub fn new(server: &ApiServer) -> Self {
        let port = free_port();
        LedgerReplicas {
            port,
            url: format!("https://127.0.0.1:{port}"),
            kubeconfig: service_account_kubeconfig(server, NAMESPACE, "sideyard-operator"),
            cert_dir: server.webhook_cert_dir.to_str().expect("path").to_string(),
        }
    }

    /// Replica `identity`, serving the ledger, or not (`--ledger=false`).
    pub fn start(&self, identity: &str, ledger: bool) -> Process {
        self.start_with(identity, ledger, &[])
    }

    /// Replica `identity` with `more` flags.
    pub fn start_with(&self, identity: &str, ledger: bool, more: &[&str]) -> Process {
        let listen = if ledger { format!("127.0.0.1:{}", self.port) } else { "127.0.0.1:0".into() };
        let mut extra = vec![
            "--lease-namespace",
            NAMESPACE,
            "--webhook-cert-dir",
            &self.cert_dir,
            "--ledger-service-url",
            &self.url,
        ];
        if !ledger {
            extra.push("--ledger=false");
        }
        extra.extend_from_slice(more);
        start_operator(&replica_args(identity, &listen, &extra), &self.kubeconfig).0
    }

    /// Waits for `ns`'s published configuration to name the ledger, and writes it into `dir`,
    /// where a sidecar has it mounted: its bytes.
    pub async fn mount_config(&self, server: &ApiServer, operator: &Process, ns: &str, dir: &Path) -> Vec<u8> {
        let published = || {
            let secret = get(server, &["secret", "sideyard-config", "-n", ns])?;
            let config = base64_decode(secret["data"]["config.json"].as_str()?);
            String::from_utf8_lossy(&config).contains(&self.url).then_some(config)
        };
        until(operator, "a configuration that names the ledger", || async { published().is_some() }).await;
        let config = published().expect("the published configuration");
        std::fs::write(dir.join("config.json"), &config).expect("config file");
        config
    }
}

/// In `ns`: the Secret `keys` holding [`KEY`], the route `chat` (a mock target, a cent a
/// request) and the budget `bot` of 100 for that key.
pub fn apply_chat_and_budget(server: &ApiServer, ns: &str) {
    let team = ns;
    let sy = "sideyard.dev/v1alpha1";
    apply(
        server,
        &[
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": team}, "stringData": {"app": KEY}}),
            json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "chat", "namespace": team},
                   "spec": {"model": "chat", "targets": [{"name": "m", "api": "mock", "pricing": {"request": "0.01"}}]}}),
            json!({"apiVersion": sy, "kind": "ApiKeyBudget", "metadata": {"name": "bot", "namespace": team},
                   "spec": {"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "100"}}),
        ],
    );
}

pub async fn chat(api: SocketAddr) -> (u16, Value) {
    let reply = read(send_as(api, Some(KEY), "POST", "/v1/chat/completions", CHAT).await).await;
    (reply.status.as_u16(), serde_json::from_str(&reply.body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_bound_token_spends_its_namespaces_budget_and_other_tokens_get_nothing() {
    let server = cluster_or_skip!();
    let _turn = one_operator_at_a_time().await;
    install_chart(server).await;
    let client = server.admin().await;
    let team = namespace(&client, "spend", json!({})).await;
    let other = namespace(&client, "elsewhere", json!({})).await;

    let replicas = LedgerReplicas::new(server);
    let operator = replicas.start("op-ledger", true);

    apply_chat_and_budget(server, &team);
    // The published configuration, where a sidecar would have it mounted.
    let config_dir = temp_dir("ledger-config");
    replicas.mount_config(server, &operator, &team, &config_dir).await;

    let uid = pod(server, &team, "bot-1", json!({}));
    let (_bot, api, _) = sidecar(&config_dir, "bot-1", &token(server, &team, "sideyard", Some(("bot-1", &uid))));
    for _ in 0..3 {
        let (status, body) = chat(api).await;
        assert_eq!(status, 200, "{body}");
    }
    let budget = || get(server, &["apikeybudget", "bot", "-n", &team]);
    until(&operator, "the budget's status in the API server holds the lease and its spend", || async {
        budget().is_some_and(|b| {
            let holds = b["status"]["leases"].as_array().is_some_and(|l| l.iter().any(|l| l["holder"] == "bot-1"));
            holds && b["status"]["spent"].as_str().is_some_and(|s| s != "0")
        })
    })
    .await;

    // Tokens that must get nothing: another namespace's, another audience's, a deleted Pod's.
    let elsewhere_uid = pod(server, &other, "stranger", json!({}));
    let doomed_uid = pod(server, &team, "doomed", json!({}));
    let doomed_token = token(server, &team, "sideyard", Some(("doomed", &doomed_uid)));
    let out = server.kubectl(&["delete", "pod", "doomed", "-n", &team, "--wait=true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refused = [
        ("another namespace", "stranger", token(server, &other, "sideyard", Some(("stranger", &elsewhere_uid)))),
        ("another audience", "bot-1", token(server, &team, "https://kubernetes.default.svc", Some(("bot-1", &uid)))),
        ("a deleted pod", "doomed", doomed_token),
    ];
    for (what, pod, token) in refused {
        let (_sidecar, api, admin) = sidecar(&config_dir, pod, &token);
        let (status, body) = chat(api).await;
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("ledger_unavailable")), "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("has not yet granted this sidecar a lease"), "{what}: {message}");
        let m = common::get(admin, "/metrics").await.body;
        assert!(
            metric(&m, "sideyard_ledger_client_calls_total{call=\"lease\",result=\"rejected\"}") > 0,
            "{what}: {m}"
        );
    }
    let log = operator.log();
    // The API server's refusals say `forbidden` (a bare 403 would match timestamps).
    assert!(!log.to_lowercase().contains("forbidden"), "TokenReviews under the chart's RBAC:\n{log}");

    // The budget's conditions say what is true now: an operator without its ledger does not
    // leave `Ledger=True` behind, and a budget whose routes are gone is not served.
    let ledger_condition = || budget().map(|b| condition_of(&b, "Ledger"));
    // Stopped as a rollout stops it: the Lease is released and the next replica leads at once.
    let stop = |mut operator: Process| {
        operator.terminate();
        assert!(operator.wait_exit().success(), "{}", operator.log());
    };
    stop(operator);
    let operator = replicas.start("op-no-ledger", false);
    until(&operator, "Ledger=False LedgerOff", || async {
        ledger_condition() == Some(("False".into(), "LedgerOff".into()))
    })
    .await;
    stop(operator);
    let operator = replicas.start("op-ledger-2", true);
    until(&operator, "Ledger=True Serving again", || async {
        ledger_condition() == Some(("True".into(), "Serving".into()))
    })
    .await;
    let out = server.kubectl(&["delete", "proute", "chat", "-n", &team]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until(&operator, "Ready=False NoRoutes and Ledger=False NotServed", || async {
        let ready = budget().map(|b| condition_of(&b, "Ready"));
        ready == Some(("False".into(), "NoRoutes".into()))
            && ledger_condition() == Some(("False".into(), "NotServed".into()))
    })
    .await;
}

/// A condition's status and reason, or empty strings when it is missing.
pub fn condition_of(object: &Value, type_: &str) -> (String, String) {
    let found = condition(object, type_);
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    found.map(|c| (text(&c["status"]), text(&c["reason"]))).unwrap_or_default()
}
