//! A fake kube-apiserver on 127.0.0.1 for the real operator process: lists, idle watches, the
//! leader Lease, statuses it keeps, TokenReviews, and recorded writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::IntoResponse;
use http::Method;
use serde_json::{Value, json};

/// Just enough of a kube-apiserver for the operator: lists (and their objects), idle watches,
/// leases, statuses it keeps, TokenReviews, and recorded writes.
#[derive(Default)]
pub struct FakeApi {
    pub crds_installed: bool,
    pub lists: BTreeMap<String, Value>,
    pub lease: Mutex<Option<Value>>,
    pub writes: Mutex<Vec<(String, String, Value)>>,
    /// Another replica has taken the lease.
    pub stolen: std::sync::atomic::AtomicBool,
    /// Statuses written, by the object's path: the object is read back with them.
    pub statuses: Mutex<BTreeMap<String, Value>>,
    /// Lease writes so far, for their resourceVersions.
    pub lease_versions: std::sync::atomic::AtomicU64,
    /// The status fields each (object, field manager) last applied.
    pub status_owners: Mutex<BTreeMap<(String, String), std::collections::BTreeSet<String>>>,
}

/// The object a `…/{plural}/{name}` path names, from the cluster's lists.
fn object_at(api: &FakeApi, path: &str) -> Option<Value> {
    let (collection, name) = path.rsplit_once('/')?;
    let (prefix, plural) = collection.rsplit_once('/')?;
    let (group, _namespace) = prefix.rsplit_once("/namespaces/")?;
    let list = &api.lists.get(&format!("{group}/{plural}"))?["items"];
    list.as_array()?.iter().find(|o| o["metadata"]["name"] == name).cloned()
}

/// A TokenReview as the API server answers it, for the test tokens `namespace:pod` (a bound pod
/// token of the namespace's default ServiceAccount) and `wrong-audience`.
fn token_review(request: &Value) -> Value {
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    let audiences = request["spec"]["audiences"].clone();
    let status = match token.split_once(':') {
        Some((ns, pod)) if token != "wrong-audience" => json!({
            "authenticated": true,
            "audiences": audiences,
            "user": {"username": format!("system:serviceaccount:{ns}:default"),
                     "extra": {"authentication.kubernetes.io/pod-name": [pod]}},
        }),
        _ => {
            json!({"authenticated": false, "error": "[invalid bearer token, token audiences [\"https://kubernetes.default.svc\"] is invalid for the target audiences [\"sideyard\"]]"})
        }
    };
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": request["spec"], "status": status})
}

