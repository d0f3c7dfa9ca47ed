//! Test harness: the real `sideyard` binary as a child process, a scripted upstream, and a small
//! HTTP client. Everything listens on 127.0.0.1 with ports chosen by the kernel.
#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

pub mod cluster;
pub mod crd_cases;
pub mod fleet;
pub mod helm;
pub mod otlp;

/// The upper bound on any single wait in a test. It only turns a hang into a failure; nothing is
/// asserted about how long things take.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A fresh directory under cargo's target tmp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A virtualenv under target/ with the pinned packages of `tests/python/{requirements}`, created
/// once and reused while `ready(venv)` holds.
pub fn python_venv(name: &str, requirements: &str, ready: impl Fn(&Path) -> bool) -> PathBuf {
    // Tests of one binary run in parallel: the second to ask for a venv waits for the first to
    // create it, instead of creating it over the first's.
    static CREATING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if ready(&venv) {
        return venv;
    }
    let status = Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv).status().expect("run python3");
    assert!(status.success(), "python3 -m venv failed");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(requirements);
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&file)
        .status()
        .expect("run pip");
    assert!(status.success(), "pip install -r {} failed", file.display());
    assert!(ready(&venv), "the packages of {} do not work after installing them", file.display());
    venv
}

/// The Python of a virtualenv with an SDK installed from `tests/python/{requirements}`, where
/// `import {module}` gives `version`: created once, reused by later runs.
pub fn sdk_python(venv: &str, requirements: &str, module: &str, version: &str) -> PathBuf {
    let check = format!("import {module}, sys; sys.exit({module}.__version__ != {version:?})");
    let venv = python_venv(venv, requirements, |venv: &Path| {
        Command::new(venv.join("bin/python")).args(["-c", &check]).status().is_ok_and(|s| s.success())
    });
    venv.join("bin/python")
}

/// Runs `tests/python/{script}` with `python` and `envs`, off the test's runtime; its stdout, once
/// it has exited successfully.
pub async fn run_script(python: PathBuf, script: &str, envs: &[(&str, &str)]) -> String {
    let mut command = Command::new(python);
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script));
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = tokio::task::spawn_blocking(move || command.output().expect("run the script")).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// `kubernetes-validate --strict` for Kubernetes 1.29 (the oldest we support: the first with
/// native sidecars) and the newest it knows. Kinds it has no schema for (custom resources) pass
/// with a warning; check those by hand.
pub fn assert_valid_manifests(path: &Path) {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let venv = VENV.get_or_init(|| {
        python_venv("validate-venv", "validate-requirements.txt", |venv: &Path| {
            Command::new(venv.join("bin/kubernetes-validate"))
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    });
    for version in [Some("1.29.0"), None] {
        let mut command = Command::new(venv.join("bin/kubernetes-validate"));
        command.args(["--strict", "--quiet"]);
        if let Some(v) = version {
            command.args(["-k", v]);
        }
        let out = command.arg(path).output().expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "kubernetes-validate {version:?} rejected {}:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A request over TLS to `addr`, trusting only `ca_pem` and checking the certificate for
/// `server_name`: the status, the body, and the certificate the server presented (DER).
pub async fn https_post(
    addr: SocketAddr,
    ca_pem: &str,
    server_name: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes, Vec<u8>), String> {
    https_call(addr, ca_pem, server_name, path, body, None, false).await
}

/// Like [`https_post`], with `Authorization: Bearer <token>` when given, and over HTTP/2 (the
/// server must offer it by ALPN) when `http2`.
pub async fn https_call(
    addr: SocketAddr,
    ca_pem: &str,
    server_name: &str,
    path: &str,
    body: Vec<u8>,
    token: Option<&str>,
    http2: bool,
) -> Result<(StatusCode, Bytes, Vec<u8>), String> {
    let (response, presented) =
        https_open(addr, ca_pem, server_name, http::Method::POST, path, body, token, http2).await?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body, presented))
}

/// A request over TLS as [`https_call`] makes it, answered with the response as it streams and the
/// certificate the server presented.
#[allow(clippy::too_many_arguments)]
pub async fn https_open(
    addr: SocketAddr,
    ca_pem: &str,
    server_name: &str,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
    token: Option<&str>,
    http2: bool,
) -> Result<(http::Response<Incoming>, Vec<u8>), String> {
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName, pki_types::pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if http2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    if http2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err("the server did not agree to HTTP/2".into());
    }
    // HTTP/2 carries the authority in the URI; HTTP/1.1 in Host, with an origin-form path.
    let mut request = if http2 {
        http::Request::builder().method(method).uri(format!("https://{server_name}{path}"))
    } else {
        http::Request::builder().method(method).uri(path).header(header::HOST, server_name)
    };
    request = request.header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(tls);
    let response = if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(|e| e.to_string())?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(|e| e.to_string())?
    };
    Ok((response, presented))
}

