//! A fleet for cluster mode's end-to-end tests: the real operator process serving its ledger
//! (against the fake API server, which keeps ApiKeyBudget statuses and answers TokenReviews) and
//! real sidecar processes leasing from it, each with its own projected-token file, on 127.0.0.1.
//! Targets are the in-process mock provider, priced per call and per completion token, so every
//! answer's cost is known exactly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use sideyard::api::units::parse_micros;

use super::cluster::{FakeApi, list, replica_args, serve_fake_api};
use super::*;

pub const NS: &str = "team-a";
pub const KEY: &str = "sk-app";
/// One answer: 0.01 per call and 5 completion tokens at 1000 per million.
pub const COST: u64 = 15_000;
pub const CHAT: &str = r#"{"model":"chat","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

pub fn object(kind: &str, api_version: &str, name: &str, extra: Value) -> Value {
    let mut o = json!({"apiVersion": api_version, "kind": kind, "metadata": {
        "name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "1",
        "creationTimestamp": "2026-11-01T00:00:00Z"}});
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    o
}

/// The route `chat`'s one target.
pub fn priced_mock() -> Value {
    json!([{"name": "m", "api": "mock", "baseUrl": "mock://local", "model": "m",
            "pricing": {"request": "0.01", "completion": "1000"}}])
}

/// A namespace with the route `chat` of `targets` and the given budgets (their key in Secret
/// `keys`).
pub fn cluster(targets: Value, budgets: &[(&str, Value)]) -> Arc<FakeApi> {
    let sy = "sideyard.dev/v1alpha1";
    let route = object("ProviderRoute", sy, "chat", json!({"spec": {"model": "chat", "targets": targets}}));
    let budgets = budgets.iter().map(|(name, spec)| object("ApiKeyBudget", sy, name, json!({"spec": spec}))).collect();
    let keys = object("Secret", "v1", "keys", json!({"data": {"app": "c2stYXBw", "other": "c2stb3RoZXI="}}));
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    // The pods the sidecars below belong to, as the operator reads them for their streams.
    let pods = ["pod-0", "pod-1", "pod-2", "pod-r", "pod-t", "pod-f", "pod-g", "pod-p"].map(|name| {
        let mut pod = object("Pod", "v1", name, json!({}));
        pod["metadata"]["labels"] = json!({"app": "web"});
        pod
    });
    Arc::new(FakeApi {
        crds_installed: true,
        lists: [
            ("/apis/sideyard.dev/v1alpha1/providerroutes".to_string(), list("ProviderRoute", sy, vec![route])),
            ("/apis/sideyard.dev/v1alpha1/apikeybudgets".into(), list("ApiKeyBudget", sy, budgets)),
            ("/api/v1/namespaces".into(), list("Namespace", "v1", vec![ns])),
            ("/api/v1/secrets".into(), list("Secret", "v1", vec![keys])),
            ("/api/v1/pods".into(), list("Pod", "v1", pods.to_vec())),
        ]
        .into(),
        ..Default::default()
    })
}