async fn fake_api(State(api): State<Arc<FakeApi>>, request: axum::extract::Request) -> axum::response::Response {
    let (method, path, query) = (
        request.method().clone(),
        request.uri().path().to_string(),
        request.uri().query().unwrap_or_default().to_string(),
    );
    let body = axum::body::to_bytes(request.into_body(), 1 << 24).await.unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let json = |status: u16, v: Value| {
        (http::StatusCode::from_u16(status).unwrap(), [(http::header::CONTENT_TYPE, "application/json")], v.to_string())
            .into_response()
    };
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/sideyard-operator";
    if method == Method::GET && query.contains("watch=true") {
        // A watch with nothing to report, held open.
        let idle = futures::stream::pending::<Result<bytes::Bytes, std::convert::Infallible>>();
        return (http::StatusCode::OK, axum::body::Body::from_stream(idle)).into_response();
    }
    match (method.clone(), path.as_str()) {
        (Method::GET, p) if p.contains("sideyard.dev") && !api.crds_installed => json(404, not_found()),
        (Method::GET, p) if api.lists.contains_key(p) => json(200, api.lists[p].clone()),
        // Injected pods: none unless a test lists some.
        (Method::GET, "/api/v1/pods") => json(200, list("Pod", "v1", Vec::new())),
        (Method::GET, p) if p == lease_path && api.stolen.load(std::sync::atomic::Ordering::Relaxed) => {
            json(200, lease("op-2", "500"))
        }
        (Method::GET, p) if p == lease_path => match api.lease.lock().unwrap().clone() {
            Some(lease) => json(200, lease),
            None => json(404, not_found()),
        },
        (Method::POST, "/apis/coordination.k8s.io/v1/namespaces/ops/leases") | (Method::PUT, _)
            if path.starts_with("/apis/coordination") =>
        {
            // A new resourceVersion for every write, as the API server gives: another replica
            // sees the holder renew, rather than a lease that never changes and so expires.
            let mut lease = body.clone();
            let version = api.lease_versions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 100;
            lease["metadata"]["resourceVersion"] = version.to_string().into();
            *api.lease.lock().unwrap() = Some(lease.clone());
            api.writes.lock().unwrap().push((method.to_string(), path, body));
            json(200, lease)
        }
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => json(201, token_review(&body)),
        (Method::GET, p) if p.ends_with("/status") => {
            let object_path = p.trim_end_matches("/status");
            match object_at(&api, object_path) {
                Some(mut object) => {
                    if let Some(status) = api.statuses.lock().unwrap().get(object_path) {
                        object["status"] = status.clone();
                    }
                    json(200, object)
                }
                None => json(404, not_found()),
            }
        }
        (Method::GET, p) if object_at(&api, p).is_some() => json(200, object_at(&api, p).unwrap_or_default()),
        (Method::PATCH, p) if p.ends_with("/status") => {
            // Server-side apply, by top-level field and by condition type (a map list): a
            // manager's fields are the ones it last applied, and one it leaves out is removed.
            // Answers with the object, status applied.
            let object_path = p.trim_end_matches("/status").to_string();
            let Some(mut object) = object_at(&api, &object_path) else { return json(404, not_found()) };
            let manager = query.split('&').find_map(|kv| kv.strip_prefix("fieldManager=")).unwrap_or("").to_string();
            let mut applied: BTreeMap<String, Value> =
                body["status"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
            let conditions = applied.remove("conditions").and_then(|c| c.as_array().cloned()).unwrap_or_default();
            let mut keys: std::collections::BTreeSet<String> = applied.keys().cloned().collect();
            keys.extend(conditions.iter().map(|c| format!("conditions/{}", c["type"].as_str().unwrap_or(""))));
            let mut owners = api.status_owners.lock().unwrap();
            let owned = owners.entry((object_path.clone(), manager)).or_default();
            let mut statuses = api.statuses.lock().unwrap();
            let status = statuses.entry(object_path).or_insert_with(|| json!({}));
            let fields = status.as_object_mut().unwrap();
            for gone in owned.iter().filter(|f| !keys.contains(*f)) {
                match gone.strip_prefix("conditions/") {
                    Some(type_) => {
                        if let Some(list) = fields.get_mut("conditions").and_then(Value::as_array_mut) {
                            list.retain(|c| c["type"] != type_);
                        }
                    }
                    None => {
                        fields.remove(gone);
                    }
                }
            }
            *owned = keys;
            for (field, value) in applied {
                fields.insert(field, value);
            }
            let list = fields.entry("conditions").or_insert_with(|| json!([])).as_array_mut().unwrap();
            for condition in conditions {
                match list.iter_mut().find(|c| c["type"] == condition["type"]) {
                    Some(existing) => *existing = condition,
                    None => list.push(condition),
                }
            }
            if list.is_empty() {
                fields.remove("conditions");
            }
            object["status"] = status.clone();
            drop(statuses);
            api.writes.lock().unwrap().push((method.to_string(), path, body));
            json(200, object)
        }
        (Method::PATCH | Method::POST, _) => {
            api.writes.lock().unwrap().push((method.to_string(), path, body.clone()));
            json(201, body)
        }
        _ => json(404, not_found()),
    }
}

pub fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": "10"}, "items": items})
}

/// Serves `api` on 127.0.0.1 and writes a kubeconfig that points at it.
pub async fn serve_fake_api(api: Arc<FakeApi>) -> std::path::PathBuf {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(fake_api).with_state(api);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = super::temp_dir("kubeconfig");
    let path = dir.join("config");
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\nusers: [{{name: fake, user: {{token: test}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: ops}}}}]\ncurrent-context: fake\n"
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// `sideyard operator` on kernel-chosen local ports, with `extra` flags.
pub fn operator_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    replica_args("op-1", "127.0.0.1:0", extra)
}

/// The operator replica `identity`, its ledger on `ledger_listen`, other ports chosen by the
/// kernel.
pub fn replica_args<'a>(identity: &'a str, ledger_listen: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "operator",
        "--admin-listen",
        "127.0.0.1:0",
        "--webhook-listen",
        "127.0.0.1:0",
        "--ledger-listen",
        ledger_listen,
        "--identity",
        identity,
    ];
    args.extend_from_slice(extra);
    args
}

pub fn writes_to(api: &FakeApi, method: &str, path: &str) -> Vec<Value> {
    api.writes.lock().unwrap().iter().filter(|(m, p, _)| m == method && p == path).map(|(_, _, b)| b.clone()).collect()
}

pub fn lease(holder: &str, version: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "sideyard-operator", "namespace": "ops", "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 3,
                 "renewTime": "2026-11-25T00:00:00.000000Z"}
    })
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
}

/// A cluster-mode sidecar of pod `pod` on the configuration in `config_dir` (as the operator
/// published it), its state in `state`, presenting the token in `token_file` to the ledger: its
/// process, API and admin addresses.
pub fn ledger_sidecar(
    config_dir: &std::path::Path,
    state: &std::path::Path,
    token_file: &std::path::Path,
    pod: &str,
) -> (super::Process, std::net::SocketAddr, std::net::SocketAddr) {
    let path = |p: &std::path::Path| p.to_str().expect("a UTF-8 path").to_string();
    let (config_dir, state, token_file) = (path(config_dir), path(state), path(token_file));
    let args = [
        "sidecar",
        "-f",
        &config_dir,
        "--state-dir",
        &state,
        "--ledger-token-file",
        &token_file,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let (process, line) = super::Process::start(&args, &[("HOSTNAME", pod)], "serving");
    (process, super::addr_after(&line, "api="), super::addr_after(&line, "admin="))
}
