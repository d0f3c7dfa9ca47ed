//! The sidecar as the operator runs it: the compiled configuration from a mounted Secret, kept
//! current as the kubelet swaps the Secret's files, and filtered by the pod's labels.

mod common;

use std::path::Path;

use common::*;
use sha2::{Digest, Sha256};
use sideyard::config::{CompiledConfig, Config, Documents, MapResolver, compile, parse_file};

/// `routes` compiled by the library, as the operator would publish them at `version`.
fn compiled(routes: &str, version: u64) -> String {
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    parse_file("routes.yaml", routes, &mut docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let config = compile(&docs, &MapResolver::default()).expect("valid routes");
    serde_json::to_string(&CompiledConfig::new("default", version, config)).unwrap()
}

/// Publishes `config.json` the way the kubelet updates a Secret volume: the files live in a
/// timestamped directory, `..data` points at it and is swapped atomically, and `config.json` is a
/// link through `..data`.
fn publish(dir: &Path, generation: usize, content: &str) {
    let real = dir.join(format!("..2026_11_25_{generation}"));
    std::fs::create_dir_all(&real).unwrap();
    std::fs::write(real.join("config.json"), content).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(real.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("config.json");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/config.json", &link).unwrap();
    }
}

async fn models(api: std::net::SocketAddr) -> Vec<String> {
    let reply = get(api, "/v1/models").await;
    let mut ids: Vec<String> =
        reply.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

async fn version(admin: std::net::SocketAddr) -> u64 {
    metric(&get(admin, "/metrics").await.body, "sideyard_config_version")
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_the_compiled_secret_for_its_own_pod_and_follows_its_updates() {
    let dir = temp_dir("mounted");
    let secret_dir = dir.join("config");
    std::fs::create_dir_all(&secret_dir).unwrap();
    let bots = route_yaml("bots", "workloadSelector: {matchLabels: {app: bot}}", &["{name: m, api: mock}"]);
    let everyone = route_yaml("everyone", "", &["{name: m, api: mock}"]);
    publish(&secret_dir, 1, &compiled(&format!("{bots}{everyone}"), 3));
    let labels = dir.join("labels");
    std::fs::write(&labels, "app=\"web\"\npod-template-hash=\"5d4f\"\n").unwrap();

    let state = dir.join("state");
    let args = [
        "sidecar",
        "-f",
        secret_dir.to_str().unwrap(),
        "--pod-labels-file",
        labels.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--reload-interval",
        "100ms",
    ];
    let (process, line) = Process::start(&args, &[], "serving");
    let (api, admin) = (addr_after(&line, "api="), addr_after(&line, "admin="));
    assert_eq!(models(api).await, ["everyone"], "the bots route selects other pods");
    assert_eq!(version(admin).await, 3);
    let reply = post(api, "/v1/chat/completions", r#"{"model":"bots"}"#).await;
    assert_eq!(reply.status, 404);

    // The pod is relabelled: the downward API rewrites the file, and the route now applies.
    std::fs::write(&labels, "app=\"bot\"\n").unwrap();
    eventually("the relabelled pod gets the bots route", || async { models(api).await == ["bots", "everyone"] }).await;
    assert_eq!(post(api, "/v1/chat/completions", r#"{"model":"bots"}"#).await.status, 200);

    // The operator publishes version 4.
    let third = route_yaml("third", "", &["{name: m, api: mock}"]);
    publish(&secret_dir, 2, &compiled(&format!("{everyone}{third}"), 4));
    eventually("version 4 is served", || async { version(admin).await == 4 }).await;
    assert_eq!(models(api).await, ["everyone", "third"]);
    let reply = post(api, "/v1/chat/completions", r#"{"model":"third"}"#).await;
    assert_eq!(reply.header("x-sideyard-config-version"), "4", "answers say which version served them");

    // Content that does not match its hash is refused, and version 4 keeps serving.
    let tampered = compiled(&third, 5).replace("\"model\":\"third\"", "\"model\":\"stolen\"");
    publish(&secret_dir, 3, &tampered);
    eventually("the tampered config is rejected", || async {
        metric(&get(admin, "/metrics").await.body, r#"sideyard_config_reloads_total{result="failure"}"#) == 1
    })
    .await;
    assert_eq!(version(admin).await, 4);
    assert_eq!(models(api).await, ["everyone", "third"]);
    assert!(process.log().contains("does not match its hash"), "{}", process.log());
}

#[test]
fn a_compiled_config_cannot_be_mixed_with_routes() {
    let dir = temp_dir("mixed");
    let route = route_yaml("chat", "", &["{name: m, api: mock}"]);
    std::fs::write(dir.join("a.json"), compiled(&route, 1)).unwrap();
    std::fs::write(dir.join("b.yaml"), &route).unwrap();
    let (code, _, stderr) = run(&["sidecar", "-f", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("a.json: document 1: a CompiledConfig cannot be loaded together with ProviderRoute"),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_labels_file_is_a_configuration_error() {
    let dir = temp_dir("labels");
    let routes = dir.join("routes.yaml");
    std::fs::write(&routes, route_yaml("chat", "", &["{name: m, api: mock}"])).unwrap();
    std::fs::write(dir.join("labels"), "app=bot\n").unwrap();
    let (code, _, stderr) = run(&[
        "sidecar",
        "-f",
        routes.to_str().unwrap(),
        "--pod-labels-file",
        dir.join("labels").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("--pod-labels-file: "), "{stderr}");
    assert!(stderr.contains("line 1: the value is not a quoted string"), "{stderr}");
}

// The serialised form of a compiled configuration: what the operator writes and sidecars read.

const COMPILED_ROUTES: &str = r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: chat, namespace: team-a}
spec:
  model: chat
  aliases: [gpt-4o]
  workloadSelector: {matchLabels: {app: bot}}
  strategy: latency
  holdBack: 1500ms
  hedge: {after: 800ms}
  targets:
    - name: primary
      api: openai
      baseUrl: https://api.example.com/v1/
      model: gpt-4o
      credentials: {secretRef: {name: keys, key: openai}}
      headers: {x-team: a}
      pricing: {prompt: "2.50", completion: "10", cachedPrompt: "1.25", request: "0.001"}
      contextWindow: 128000
      timeouts: {connect: 2s, firstByte: 20s, total: 10m}
    - name: fake
      api: mock
      baseUrl: mock://?chunks=3
  fallback: {when: [connect, "5xx", 4xx-context-length], maxAttempts: 2}
---
apiVersion: sideyard.dev/v1alpha1
kind: ApiKeyBudget
metadata: {name: bot, namespace: team-a}
spec:
  key: {secretRef: {name: keys, key: app}}
  limit: "100"
  period: weekly
  lowBalanceThreshold: "5"
  onLedgerUnavailable: failOpen
  allowedModels: [chat]
  rateLimit: {requestsPerMinute: 60}
  workloadSelector: {matchExpressions: [{key: app, operator: In, values: [bot]}]}
---
apiVersion: v1
kind: Secret
metadata: {name: keys, namespace: team-a}
stringData: {openai: sk-upstream, app: sk-app}
"#;

fn compiled_example() -> Config {
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    parse_file("routes.yaml", COMPILED_ROUTES, &mut docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    compile(&docs, &MapResolver::default()).unwrap()
}

#[test]
fn a_compiled_config_reads_back_as_the_same_config() {
    let config = compiled_example();
    let compiled = CompiledConfig::new("team-a", 7, config.clone());
    let json = serde_json::to_string(&compiled).unwrap();
    let back: CompiledConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.version, 7);
    assert_eq!(back.into_config().unwrap(), config);
}

#[test]
fn the_serialised_form_keeps_the_api_spelling() {
    let json = serde_json::to_value(CompiledConfig::new("team-a", 1, compiled_example())).unwrap();
    let route = &json["config"]["routes"][0];
    assert_eq!(route["holdBack"], "1500ms");
    assert_eq!(route["hedgeAfter"], "800ms");
    assert_eq!(route["fallback"]["when"], serde_json::json!(["connect", "5xx", "4xx-context-length"]));
    assert_eq!(route["workloadSelector"]["matchLabels"]["app"], "bot");
    let target = &route["targets"][0];
    assert_eq!(target["api"], "openai");
    assert_eq!(target["baseUrl"], "https://api.example.com/v1");
    assert_eq!(target["credential"], "sk-upstream");
    assert_eq!(target["pricing"]["prompt"], 2_500_000);
    assert_eq!(target["timeouts"]["total"], "10m");
    assert_eq!(route["targets"][1]["baseUrl"], "mock://?chunks=3");
    let budget = &json["config"]["budgets"][0];
    let app_key_hash: String = Sha256::digest(b"sk-app").iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(budget["keyHash"], app_key_hash);
    assert_eq!(budget["limit"], 100_000_000);
}

#[test]
fn tampered_or_invalid_content_is_refused_with_a_reason() {
    let compiled = CompiledConfig::new("team-a", 1, compiled_example());
    let mut json = serde_json::to_value(&compiled).unwrap();
    json["config"]["routes"][0]["model"] = "other".into();
    let changed: CompiledConfig = serde_json::from_value(json.clone()).unwrap();
    assert!(changed.into_config().unwrap_err().contains("does not match its hash"));

    json["config"]["routes"][0]["holdBack"] = "soon".into();
    let err = serde_json::from_value::<CompiledConfig>(json.clone()).unwrap_err().to_string();
    assert!(err.contains("soon"), "{err}");
    json["config"]["routes"][0]["holdBack"] = "1s".into();
    json["config"]["routes"][0]["targets"][0]["baseUrl"] = "ftp://x".into();
    let err = serde_json::from_value::<CompiledConfig>(json.clone()).unwrap_err().to_string();
    assert!(err.contains("must be an http:// or https:// URL"), "{err}");
    json["config"]["routes"][0]["targets"][0]["baseUrl"] = "https://x".into();
    json["config"]["routes"][0]["targets"][0]["credential"] = "a\nb".into();
    let err = serde_json::from_value::<CompiledConfig>(json).unwrap_err().to_string();
    assert!(err.contains("not allowed in an HTTP header"), "{err}");
}
