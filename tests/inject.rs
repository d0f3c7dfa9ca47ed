//! Sidecar injection: AdmissionReviews through the webhook router, the returned JSON Patch applied
//! and compared with golden injected pods (tests/testdata/inject, Istio's testdata style), and
//! `sideyard inject` on manifests, its output checked by `kubernetes-validate --strict`.
//!
//! `SIDEYARD_REFRESH_GOLDEN=1 cargo test --test inject` rewrites the golden files; review the diff.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sideyard::operator::inject::InjectParams;
use sideyard::operator::metrics::OperatorMetrics;
use sideyard::operator::webhook::{Webhook, router};
use tower::ServiceExt;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/inject");
const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

fn review(pod: &Value) -> Value {
    let gvk = json!({"group": "", "version": "v1", "kind": "Pod"});
    let gvr = json!({"group": "", "version": "v1", "resource": "pods"});
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
            "namespace": "team-a",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

fn webhook() -> (axum::Router, Arc<OperatorMetrics>) {
    let metrics = Arc::new(OperatorMetrics::default());
    let params = InjectParams { image: "ghcr.io/sideyard/sideyard:test".into(), ..InjectParams::default() };
    (router(Arc::new(Webhook { params, metrics: metrics.clone() })), metrics)
}

/// Posts `body` to /mutate-pods: (HTTP status, the AdmissionReview answered).
async fn post(app: &axum::Router, body: Vec<u8>) -> (u16, Value) {
    let request = http::Request::post("/mutate-pods").header("content-type", "application/json").body(Body::from(body));
    let response = app.clone().oneshot(request.unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())))
}