/// Decodes base64 as the Kubernetes API writes it (Secret data, admission patches).
pub fn base64_decode(text: &str) -> Vec<u8> {
    serde_json::from_value::<k8s_openapi::ByteString>(serde_json::Value::String(text.into()))
        .unwrap_or_else(|e| panic!("not base64 ({e}): {text}"))
        .0
}

/// A ProviderRoute document named and served as `model`. `spec` holds extra spec fields as one
/// line (`fallback: {when: []}`), each of `targets` one target as a YAML flow mapping.
pub fn route_yaml(model: &str, spec: &str, targets: &[&str]) -> String {
    let mut yaml = format!(
        "---\napiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {{name: {model}}}\nspec:\n  model: {model}\n"
    );
    if !spec.is_empty() {
        yaml += &format!("  {spec}\n");
    }
    yaml += "  targets:\n";
    for target in targets {
        yaml += &format!("    - {target}\n");
    }
    yaml
}

/// An ApiKeyBudget document named `name` for `key`, which a Secret `{name}-key` holds. `spec`
/// holds extra spec fields as one line (`limit: "10"`; several joined by `\n  `).
pub fn budget_yaml(name: &str, key: &str, spec: &str) -> String {
    let mut yaml = format!(
        "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: {name}}}\nspec:\n  key: {{secretRef: {{name: {name}-key, key: key}}}}\n"
    );
    if !spec.is_empty() {
        yaml += &format!("  {spec}\n");
    }
    yaml += &format!("---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key}}\nstringData: {{key: {key}}}\n");
    yaml
}

