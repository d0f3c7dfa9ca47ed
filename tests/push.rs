//! The operator's configuration stream, in process: what each sidecar's token gets, frame by
//! frame, with scripted token checks and pods in place of the API server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures::future::BoxFuture;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use sideyard::config::{CompiledConfig, MapResolver, compile_texts};
use sideyard::operator::leader::{LeaderSwitch, Leadership};
use sideyard::operator::ledger::{BoundPod, FleetService, LEADER_HEADER, Review, Reviewer, StatusStore};
use sideyard::operator::metrics::OperatorMetrics;
use sideyard::operator::plan::ConnectedPod;
use sideyard::operator::plan::Published;
use sideyard::operator::push::{ConfigHub, ConfigPush, PodMeta, Pods, router};
use tokio::sync::watch;
use tower::ServiceExt;

/// `ns:pod` is a token bound to `pod` of `ns`; `ns:` a token of `ns` bound to no pod.
struct Tokens;

impl Reviewer for Tokens {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, String>> {
        Box::pin(async move {
            let (ns, pod) = token.split_once(':').ok_or("not a test token")?;
            let pod = (!pod.is_empty()).then(|| BoundPod { name: pod.into(), uid: Some(format!("uid-{pod}")) });
            Ok(Review::Authenticated { username: format!("system:serviceaccount:{ns}:default"), pod })
        })
    }
}

/// Pods by (namespace, name): `web` and `billing` in team-a, `other` in team-b; `stale` has
/// another uid than its token says (re-created under the same name).
struct Cluster;

impl Pods for Cluster {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<Option<PodMeta>, String>> {
        let pods: HashMap<(&str, &str), (&str, &str)> = [
            (("team-a", "web"), ("uid-web", "web")),
            (("team-a", "billing"), ("uid-billing", "billing")),
            (("team-a", "stale"), ("uid-new", "web")),
            (("team-b", "other"), ("uid-other", "web")),
        ]
        .into();
        let pod = pods.get(&(namespace, name)).map(|(uid, app)| PodMeta {
            uid: Some(uid.to_string()),
            labels: [("app".to_string(), app.to_string())].into(),
        });
        Box::pin(async move { Ok(pod) })
    }
}

struct NoStatuses;

impl StatusStore for NoStatuses {
    fn load<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<sideyard::api::ApiKeyBudgetStatus>, String>> {
        Box::pin(async { Ok(None) })
    }
    fn save<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: sideyard::api::ApiKeyBudgetStatus,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn tell<'a>(&'a self, _: &'a str, _: &'a str, _: &'a str, _: String) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Two routes of team-a: `chat` for every pod, `invoices` for `app: billing` pods only, each with
/// its own credential.
fn team_a(version: u64, chat_model: &str) -> Published {
    let yaml = format!(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: chat, namespace: team-a}}
spec:
  model: chat
  targets:
    - {{name: openai, api: openai, baseUrl: "https://api.openai.com/v1", model: {chat_model}, credentials: {{secretRef: {{name: keys, key: chat}}}}}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: invoices, namespace: team-a}}
spec:
  model: invoices
  workloadSelector: {{matchLabels: {{app: billing}}}}
  targets:
    - {{name: openai, api: openai, baseUrl: "https://api.openai.com/v1", model: gpt-4o, credentials: {{secretRef: {{name: keys, key: invoices}}}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: keys, namespace: team-a}}
stringData: {{chat: sk-chat-credential, invoices: sk-invoices-credential}}
"#
    );
    let (config, _) = compile_texts(&[("team-a.yaml".into(), yaml)], &MapResolver::default()).expect("a valid config");
    let content = serde_json::to_vec(&CompiledConfig::new("team-a", version, config)).unwrap();
    Published { version, content, ours: true, ..Published::default() }
}

struct Push {
    push: Arc<ConfigPush>,
    switch: LeaderSwitch,
    metrics: Arc<OperatorMetrics>,
}

fn push() -> Push {
    let metrics = Arc::new(OperatorMetrics::default());
    let (leadership, switch) = Leadership::switched(true);
    let (_, leader_url) = watch::channel(Some("https://10.0.0.7:8444".to_string()));
    let ledger = FleetService::new(
        "leader".into(),
        leadership.clone(),
        Arc::new(Tokens),
        Arc::new(NoStatuses),
        metrics.clone(),
        leader_url,
    );
    let push = Arc::new(ConfigPush {
        hub: Arc::new(ConfigHub::default()),
        connections: Arc::default(),
        outages: Arc::default(),
        pods: Arc::new(Cluster),
        ledger,
        leadership,
        metrics: metrics.clone(),
    });
    Push { push, switch, metrics }
}