/// The webhook's answer for `pod`, and the pod with its patch applied.
async fn admit(app: &axum::Router, pod: &Value) -> (Value, Value) {
    let (status, answer) = post(app, serde_json::to_vec(&review(pod)).unwrap()).await;
    assert_eq!(status, 200);
    let response = answer["response"].clone();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], UID, "the response answers this request");
    let mut patched = pod.clone();
    if let Some(patch) = response.get("patch").filter(|p| !p.is_null()) {
        assert_eq!(response["patchType"], "JSONPatch");
        // kube writes the bytes as a JSON array of numbers, which the API server's Go decoder
        // reads into []byte as it reads base64.
        let patch: Vec<u8> = match patch {
            Value::String(text) => common::base64_decode(text),
            bytes => serde_json::from_value(bytes.clone()).unwrap(),
        };
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap();
    }
    (response, patched)
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares with the golden file, or rewrites it when asked to.
fn golden(path: &Path, actual: &Value) {
    if std::env::var_os("SIDEYARD_REFRESH_GOLDEN").is_some() {
        std::fs::write(path, serde_yaml::to_string(actual).unwrap()).unwrap();
        return;
    }
    let expected = yaml_file(path);
    assert!(
        expected == *actual,
        "{} differs; got:\n{}\n(SIDEYARD_REFRESH_GOLDEN=1 rewrites it)",
        path.display(),
        serde_yaml::to_string(actual).unwrap()
    );
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(TESTDATA)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.to_string_lossy().ends_with(".golden.yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 7, "the fixtures are missing: {cases:?}");
    cases
}

#[tokio::test]
async fn each_fixture_pod_is_injected_as_its_golden_file_says() {
    let (app, metrics) = webhook();
    for case in cases() {
        let pod = yaml_file(&case);
        let (response, patched) = admit(&app, &pod).await;
        assert_eq!(response["allowed"], true, "{}: {response}", case.display());
        golden(&case.with_extension("golden.yaml"), &patched);

        // Reinvocation (reinvocationPolicy: IfNeeded) sees the injected pod and changes nothing.
        let (again, _) = admit(&app, &patched).await;
        assert_eq!(again["allowed"], true);
        assert!(again.get("patch").is_none_or(Value::is_null), "{}: a second pass patched: {again}", case.display());
    }
    let metrics = metrics.render();
    assert!(metrics.contains("sideyard_webhook_pods_total{result=\"injected\"} 5"), "{metrics}");
    assert!(metrics.contains("sideyard_webhook_pods_total{result=\"skipped\"} 11"), "{metrics}");
}

#[tokio::test]
async fn the_injected_pod_is_locked_down_and_starts_the_app_after_the_proxy() {
    let (app, _) = webhook();
    let (_, pod) = admit(&app, &yaml_file(&Path::new(TESTDATA).join("basic.yaml"))).await;
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "sideyard");
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert!(sidecar["resources"]["limits"].get("cpu").is_none(), "no CPU limit by default");
    let args: Vec<&str> = sidecar["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(&args[..3], ["sidecar", "--file", "/etc/sideyard/config"]);
    assert!(args.windows(2).any(|w| w == ["--listen", "127.0.0.1:7700"]));
    assert!(args.windows(2).any(|w| w == ["--admin-listen", "0.0.0.0:7701"]));
    assert!(args.windows(2).any(|w| w == ["--pod-labels-file", "/etc/sideyard/pod/labels"]));
    let app_env = &pod["spec"]["containers"][0]["env"];
    assert_eq!(app_env[0], json!({"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:7700/v1"}));
    assert_eq!(pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"], "app");
}

#[tokio::test]
async fn an_unusable_annotation_refuses_the_pod_with_the_reason() {
    let (app, metrics) = webhook();
    let mut pod = yaml_file(&Path::new(TESTDATA).join("basic.yaml"));
    pod["metadata"]["annotations"] = json!({"sideyard.dev/proxy-memory-limit": "lots"});
    let (response, patched) = admit(&app, &pod).await;
    assert_eq!(response["allowed"], false);
    assert_eq!(
        response["status"]["message"],
        "annotation sideyard.dev/proxy-memory-limit: \"lots\" is not a quantity such as 100m or 128Mi"
    );
    assert_eq!(patched, pod);
    assert!(metrics.render().contains("sideyard_webhook_pods_total{result=\"refused\"} 1"));

    for (annotation, value, reason) in [
        ("sideyard.dev/generations", "lots", "a number of records from 0 to 100000"),
        ("sideyard.dev/generations", "100001", "a number of records from 0 to 100000"),
        ("sideyard.dev/access-log", "yes", "true or false"),
        ("sideyard.dev/otlp-endpoint", "collector:4318", "an http:// or https:// URL of an OTLP/HTTP collector"),
        ("sideyard.dev/trace-sampling-ratio", "2", "a ratio from 0 to 1, such as 0.1"),
    ] {
        pod["metadata"]["annotations"] = json!({ annotation: value });
        let (response, _) = admit(&app, &pod).await;
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["message"], format!("annotation {annotation}: {value:?} is not {reason}"));
    }
}

#[tokio::test]
async fn a_pod_whose_names_or_ports_clash_with_the_sidecar_is_refused_naming_the_clash() {
    let (app, metrics) = webhook();
    let basic = yaml_file(&Path::new(TESTDATA).join("basic.yaml"));
    let cases = [
        (
            "/spec/volumes",
            json!([{"name": "sideyard-config", "emptyDir": {}}]),
            "volume \"sideyard-config\" is named like one the Sideyard sidecar adds",
        ),
        (
            "/spec/containers/0/ports",
            json!([{"containerPort": 7700}]),
            "container \"app\" declares port 7700, which the Sideyard sidecar listens on",
        ),
        (
            "/spec/initContainers",
            json!([{"name": "setup", "image": "busybox", "ports": [{"containerPort": 7701}]}]),
            "container \"setup\" declares port 7701",
        ),
        (
            "/spec/containers/0/name",
            json!("sideyard"),
            "container \"sideyard\" is named like the sidecar Sideyard injects",
        ),
    ];
    for (pointer, value, says) in cases {
        let mut pod = basic.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        match pod.pointer_mut(parent).unwrap() {
            Value::Array(list) => list[key.parse::<usize>().unwrap()] = value,
            parent => parent[key] = value,
        }
        let (response, patched) = admit(&app, &pod).await;
        assert_eq!(response["allowed"], false, "{pointer}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{pointer}: {message}");
        assert!(message.contains("sideyard.dev/inject=false"), "says the way out: {message}");
        assert_eq!(patched, pod);
    }
    assert!(metrics.render().contains("sideyard_webhook_pods_total{result=\"refused\"} 4"));
}

#[tokio::test]
async fn garbage_is_a_bad_request_not_a_crash() {
    let (app, _) = webhook();
    let (status, body) = post(&app, b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body.as_str().unwrap().starts_with("not an AdmissionReview"), "{body}");
    // A review without a request is answered as invalid, still as a review.
    let (status, body) = post(
        &app,
        serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["response"]["allowed"], false, "{body}");
}

// ---------------------------------------------------------------------------------------------
// sideyard inject

#[test]
fn inject_rewrites_the_pod_templates_of_workloads_and_passes_the_rest_through() {
    let input = Path::new(TESTDATA).join("workloads.manifest");
    let (code, stdout, stderr) =
        common::run(&["inject", "-f", input.to_str().unwrap(), "--proxy-image", "ghcr.io/sideyard/sideyard:test"]);
    assert_eq!(code, Some(0), "{stderr}");
    let docs: Vec<Value> =
        serde_yaml::Deserializer::from_str(&stdout).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    golden(&Path::new(TESTDATA).join("workloads.golden.manifest"), &Value::Array(docs.clone()));
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Deployment", "CronJob", "ConfigMap"]);
    assert_eq!(docs[0]["spec"]["template"]["spec"]["initContainers"][0]["name"], "sideyard");
    assert_eq!(docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][0]["name"], "sideyard");
    assert_eq!(docs[2], yaml_docs(&input)[2], "other kinds pass through unchanged");
    assert_eq!(
        docs[0]["spec"]["template"]["spec"]["containers"][0]["x-future-field"], "kept",
        "fields this version does not know are kept"
    );

    // Injecting twice is injecting once.
    let out = common::temp_dir("inject").join("injected.yaml");
    std::fs::write(&out, &stdout).unwrap();
    let (code, again, _) =
        common::run(&["inject", "-f", out.to_str().unwrap(), "--proxy-image", "ghcr.io/sideyard/sideyard:test"]);
    assert_eq!(code, Some(0));
    assert_eq!(again, stdout);

    // What the user applies is valid Kubernetes, once the made-up field is dropped.
    let mut docs = docs;
    docs[0]["spec"]["template"]["spec"]["containers"][0].as_object_mut().unwrap().remove("x-future-field");
    let clean = common::temp_dir("inject").join("clean.yaml");
    let text: String = docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap())).collect();
    std::fs::write(&clean, text).unwrap();
    common::assert_valid_manifests(&clean);
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