/// A running `sideyard` process. Killed on drop.
pub struct Process {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `sideyard ARGS` and waits for the stderr line containing `ready_marker`.
    pub fn start(args: &[&str], envs: &[(&str, &str)], ready_marker: &str) -> (Process, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sideyard"));
        command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn sideyard");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = BufReader::new(child.stderr.take().expect("stderr"));
        let log = stderr.clone();
        let marker = ready_marker.to_string();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in reader.lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
                if line.contains(&marker)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        let process = Process { child, stderr };
        match rx.recv_timeout(PATIENCE) {
            Ok(line) => (process, line),
            Err(_) => panic!("sideyard did not log {ready_marker:?}; stderr:\n{}", process.log()),
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `SIG<name>` (`STOP` freezes the process, `CONT` thaws it).
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit, failing the test if it does not.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "sideyard did not exit; stderr:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `sideyard ARGS` to completion: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (Option<i32>, String, String) {
    run_with(args, &[])
}

/// [`run`] with these environment variables, in the crate's directory (so `examples/` resolve).
pub fn run_with(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sideyard"))
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run sideyard");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A sidecar on kernel-chosen ports, serving the YAML in `config` (written to a file it watches).
pub struct Sidecar {
    pub process: Process,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    /// Holds the config file and the ledger's `state/` directory.
    pub dir: PathBuf,
}

impl Sidecar {
    pub fn start(config: &str) -> Sidecar {
        Self::start_with(config, &[], &[])
    }

    pub fn start_with(config: &str, extra_args: &[&str], envs: &[(&str, &str)]) -> Sidecar {
        Self::start_in(temp_dir("sidecar"), config, extra_args, envs)
    }

    /// Starts a sidecar whose config file and ledger live in `dir`, as a restart would find them.
    pub fn start_in(dir: PathBuf, config: &str, extra_args: &[&str], envs: &[(&str, &str)]) -> Sidecar {
        let config_path = dir.join("routes.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let path = config_path.to_str().expect("utf-8 path");
        let state_dir = dir.join("state");
        let state_dir = state_dir.to_str().expect("utf-8 path");
        let mut args = vec![
            "sidecar",
            "-f",
            path,
            "--state-dir",
            state_dir,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--reload-interval",
            "100ms",
        ];
        args.extend_from_slice(extra_args);
        let (process, line) = Process::start(&args, envs, "serving");
        Sidecar { process, api: addr_after(&line, "api="), admin: addr_after(&line, "admin="), config_path, dir }
    }
}

/// Reads `KEY=127.0.0.1:PORT` out of a log line, or the field `KEY` of a JSON log line.
pub fn addr_after(line: &str, key: &str) -> SocketAddr {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(line) {
        let field = fields.get(key.trim_end_matches('=')).and_then(|v| v.as_str());
        let field = field.unwrap_or_else(|| panic!("no {key} in {line:?}"));
        return field.parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
    }
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("no {key} in {line:?}")) + key.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"))
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> http::Response<Incoming> {
    send_as(addr, None, method, path, body).await
}

/// Sends a request with `Authorization: Bearer <key>` when a key is given.
pub async fn send_as(
    addr: SocketAddr,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> http::Response<Incoming> {
    let bearer = key.map(|key| format!("Bearer {key}"));
    let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
    send_with(addr, method, path, &headers, body).await
}

/// Sends a JSON request with these extra headers.
pub async fn send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Response<Incoming> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::copy_from_slice(body.as_bytes()))).unwrap();
    tokio::time::timeout(PATIENCE, client().request(request))
        .await
        .expect("response headers in time")
        .expect("request sent")
}

pub async fn read(response: http::Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect()).await.expect("body in time").expect("body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into() }
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
    read(send(addr, "POST", path, body).await).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    read(send(addr, "GET", path, "").await).await
}

/// The next data chunk of a streamed body, or `None` at its end.
pub async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(PATIENCE, body.frame()).await.expect("next chunk in time")?;
        if let Ok(data) = frame.expect("stream frame").into_data() {
            return Some(data);
        }
    }
}

/// Everything left of a streamed body, as text.
pub async fn rest(body: &mut Incoming) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = next_chunk(body).await {
        out.extend_from_slice(&chunk);
    }
    String::from_utf8(out).unwrap()
}

/// The value of a metric series in a Prometheus text exposition; fails the test when the series
/// is missing, so that a renamed or dropped metric cannot pass for a zero.
pub fn metric(exposition: &str, series: &str) -> u64 {
    metric_if_present(exposition, series)
        .unwrap_or_else(|| panic!("no series {series} in the exposition:\n{exposition}"))
}

/// The value of a metric series, or `None` when the exposition does not have it.
pub fn metric_if_present(exposition: &str, series: &str) -> Option<u64> {
    exposition.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' '))).map(|v| {
        v.trim().parse().unwrap_or_else(|e| panic!("series {series} has a value that is not a whole number: {v}: {e}"))
    })
}

/// Polls until `check` holds, failing the test after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_or_explain(what, check, String::new).await;
}

/// [`eventually`], and when it gives up, says what `explain` finds then (the state that kept
/// `check` from holding).
pub async fn eventually_or_explain<F, Fut>(what: &str, check: F, explain: impl FnOnce() -> String)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_or_find_out(what, check, async || explain()).await;
}

