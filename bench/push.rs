//! The configuration stream at scale: N simulated sidecars, each with its own TLS connection and
//! HTTP/2 stream as a sidecar holds them, connected to one real `sideyard operator` process that
//! runs against a fake API server in this process. Then route changes, each timed from the watch
//! event that carries it to the API server's watchers until each stream's frame of the new
//! version has been read.
//!
//! `bench/push.sh` builds and runs it; it prints one Markdown table row per fleet size.
//! Usage: push OPERATOR_BINARY [--sidecars 100,1000] [--changes 20]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_rustls::rustls;

const NS: &str = "bench";
/// Every wait is bounded: a stuck run fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);

/// The API server the operator talks to: fixed lists, one ProviderRoute whose changes go out on
/// every route watch, TokenReviews for `bench:pod-N` tokens, pods with one label, and writes
/// accepted.
struct FakeApi {
    route: Mutex<Value>,
    changes: broadcast::Sender<Value>,
}

fn route(generation: u64) -> Value {
    json!({"apiVersion": "sideyard.dev/v1alpha1", "kind": "ProviderRoute",
           "metadata": {"name": "chat", "namespace": NS, "uid": "route-uid", "generation": generation,
                        "resourceVersion": (100 + generation).to_string(), "creationTimestamp": "2026-12-01T00:00:00Z"},
           // A realistic route: three targets, the alias is what each change changes.
           "spec": {"model": "chat", "aliases": [format!("chat-v{generation}")], "targets": [
               {"name": "primary", "api": "mock", "pricing": {"prompt": "2.5", "completion": "10"}},
               {"name": "backup", "api": "mock", "pricing": {"prompt": "3", "completion": "15"}},
               {"name": "cheap", "api": "mock", "pricing": {"prompt": "0.15", "completion": "0.6"}}]}})
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": "100"}, "items": items})
}

async fn fake_api(State(api): State<Arc<FakeApi>>, request: Request) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let watch = request.uri().query().is_some_and(|q| q.contains("watch=true"));
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let json = |status: StatusCode, v: Value| {
        (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
    };
    if method == Method::GET && watch {
        if path == "/apis/sideyard.dev/v1alpha1/providerroutes" {
            let changes = api.changes.subscribe();
            let events = futures::stream::unfold(changes, |mut changes| async move {
                let object = changes.recv().await.ok()?;
                let line = format!("{}\n", json!({"type": "MODIFIED", "object": object}));
                Some((Ok::<_, Infallible>(Bytes::from(line)), changes))
            });
            return (StatusCode::OK, Body::from_stream(events)).into_response();
        }
        let idle = futures::stream::pending::<Result<Bytes, Infallible>>();
        return (StatusCode::OK, Body::from_stream(idle)).into_response();
    }
    match (method, path.as_str()) {
        (Method::GET, "/apis/sideyard.dev/v1alpha1/providerroutes") => {
            let route = api.route.lock().unwrap_or_else(|e| e.into_inner()).clone();
            json(StatusCode::OK, list("ProviderRoute", "sideyard.dev/v1alpha1", vec![route]))
        }
        (Method::GET, "/apis/sideyard.dev/v1alpha1/apikeybudgets") => {
            json(StatusCode::OK, list("ApiKeyBudget", "sideyard.dev/v1alpha1", vec![]))
        }
        (Method::GET, "/api/v1/namespaces") => json(
            StatusCode::OK,
            list(
                "Namespace",
                "v1",
                vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "uid": "ns-uid"}})],
            ),
        ),
        (Method::GET, "/api/v1/secrets") => json(StatusCode::OK, list("Secret", "v1", vec![])),
        (Method::GET, "/api/v1/pods") => json(StatusCode::OK, list("Pod", "v1", vec![])),
        (Method::GET, p) if p.starts_with(&format!("/api/v1/namespaces/{NS}/pods/")) => {
            let name = p.rsplit('/').next().unwrap_or_default();
            json(
                StatusCode::OK,
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                       "metadata": {"name": name, "namespace": NS, "labels": {"app": "web"}}}),
            )
        }
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let pod = token.strip_prefix("bench:").unwrap_or_default();
            json(
                StatusCode::CREATED,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": {
                    "authenticated": true, "audiences": ["sideyard"],
                    "user": {"username": format!("system:serviceaccount:{NS}:default"),
                             "extra": {"authentication.kubernetes.io/pod-name": [pod]}}}}),
            )
        }
        (Method::PATCH, p) if p.ends_with("/status") => {
            let mut object = api.route.lock().unwrap_or_else(|e| e.into_inner()).clone();
            object["status"] = body["status"].clone();
            json(StatusCode::OK, object)
        }
        (Method::PATCH | Method::POST, _) => json(StatusCode::CREATED, body),
        _ => {
            json(StatusCode::NOT_FOUND, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}))
        }
    }
}