/// Bounds every wait: a regression fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

impl Push {
    async fn open(&self, token: &str) -> http::Response<Body> {
        let request = Request::get("/config/v1/stream").header("authorization", format!("Bearer {token}"));
        router(self.push.clone()).oneshot(request.body(Body::empty()).unwrap()).await.unwrap()
    }

    /// A sidecar's report: its status.
    async fn report(&self, path: &str, token: &str, body: &str) -> StatusCode {
        let request = Request::post(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        router(self.push.clone()).oneshot(request).await.unwrap().status()
    }

    fn publish(&self, published: &Published) {
        self.push.hub.publish("team-a", published);
    }
}

/// The next frame of a stream as JSON, and its text; `None` when the stream ends.
async fn next_frame(body: &mut Body, pending: &mut Vec<u8>) -> Option<(Value, String)> {
    loop {
        if let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8(line).unwrap();
            return Some((serde_json::from_str(&text).unwrap(), text));
        }
        let frame = tokio::time::timeout(PATIENCE, body.frame()).await.expect("a frame or the end in time");
        match frame {
            Some(Ok(frame)) => pending.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            _ => return None,
        }
    }
}

fn models(frame: &Value) -> Vec<&str> {
    frame["config"]["routes"].as_array().unwrap().iter().map(|r| r["model"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_pod_gets_the_current_version_then_each_newer_one_with_only_what_selects_it() {
    let p = push();
    p.publish(&team_a(3, "gpt-4o-mini"));
    let response = p.open("team-a:web").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.into_body();
    let mut pending = Vec::new();
    let (frame, text) = next_frame(&mut body, &mut pending).await.unwrap();
    assert_eq!((frame["kind"].as_str(), frame["version"].as_u64()), (Some("CompiledConfig"), Some(3)));
    assert_eq!(models(&frame), ["chat"], "the billing route does not select a web pod");
    assert!(text.contains("sk-chat-credential"));
    assert!(!text.contains("sk-invoices-credential"), "no credential of a route that does not select the pod");
    // The frame is a valid CompiledConfig: its hash is of the selected content.
    let compiled = CompiledConfig::from_frame(text.trim_end().as_bytes()).unwrap();
    assert_eq!(compiled.into_config().unwrap().routes.len(), 1);

    p.publish(&team_a(2, "older"));
    p.publish(&team_a(5, "gpt-4.1"));
    let (frame, _) = next_frame(&mut body, &mut pending).await.unwrap();
    assert_eq!(frame["version"], 5, "the newer version, never the older one published after it");
    assert!(frame.to_string().contains("gpt-4.1"));
    assert_eq!(p.metrics.config_streams.get(), 1);

    let billing = p.open("team-a:billing").await;
    let (frame, text) = next_frame(&mut billing.into_body(), &mut Vec::new()).await.unwrap();
    assert_eq!(models(&frame), ["chat", "invoices"]);
    assert!(text.contains("sk-invoices-credential"));
    let metrics = p.metrics.render();
    assert!(metrics.contains("sideyard_operator_config_stream_requests_total{result=\"opened\"} 2"), "{metrics}");
    assert!(metrics.contains("sideyard_operator_config_frames_total 3"), "{metrics}");
}

#[tokio::test]
async fn a_stream_waits_for_the_first_version_and_ends_when_the_replica_stops_leading() {
    let p = push();
    let mut body = p.open("team-a:web").await.into_body();
    let mut pending = Vec::new();
    // Nothing published yet: the stream stays open, then carries the first version.
    let waiting = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
    assert!(waiting.is_err(), "no frame before a version is published");
    p.publish(&team_a(1, "gpt-4o-mini"));
    assert_eq!(next_frame(&mut body, &mut pending).await.unwrap().0["version"], 1);
    p.switch.set(false);
    assert!(next_frame(&mut body, &mut pending).await.is_none(), "the stream ends so the sidecar finds the new leader");
    drop(body);
    // The stream's count goes when the stream does.
    tokio::time::timeout(PATIENCE, async {
        while p.metrics.config_streams.get() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the stream is counted as gone");
    let refused = p.open("team-a:web").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[LEADER_HEADER], "https://10.0.0.7:8444", "a follower names the leader");
}

#[tokio::test]
async fn tokens_without_a_pod_of_their_own_get_nothing_and_another_namespace_gets_its_own() {
    let p = push();
    p.publish(&team_a(1, "gpt-4o-mini"));
    for (token, status, says) in [
        ("team-a:", StatusCode::FORBIDDEN, "bound to no pod"),
        ("team-a:gone", StatusCode::FORBIDDEN, "does not exist"),
        ("team-a:stale", StatusCode::FORBIDDEN, "does not exist"),
        ("nonsense", StatusCode::SERVICE_UNAVAILABLE, "cannot check the token"),
    ] {
        let response = p.open(token).await;
        assert_eq!(response.status(), status, "{token}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(says), "{token}: {body}");
    }
    let request = Request::get("/config/v1/stream").body(Body::empty()).unwrap();
    let response = router(p.push.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "no token");

    // team-b has published nothing: its pod waits, and never sees team-a's configuration.
    let mut other = p.open("team-b:other").await.into_body();
    p.publish(&team_a(2, "gpt-4o-mini"));
    let waiting = tokio::time::timeout(Duration::from_millis(200), other.frame()).await;
    assert!(waiting.is_err(), "a pod of team-b gets nothing of team-a");
    p.push.hub.publish("team-b", &Published { version: 7, ..team_a(7, "x") });
    let (frame, _) = next_frame(&mut other, &mut Vec::new()).await.unwrap();
    assert_eq!((frame["namespace"].as_str(), frame["version"].as_u64()), (Some("team-b"), Some(7)));
    let metrics = p.metrics.render();
    assert!(metrics.contains("sideyard_operator_config_stream_requests_total{result=\"refused\"} 5"), "{metrics}");
}

#[tokio::test]
async fn connected_pods_are_counted_with_the_version_they_say_they_serve() {
    let p = push();
    p.publish(&team_a(4, "gpt-4o-mini"));
    let stream = p.open("team-a:web").await;
    let served = |token: &'static str, body: &'static str| p.report("/config/v1/served", token, body);
    let web = |serves| ConnectedPod { labels: [("app".to_string(), "web".to_string())].into(), serves };
    assert_eq!(p.push.connections.in_namespace("team-a"), [web(None)]);
    assert_eq!(served("team-a:web", r#"{"version": 4}"#).await, StatusCode::NO_CONTENT);
    assert_eq!(p.push.connections.in_namespace("team-a"), [web(Some(4))]);
    // A pod without a stream is not counted; a body that is not a version is refused.
    assert_eq!(served("team-a:billing", r#"{"version": 4}"#).await, StatusCode::NO_CONTENT);
    assert_eq!(served("team-a:web", r#"{"version": "four"}"#).await, StatusCode::BAD_REQUEST);
    assert_eq!(p.push.connections.in_namespace("team-a").len(), 1);
    assert_eq!(p.push.connections.take_changed(), ["team-a".to_string()].into(), "the namespace is reconciled again");
    drop(stream);
    assert!(p.push.connections.in_namespace("team-a").is_empty(), "a closed stream's pod is not counted");
}

#[tokio::test]
async fn an_outage_one_pod_reports_is_pushed_to_the_other_pods_of_the_namespace() {
    let p = push();
    p.publish(&team_a(1, "gpt-4o-mini"));
    let mut web = p.open("team-a:web").await.into_body();
    let mut pending = Vec::new();
    assert_eq!(next_frame(&mut web, &mut pending).await.unwrap().0["kind"], "CompiledConfig");
    let report = |token: &'static str, body: &'static str| p.report("/config/v1/health", token, body);
    let outage = r#"{"targets": [{"route": "team-a/chat", "target": "openai", "ejectedMs": 10000}]}"#;
    assert_eq!(report("team-a:billing", outage).await, StatusCode::NO_CONTENT);
    let (frame, _) = next_frame(&mut web, &mut pending).await.unwrap();
    assert_eq!((frame["kind"].as_str(), frame["targets"][0]["target"].as_str()), (Some("FleetHealth"), Some("openai")));
    assert!(frame["targets"][0]["ejectedMs"].as_u64().is_some_and(|ms| ms > 0 && ms <= 10_000), "{frame}");
    // A pod that connects later is told right after its configuration.
    let mut late = p.open("team-a:billing").await.into_body();
    let mut late_pending = Vec::new();
    assert_eq!(next_frame(&mut late, &mut late_pending).await.unwrap().0["kind"], "CompiledConfig");
    assert_eq!(next_frame(&mut late, &mut late_pending).await.unwrap().0["kind"], "FleetHealth");
    // Reports need a pod's token and a readable body.
    assert_eq!(report("team-a:", outage).await, StatusCode::FORBIDDEN);
    assert_eq!(report("team-a:web", "{").await, StatusCode::BAD_REQUEST);
    assert!(p.metrics.render().contains("sideyard_operator_fleet_outages_total 1"));
}