/// [`eventually_or_explain`] with an `explain` that may ask the processes over the network.
pub async fn eventually_or_find_out<F, Fut>(what: &str, mut check: F, explain: impl AsyncFnOnce() -> String)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        if tokio::time::Instant::now() >= deadline {
            let detail = explain().await;
            let detail = if detail.is_empty() { detail } else { format!("\n{detail}") };
            panic!("gave up waiting for: {what}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A request as the scripted upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The sidecar's end of the connection the request came on.
    pub peer: SocketAddr,
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An upstream whose behaviour is chosen by the first path segment of the target's base URL:
///
/// - `ok`: a chat completion echoing the request's model; `sse-ok` streams one.
/// - `status-NNN`: an OpenAI error body with status NNN (`status-429` adds `Retry-After`).
/// - `hang`: never answers. `stall-json`: headers, part of a body, then nothing.
/// - `garbage`: 200 with a body that is not JSON. `reset-json`: headers, then a broken body.
/// - `sse-break`: two events, then a broken connection. `sse-stall`: two events, then nothing.
/// - `sse-gated`: [`GATED_EVENTS`], sending each after the first only when the test opens the gate.
/// - `echo-key`: a 500 whose body repeats the Authorization header it received.
/// - `switch`: a chat completion, or a 503 while [`ScriptedUpstream::down`] is set.
/// - `gated-503`: a 503 once the test opens the gate (a permit of [`ScriptedUpstream::gate`]).
/// - `ratelimit-after-N`: 429 with `Retry-After: N`; `ratelimit-ms-N`: 429 with `retry-after-ms: N`.
/// - `context-400`: OpenAI's context-length error.
/// - `sse-break-early`: the role chunk, then a broken connection, before any token.
/// - `sse-slow-token`: the role chunk, then a word after 3 s; notes in [`ScriptedUpstream::cancelled`]
///   when the caller closes the connection first.
/// - `latency-N`: a chat completion after N ms.
/// - `anthropic-answer-CASE`: the Messages answer `tests/testdata/anthropic/answers/CASE.messages.json`.
/// - `anthropic-stream-CASE`: the Messages events `tests/testdata/anthropic/streams/CASE.events`,
///   sent in pieces that cut events and lines.
/// - `anthropic-gated`: a Messages stream that sends its first text delta, then the rest only once
///   the test opens the gate.
/// - `anthropic-status-NNN`: an Anthropic error body with status NNN (429 adds `retry-after: 7`).
/// - `provider-api`: under `/v1`, a file object for `POST /v1/files`, a transcription naming the
///   form's model for `POST /v1/audio/transcriptions`, and for anything else what it received (method, path, query,
///   JSON `model`).
/// - `responses-answer-CASE`: the response `tests/testdata/responses/answers/CASE.response.json`;
///   `responses-stream-CASE`: the events of `tests/testdata/responses/streams/CASE.events`, in pieces;
///   `responses-native-CASE`: a provider's own stream, `tests/testdata/responses/native/CASE.events`.
/// - `openai-answer-CASE`, `openai-stream-CASE`: the chat completion
///   `tests/testdata/anthropic/callers/answers/CASE.chat.json`, the chunks `.../streams/CASE.chunks`.
#[derive(Clone)]
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    pub gate: Arc<Semaphore>,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    pub cancelled: Arc<Mutex<Vec<String>>>,
}

/// The bytes `sse-gated` sends, deliberately split mid-event and mid-line.
pub const GATED_EVENTS: [&str; 4] = [
    "data: {\"id\":\"g\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"id\":\"g\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"caf\u{e9} \"}}]}\n\n: a comment line\n\n",
    "data: {\"id\":\"g\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}\r\n\r\n",
    "data: [DONE]\n\n",
];

/// Where `sse-gated` cuts [`GATED_EVENTS`]: inside events, inside a line, inside the UTF-8 `é`.
pub fn gated_cuts() -> Vec<usize> {
    let all: String = GATED_EVENTS.concat();
    vec![0, 40, all.find('\u{e9}').unwrap() + 1, all.find("ok").unwrap(), all.len() - 3, all.len()]
}

impl ScriptedUpstream {
    pub async fn start() -> ScriptedUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = ScriptedUpstream {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            down: Arc::default(),
            cancelled: Arc::default(),
        };
        let app = axum::Router::new().fallback(script).with_state(upstream.clone());
        tokio::spawn(
            async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await },
        );
        upstream
    }

    /// The base URL of one behaviour.
    pub fn url(&self, behaviour: &str) -> String {
        format!("http://{}/{behaviour}", self.addr)
    }

    /// Requests received for a behaviour.
    pub fn hits(&self, behaviour: &str) -> usize {
        let prefix = format!("/{behaviour}/");
        self.requests.lock().unwrap().iter().filter(|r| r.path.starts_with(&prefix)).count()
    }

    pub fn recorded(&self, behaviour: &str) -> Vec<Recorded> {
        let prefix = format!("/{behaviour}/");
        self.requests.lock().unwrap().iter().filter(|r| r.path.starts_with(&prefix)).cloned().collect()
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn sse_chunk(content: &str) -> String {
    let chunk = serde_json::json!({
        "id": "s", "object": "chat.completion.chunk", "model": "upstream-model",
        "choices": [{"index": 0, "delta": {"content": content}}],
    });
    format!("data: {chunk}\n\n")
}

fn sse_response(body: Channel<Bytes, std::io::Error>) -> Response {
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::new(body)).into_response()
}