/// Serves the fake API on 127.0.0.1 and writes a kubeconfig for it into `dir`.
async fn serve_fake_api(api: Arc<FakeApi>, dir: &Path) -> PathBuf {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let app = axum::Router::new().fallback(fake_api).with_state(api);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let path = dir.join("kubeconfig");
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\nusers: [{{name: fake, user: {{token: bench}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: ops}}}}]\ncurrent-context: fake\n"
    );
    std::fs::write(&path, config).expect("kubeconfig");
    path
}

/// One simulated sidecar: its stream's frames as (version, when read, bytes).
type Received = Arc<Mutex<Vec<(u64, Instant, usize)>>>;

async fn sidecar(
    ledger: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    pod: usize,
    received: Received,
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(ledger).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::get("https://localhost/config/v1/stream")
        .header(header::AUTHORIZATION, format!("Bearer bench:pod-{pod}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("stream refused: {}", response.status()));
    }
    let mut body = response.into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let version = serde_json::from_slice::<Value>(&line).ok().and_then(|v| v["version"].as_u64()).unwrap_or(0);
            received.lock().unwrap_or_else(|e| e.into_inner()).push((version, Instant::now(), line.len()));
        }
    }
    Ok(())
}

/// CPU seconds (user + system) and resident memory (KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
}