#[test]
fn inject_reports_bad_input_and_bad_flags() {
    let dir = common::temp_dir("inject-bad");
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "kind: Pod\nspec: [\n").unwrap();
    let (code, _, stderr) = common::run(&["inject", "-f", broken.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("broken.yaml: document 1: invalid YAML"), "{stderr}");

    let (code, _, stderr) = common::run(&["inject", "-f", broken.to_str().unwrap(), "--proxy-memory-limit", "lots"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--proxy-memory-limit: \"lots\" is not a quantity"), "{stderr}");

    let (code, _, stderr) = common::run(&["inject", "-f", dir.join("missing.yaml").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot read"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// The webhook's TLS

use std::time::{Duration, SystemTime};

use sideyard::operator::tls::{CertStore, ServingCert, certified_key, dns_names, due, issue, serve_https};

const SERVER_NAME: &str = "sideyard-webhook.ops.svc";

/// The webhook router served over TLS on 127.0.0.1 with `cert`.
async fn https_webhook(cert: &ServingCert) -> (std::net::SocketAddr, Arc<CertStore>) {
    let store = Arc::new(CertStore::default());
    store.set(certified_key(&cert.cert, &cert.key).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, _) = webhook();
    tokio::spawn(serve_https(listener, app, store.clone(), std::future::pending()));
    (addr, store)
}

#[tokio::test]
async fn the_webhook_serves_tls_that_its_ca_bundle_verifies_and_renews_in_place() {
    let names = dns_names("sideyard-webhook", "ops");
    let first = issue(&names, None, SystemTime::now()).unwrap();
    let (addr, store) = https_webhook(&first).await;
    let pod = yaml_file(&Path::new(TESTDATA).join("basic.yaml"));
    let body = serde_json::to_vec(&review(&pod)).unwrap();

    for name in &names {
        let (status, answer, _) =
            common::https_post(addr, &first.ca_cert, name, "/mutate-pods", body.clone()).await.unwrap();
        assert_eq!(status, 200, "{name}");
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"]["patch"].is_array(), "{answer}");
    }
    let error =
        common::https_post(addr, &first.ca_cert, "elsewhere.example", "/mutate-pods", body.clone()).await.unwrap_err();
    assert!(error.contains("TLS"), "a name the certificate is not for is refused: {error}");
    let stranger = issue(&names, None, SystemTime::now()).unwrap();
    let error =
        common::https_post(addr, &stranger.ca_cert, SERVER_NAME, "/mutate-pods", body.clone()).await.unwrap_err();
    assert!(error.contains("TLS"), "another CA does not verify it: {error}");

    // Renewal keeps the CA, so the caBundle the API server holds still verifies the new
    // certificate, which new connections get without a restart.
    let renewed = issue(&names, Some(&first), SystemTime::now()).unwrap();
    assert_eq!(renewed.ca_cert, first.ca_cert);
    assert_ne!(renewed.cert, first.cert);
    store.set(certified_key(&renewed.cert, &renewed.key).unwrap());
    let (status, _, presented) =
        common::https_post(addr, &first.ca_cert, SERVER_NAME, "/mutate-pods", body).await.unwrap();
    assert_eq!(status, 200);
    let renewed_der = rustls_pemfile_der(&renewed.cert);
    assert_eq!(presented, renewed_der, "the renewed certificate is served");
}

fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

#[test]
fn certificates_are_renewed_when_missing_renamed_or_near_expiry() {
    let names = dns_names("sideyard-webhook", "ops");
    let now = SystemTime::now();
    let cert = issue(&names, None, now).unwrap();
    assert!(due(None, &names, now));
    assert!(!due(Some(&cert), &names, now));
    assert!(!due(Some(&cert), &names, now + Duration::from_secs(300 * 24 * 3600)));
    assert!(due(Some(&cert), &names, now + Duration::from_secs(340 * 24 * 3600)), "in its last 30 days");
    assert!(due(Some(&cert), &dns_names("renamed", "ops"), now));
    // What the Secret holds reads back as the same certificate.
    let secret = cert.to_secret("sideyard-webhook-tls", "ops");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(ServingCert::from_secret(&secret), Some(cert));
}