/// The operator's serving certificate, for `localhost`, with its CA beside it (as cert-manager
/// writes them).
pub fn cert_dir() -> PathBuf {
    let cert = sideyard::operator::tls::issue(&["localhost".into()], None, std::time::SystemTime::now()).unwrap();
    let dir = temp_dir("ledger-cert");
    std::fs::write(dir.join("tls.crt"), &cert.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &cert.key).unwrap();
    std::fs::write(dir.join("ca.crt"), &cert.ca_cert).unwrap();
    dir
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How many fleets run at once. Each is an operator or two, up to three sidecars and a fake API
/// server sharing its test's threads: all of this binary's at once starve each other of CPU on
/// two cores, past the leader's renew deadline and the ledger's call timeouts.
pub static TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// The operator, its ledger on `port` (so that a replica started later is found at the same
/// address), and the sidecars' shared config directory.
pub struct Fleet {
    _turn: tokio::sync::SemaphorePermit<'static>,
    pub api: Arc<FakeApi>,
    kubeconfig: PathBuf,
    certs: PathBuf,
    pub port: u16,
    pub config_dir: PathBuf,
}

impl Fleet {
    pub async fn start(budgets: &[(&str, Value)]) -> (Fleet, Process) {
        let fleet = Fleet::new(budgets).await;
        let operator = fleet.operator("op-1");
        fleet.publish_config().await;
        (fleet, operator)
    }

    pub async fn new(budgets: &[(&str, Value)]) -> Fleet {
        Fleet::with_targets(priced_mock(), budgets).await
    }

    pub async fn with_targets(targets: Value, budgets: &[(&str, Value)]) -> Fleet {
        let turn = TURNS.acquire().await.expect("the semaphore is never closed");
        let api = cluster(targets, budgets);
        let kubeconfig = serve_fake_api(api.clone()).await;
        Fleet {
            _turn: turn,
            api,
            kubeconfig,
            certs: cert_dir(),
            port: free_port(),
            config_dir: temp_dir("fleet-config"),
        }
    }

    /// A replica of the operator whose ledger is the one the sidecars are told of.
    pub fn operator(&self, identity: &str) -> Process {
        self.replica(identity, self.port).0
    }

    /// A replica with its ledger on `port`, announcing it for when it leads, and its admin
    /// address. Short leases, so that a replica takes over from a killed one within seconds; a
    /// renew deadline of seconds, so that a leader starved of CPU (the fake API server shares the
    /// test's threads) does not step down mid-test.
    pub fn replica(&self, identity: &str, port: u16) -> (Process, SocketAddr) {
        let listen = format!("127.0.0.1:{port}");
        let (own, url) = (format!("https://localhost:{port}"), format!("https://localhost:{}", self.port));
        let extra = [
            "--ledger-url",
            &own,
            "--ledger-service-url",
            &url,
            "--webhook-cert-dir",
            self.certs.to_str().unwrap(),
            "--lease-duration",
            "4s",
            "--renew-deadline",
            "3s",
            "--retry-period",
            "250ms",
        ];
        let mut args = replica_args(identity, &listen, &extra);
        args.extend(["--log-format", "json"]);
        let (process, line) =
            Process::start(&args, &[("KUBECONFIG", self.kubeconfig.to_str().unwrap())], "operator running");
        let running: Value = serde_json::from_str(&line).expect("a JSON log line");
        (process, running["admin"].as_str().unwrap().parse().unwrap())
    }

    /// Writes the configuration the operator published where the sidecars read it.
    pub async fn publish_config(&self) {
        let path = format!("/api/v1/namespaces/{NS}/secrets/sideyard-config");
        let api = self.api.clone();
        let with_ledger = || {
            let writes = super::cluster::writes_to(&api, "PATCH", &path);
            writes.last().map(|w| base64_decode(w["data"]["config.json"].as_str().unwrap()))
        };
        eventually("the operator publishes a configuration that names its ledger", || async {
            with_ledger().is_some_and(|c| String::from_utf8_lossy(&c).contains("\"ledger\""))
        })
        .await;
        std::fs::write(self.config_dir.join("config.json"), with_ledger().unwrap()).unwrap();
    }

    /// A sidecar of pod `pod`, its state in `state`.
    pub fn sidecar(&self, pod: &str, state: &Path) -> (Process, SocketAddr, SocketAddr) {
        self.sidecar_with_token(pod, state, &format!("{NS}:{pod}"))
    }

    /// A sidecar presenting `token` (the fake API server reads `namespace:pod` tokens).
    pub fn sidecar_with_token(&self, pod: &str, state: &Path, token: &str) -> (Process, SocketAddr, SocketAddr) {
        let token_file = state.with_extension("token");
        std::fs::write(&token_file, token).unwrap();
        super::cluster::ledger_sidecar(&self.config_dir, state, &token_file, pod)
    }

    /// A budget's status as the ledger last wrote it.
    pub fn status(&self, budget: &str) -> Value {
        let path = format!("/apis/sideyard.dev/v1alpha1/namespaces/{NS}/apikeybudgets/{budget}");
        self.api.statuses.lock().unwrap().get(&path).cloned().unwrap_or_default()
    }

    pub fn spent(&self, budget: &str) -> Option<u64> {
        self.status(budget)["spent"].as_str().map(|s| parse_micros(s).unwrap())
    }
}

/// Sends a chat completion with `key`: its status and, when served, its `usage.cost`.
pub async fn chat(api: SocketAddr, key: &str) -> (u16, u64, Value) {
    let reply = read(send_as(api, Some(key), "POST", "/v1/chat/completions", CHAT).await).await;
    let body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
    let cost = body["usage"]["cost"].as_f64().map_or(0, |c| (c * 1e6).round() as u64);
    (reply.status.as_u16(), cost, body)
}

/// `n` requests at once, spread over `apis`: each one's status and cost. A refusal's body goes
/// to the test's output, which a failing test shows.
pub async fn burst(apis: &[SocketAddr], key: &str, n: usize) -> Vec<(u16, u64)> {
    let requests = (0..n).map(|i| {
        let api = apis[i % apis.len()];
        let key = key.to_string();
        tokio::spawn(async move {
            let (status, cost, body) = chat(api, &key).await;
            if status != 200 {
                eprintln!("{api}: {status} {body}");
            }
            (status, cost)
        })
    });
    futures::future::join_all(requests).await.into_iter().map(Result::unwrap).collect()
}

pub fn sidecars(fleet: &Fleet, n: usize) -> (Vec<Process>, Vec<SocketAddr>, Vec<SocketAddr>) {
    let (processes, apis, admins, _) = sidecars_with_state(fleet, n);
    (processes, apis, admins)
}

/// [`sidecars`], and each one's state directory.
pub fn sidecars_with_state(fleet: &Fleet, n: usize) -> (Vec<Process>, Vec<SocketAddr>, Vec<SocketAddr>, Vec<PathBuf>) {
    let (mut processes, mut apis, mut admins, mut states) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let state = temp_dir(&format!("state-{i}"));
        let (p, api, admin) = fleet.sidecar(&format!("pod-{i}"), &state);
        processes.push(p);
        apis.push(api);
        admins.push(admin);
        states.push(state);
    }
    (processes, apis, admins, states)
}