async fn admin_metrics(admin: SocketAddr) -> String {
    let Ok(tcp) = tokio::net::TcpStream::connect(admin).await else { return String::new() };
    let Ok((mut sender, connection)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await else {
        return String::new();
    };
    tokio::spawn(connection);
    let request = http::Request::get("/metrics").header(header::HOST, "localhost").body(Empty::<Bytes>::new());
    let Ok(request) = request else { return String::new() };
    match sender.send_request(request).await {
        Ok(r) => String::from_utf8_lossy(&r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default())
            .into_owned(),
        Err(_) => String::new(),
    }
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One run: `sidecars` streams, `changes` route changes. Prints a table row.
async fn run(binary: &Path, sidecars: usize, changes: u64) {
    let dir = std::env::temp_dir().join(format!("sideyard-push-bench-{}-{sidecars}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cert = sideyard::operator::tls::issue(&["localhost".into()], None, std::time::SystemTime::now()).expect("cert");
    for (file, text) in [("tls.crt", &cert.cert), ("tls.key", &cert.key), ("ca.crt", &cert.ca_cert)] {
        std::fs::write(dir.join(file), text).expect("cert file");
    }
    let api = Arc::new(FakeApi { route: Mutex::new(route(1)), changes: broadcast::channel(16).0 });
    let kubeconfig = serve_fake_api(api.clone(), &dir).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let admin_port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let ledger: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("address");
    let child = Command::new(binary)
        .args(["operator", "--leader-elect=false", "--webhook-listen", "127.0.0.1:0", "--log", "warn"])
        .args(["--ledger-listen", &ledger.to_string(), "--admin-listen", &admin.to_string()])
        .args([
            "--ledger-service-url",
            &format!("https://localhost:{port}"),
            "--ledger-url",
            &format!("https://localhost:{port}"),
        ])
        .arg("--webhook-cert-dir")
        .arg(&dir)
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the operator starts");
    let operator = Operator(child);
    let pid = operator.0.id();
    until("the operator publishes the first version", async || {
        metric(&admin_metrics(admin).await, "sideyard_operator_config_writes_total") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, rss_before) = usage(pid);

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(cert.ca_cert.as_bytes()) {
        roots.add(c.expect("CA")).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let streams: Vec<Received> = (0..sidecars).map(|_| Received::default()).collect();
    for (pod, received) in streams.iter().enumerate() {
        let (tls, received) = (tls.clone(), received.clone());
        tokio::spawn(async move {
            let result = sidecar(ledger, tls, pod, received.clone()).await;
            // Streams end with the run; only one that never got a frame is worth a word.
            if let Err(e) = result
                && received.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
            {
                eprintln!("sidecar {pod}: {e}");
            }
        });
    }
    let latest = |s: &Received| s.lock().unwrap_or_else(|e| e.into_inner()).last().map_or(0, |r| r.0);
    until("every stream has the first version", async || streams.iter().all(|s| latest(s) >= 1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu_before, rss_connected) = usage(pid);
    let bytes_before = metric(&admin_metrics(admin).await, "sideyard_operator_config_frame_bytes_total");

    let mut latencies = Vec::new();
    for generation in 2..2 + changes {
        let version = streams.iter().map(latest).max().unwrap_or(0);
        let object = route(generation);
        *api.route.lock().unwrap_or_else(|e| e.into_inner()) = object.clone();
        let sent = Instant::now();
        let _ = api.changes.send(object);
        until("every stream has the new version", async || streams.iter().all(|s| latest(s) > version)).await;
        for s in &streams {
            let received = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, at, _)) = received.iter().find(|r| r.0 > version) {
                latencies.push(at.duration_since(sent));
            }
        }
    }
    let (cpu_after, _) = usage(pid);
    let bytes_after = metric(&admin_metrics(admin).await, "sideyard_operator_config_frame_bytes_total");
    // No stream ever went back a version.
    let monotonic = streams.iter().all(|s| {
        let received = s.lock().unwrap_or_else(|e| e.into_inner());
        received.windows(2).all(|w| w[0].0 < w[1].0)
    });
    latencies.sort();
    let bytes_per_change = (bytes_after - bytes_before) / changes;
    let per_sidecar_kib = rss_connected.saturating_sub(rss_before) as f64 / sidecars as f64;
    println!(
        "| {sidecars} | {:.1} / {:.1} ms | {:.1} ms | {:.1} ms CPU ({:.1} µs per sidecar) | {:.1} MiB ({:.1} KiB per sidecar) | {} ({} per sidecar) | {} |",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        (cpu_after - cpu_before) / changes as f64 * 1e3,
        (cpu_after - cpu_before) / changes as f64 / sidecars as f64 * 1e6,
        rss_connected as f64 / 1024.0,
        per_sidecar_kib,
        bytes_per_change,
        bytes_per_change / sidecars as u64,
        if monotonic { "never" } else { "**went back**" },
    );
    drop(operator);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = PathBuf::from(args.get(1).expect("usage: push OPERATOR_BINARY [--sidecars 100,1000] [--changes 20]"));
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let sizes: Vec<usize> =
        flag("--sidecars").unwrap_or_else(|| "100,1000".into()).split(',').filter_map(|n| n.parse().ok()).collect();
    let changes: u64 = flag("--changes").and_then(|n| n.parse().ok()).unwrap_or(20);
    println!(
        "| Sidecars | Apply to served, p50 / p99 | max | Operator CPU per change | Operator RSS with the streams | Bytes sent per change | Older version after newer |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for sidecars in sizes {
        run(&binary, sidecars, changes).await;
    }
}