async fn script(
    State(up): State<ScriptedUpstream>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_string();
    up.requests.lock().unwrap().push(Recorded {
        peer,
        method: parts.method.clone(),
        path: path.clone(),
        query: parts.uri.query().map(String::from),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let behaviour = path.trim_start_matches('/').split('/').next().unwrap_or("").to_string();
    let model =
        serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["model"].as_str().map(String::from));

    let ok = |model: Option<String>| {
        json(
            StatusCode::OK,
            serde_json::json!({
                "id": "chatcmpl-ok", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }),
        )
    };
    if let Some(ms) = behaviour.strip_prefix("latency-") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        return ok(model);
    }
    let rate_limited = |header: &'static str, value: &str| {
        let mut response = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"error": {"message": "slow down"}}));
        response.headers_mut().insert(header, value.parse().unwrap());
        response
    };
    if let Some(seconds) = behaviour.strip_prefix("ratelimit-after-") {
        return rate_limited("retry-after", seconds);
    }
    if let Some(ms) = behaviour.strip_prefix("ratelimit-ms-") {
        return rate_limited("retry-after-ms", ms);
    }
    if let Some(case) = behaviour.strip_prefix("anthropic-answer-") {
        let answer = std::fs::read(format!("tests/testdata/anthropic/answers/{case}.messages.json")).unwrap();
        return ([(header::CONTENT_TYPE, "application/json")], answer).into_response();
    }
    if let Some(case) = behaviour.strip_prefix("responses-answer-") {
        let answer = std::fs::read(format!("tests/testdata/responses/answers/{case}.response.json")).unwrap();
        return ([(header::CONTENT_TYPE, "application/json")], answer).into_response();
    }
    if let Some(case) = behaviour.strip_prefix("openai-answer-") {
        let answer = std::fs::read(format!("tests/testdata/anthropic/callers/answers/{case}.chat.json")).unwrap();
        return ([(header::CONTENT_TYPE, "application/json")], answer).into_response();
    }
    // `openai-whole-` sends the stream in one write, which usually arrives in one read.
    let whole = behaviour.strip_prefix("openai-whole-");
    let stream = match (behaviour.strip_prefix("anthropic-stream-"), behaviour.strip_prefix("openai-stream-").or(whole))
    {
        (Some(case), _) => Some(format!("tests/testdata/anthropic/streams/{case}.events")),
        (_, Some(case)) => Some(format!("tests/testdata/anthropic/callers/streams/{case}.chunks")),
        _ => match (behaviour.strip_prefix("responses-stream-"), behaviour.strip_prefix("responses-native-")) {
            (Some(case), _) => Some(format!("tests/testdata/responses/streams/{case}.events")),
            (_, Some(case)) => Some(format!("tests/testdata/responses/native/{case}.events")),
            _ => None,
        },
    };
    if let Some(file) = stream {
        let mut events = std::fs::read(file).unwrap();
        // A translation's golden ends with how it ended, which is not part of the stream.
        if let Some(end) = events.windows(5).position(|w| w == b"END: ") {
            events.truncate(end);
        }
        let piece = if whole.is_some() { events.len().max(1) } else { 37 };
        let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(4);
        tokio::spawn(async move {
            for piece in events.chunks(piece) {
                if tx.send_data(Bytes::copy_from_slice(piece)).await.is_err() {
                    return;
                }
            }
        });
        return sse_response(body);
    }
    if behaviour == "anthropic-gated" {
        let events = std::fs::read_to_string("tests/testdata/anthropic/streams/text.events").unwrap();
        // Up to and with the first text delta, then the rest.
        let cut = events.find("text_delta").and_then(|at| events[at..].find("\n\n").map(|end| at + end + 2)).unwrap();
        let (first, rest) = (Bytes::from(events[..cut].to_string()), Bytes::from(events[cut..].to_string()));
        let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(2);
        let gate = up.gate.clone();
        tokio::spawn(async move {
            let _ = tx.send_data(first).await;
            gate.acquire().await.unwrap().forget();
            let _ = tx.send_data(rest).await;
        });
        return sse_response(body);
    }
    if let Some(code) = behaviour.strip_prefix("anthropic-status-") {
        let status = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        let kind = sideyard::providers::anthropic::error_type(status.as_u16());
        let mut response = json(
            status,
            serde_json::json!({"type": "error", "error": {"type": kind, "message": format!("anthropic says {code}")}}),
        );
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, "7".parse().unwrap());
        }
        return response;
    }
    if let Some(code) = behaviour.strip_prefix("status-") {
        let status = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        let mut response = json(
            status,
            serde_json::json!({"error": {"message": format!("upstream says {code}"), "type": "test", "code": null}}),
        );
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, "7".parse().unwrap());
        }
        return response;
    }
    if behaviour == "provider-api" {
        let tail = path.trim_start_matches("/provider-api");
        return match (parts.method.as_str(), tail) {
            ("POST", "/v1/files") => json(
                StatusCode::OK,
                serde_json::json!({"id": "file-abc", "object": "file", "bytes": body.len(), "created_at": 1, "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}),
            ),
            ("POST", "/v1/audio/transcriptions") => {
                use sideyard::providers::multipart::{ModelField, boundary, model_field};
                let content_type = parts.headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap()).unwrap_or("");
                let model = match boundary(content_type).map(|b| model_field(&body, b)) {
                    Some(ModelField::Found(span)) => String::from_utf8_lossy(&body[span]).into_owned(),
                    _ => "no model".into(),
                };
                json(StatusCode::OK, serde_json::json!({"text": format!("{model} heard {} bytes", body.len())}))
            }
            (method, tail) => json(
                StatusCode::OK,
                serde_json::json!({"object": "echo", "method": method, "path": tail, "query": parts.uri.query(), "model": model}),
            ),
        };
    }
    match behaviour.as_str() {
        "ok" => ok(model),
        "switch" if up.down.load(Ordering::Relaxed) => {
            json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"error": {"message": "down for maintenance"}}))
        }
        "switch" => ok(model),
        "gated-503" => {
            up.gate.acquire().await.unwrap().forget();
            json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"error": {"message": "overloaded"}}))
        }
        "context-400" => json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": {"message": "This model's maximum context length is 16 tokens.", "code": "context_length_exceeded"}}),
        ),
        "sse-break-early" => {
            let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(2);
            tokio::spawn(async move {
                let role = "data: {\"id\":\"e\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
                let _ = tx.send_data(Bytes::from_static(role.as_bytes())).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.abort(std::io::Error::other("scripted reset"));
            });
            sse_response(body)
        }
        "sse-slow-token" => {
            let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
            let cancelled = up.cancelled.clone();
            tokio::spawn(async move {
                let role = "data: {\"id\":\"s\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
                let _ = tx.send_data(Bytes::from_static(role.as_bytes())).await;
                // Poll the connection while "thinking", to notice a caller that hangs up.
                for _ in 0..300 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if tx.send_data(Bytes::from_static(b": thinking\n\n")).await.is_err() {
                        cancelled.lock().unwrap().push("sse-slow-token".into());
                        return;
                    }
                }
                let _ = tx.send_data(Bytes::from(sse_chunk("late"))).await;
                let _ = tx.send_data(Bytes::from_static(b"data: [DONE]\n\n")).await;
            });
            sse_response(body)
        }
        "hang" => std::future::pending().await,
        "stall-json" => {
            let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"{\"id\":")).await;
                std::future::pending::<()>().await;
                drop(tx);
            });
            ([(header::CONTENT_TYPE, "application/json")], Body::new(body)).into_response()
        }
        "garbage" => {
            ([(header::CONTENT_TYPE, "application/json")], "<html>502 from a load balancer</html>").into_response()
        }
        "reset-json" => {
            let (tx, body) = Channel::<Bytes, std::io::Error>::new(1);
            tx.abort(std::io::Error::other("scripted reset"));
            ([(header::CONTENT_TYPE, "application/json")], Body::new(body)).into_response()
        }
        "sse-ok" | "sse-break" | "sse-stall" => {
            let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(4);
            tokio::spawn(async move {
                for word in ["one", "two"] {
                    let _ = tx.send_data(Bytes::from(sse_chunk(word))).await;
                }
                match behaviour.as_str() {
                    "sse-ok" => {
                        let _ = tx.send_data(Bytes::from(sse_chunk("three"))).await;
                        let _ = tx.send_data(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    }
                    // Half an event, then the connection breaks.
                    "sse-break" => {
                        let _ = tx.send_data(Bytes::from_static(b"data: {\"id\":\"s\",\"choi")).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        tx.abort(std::io::Error::other("scripted reset"));
                    }
                    _ => {
                        std::future::pending::<()>().await;
                        drop(tx);
                    }
                }
            });
            sse_response(body)
        }
        "sse-gated" => {
            let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
            let gate = up.gate.clone();
            tokio::spawn(async move {
                let all: String = GATED_EVENTS.concat();
                for (i, w) in gated_cuts().windows(2).enumerate() {
                    if i > 0 {
                        gate.acquire().await.unwrap().forget();
                    }
                    if tx.send_data(Bytes::copy_from_slice(&all.as_bytes()[w[0]..w[1]])).await.is_err() {
                        return;
                    }
                }
            });
            sse_response(body)
        }
        "echo-key" => {
            let key =
                parts.headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": {"message": format!("bad request with {key}")}}),
            )
        }
        _ => {
            json(StatusCode::NOT_FOUND, serde_json::json!({"error": {"message": format!("no behaviour {behaviour}")}}))
        }
    }
}

/// A port with nothing listening on it.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A TCP server that accepts connections and never says anything: a TLS handshake against it never
/// completes, which is how a connect timeout is produced on loopback.
pub async fn silent_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

/// A TCP server that closes every connection as soon as it is accepted.
pub async fn closing_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    addr
}

/// Parses the SSE `data:` payloads of a stream.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|line| line.trim_end_matches('\r').strip_prefix("data: ").map(String::from))
        .collect()
}

/// A map of metric name -> value, for debugging output in assertions.
pub fn counters(exposition: &str) -> HashMap<String, String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Reads one request (head and Content-Length body) from `tcp`: its head, or None at the end.
pub async fn read_request(tcp: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(head)
}
