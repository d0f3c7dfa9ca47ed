//! Pushed configuration with real tokens and pods: the operator (under the chart's RBAC) streams
//! each pod what selects it, as the API server stores the pod's labels; a change to a route or
//! the deletion of a budget reaches a running sidecar whose mounted file never changes.

use std::net::SocketAddr;

use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::common::{self, metric, read, send_as, temp_dir};
use crate::ledger::{LedgerReplicas, pod, sidecar, token};
use crate::operator::{apply, get, install_chart, one_operator_at_a_time, until};
use crate::{cluster_or_skip, namespace};

const INVOICES_KEY: &str = "sk-invoices-credential";

/// The status of a call for `model` with `key`.
async fn call(api: SocketAddr, key: &str, model: &str) -> u16 {
    let body = json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    read(send_as(api, Some(key), "POST", "/v1/chat/completions", &body.to_string()).await).await.status.as_u16()
}

/// The first frame of the stream `token` opens at the ledger `port`, trusting `ca`.
async fn first_frame(port: u16, ca: &str, token: &str) -> (u16, String) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let opened = common::https_open(
        addr,
        ca,
        "127.0.0.1",
        http::Method::GET,
        "/config/v1/stream",
        Vec::new(),
        Some(token),
        true,
    );
    let (response, _) = opened.await.expect("the ledger answers");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while !text.contains(&b'\n') {
        let frame = tokio::time::timeout(common::PATIENCE, body.frame()).await.expect("a frame in time");
        match frame {
            Some(Ok(frame)) => text.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            _ => break,
        }
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn pushed_configuration_reaches_each_pod_with_only_what_selects_it() {
    let server = cluster_or_skip!();
    let _turn = one_operator_at_a_time().await;
    install_chart(server).await;
    let client = server.admin().await;
    let team = namespace(&client, "push", json!({})).await;
    let other = namespace(&client, "push-other", json!({})).await;

    let replicas = LedgerReplicas::new(server);
    let operator = replicas.start("op-push", true);
    let port = replicas.port;

    let sy = "sideyard.dev/v1alpha1";
    let mock = |name: &str, key: Option<&str>| {
        let mut target = json!({"name": name, "api": "mock", "pricing": {"request": "0.01"}});
        if let Some(key) = key {
            target["credentials"] = json!({"secretRef": {"name": "keys", "key": key}});
        }
        target
    };
    let budget = |name: &str, key: &str| {
        json!({"apiVersion": sy, "kind": "ApiKeyBudget", "metadata": {"name": name, "namespace": team},
               "spec": {"key": {"secretRef": {"name": "keys", "key": key}}, "limit": "100"}})
    };
    apply(
        server,
        &[
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": team},
                   "stringData": {"app": "sk-app", "other": "sk-other", "invoices": INVOICES_KEY}}),
            json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "chat", "namespace": team},
                   "spec": {"model": "chat", "targets": [mock("m", None)]}}),
            json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "invoices", "namespace": team},
                   "spec": {"model": "invoices", "workloadSelector": {"matchLabels": {"app": "billing"}},
                            "targets": [mock("m", Some("invoices"))]}}),
            budget("bot", "app"),
            budget("spare", "other"),
            json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "elsewhere", "namespace": other},
                   "spec": {"model": "elsewhere", "targets": [mock("m", None)]}}),
        ],
    );
    // The published configuration, where the web pod has it mounted; it is not written again.
    let config_dir = temp_dir("push-config");
    let mounted = replicas.mount_config(server, &operator, &team, &config_dir).await;
    let compiled: Value = serde_json::from_slice(&mounted).expect("JSON");
    let ca = compiled["config"]["ledger"]["caBundle"].as_str().expect("the ledger's CA").to_string();

    // The web pod as the injector labels it (its labels are then read from the operator's cache
    // of injected pods); the others are read with a GET.
    let web_uid = pod(server, &team, "web-1", json!({"app": "web", "sideyard.dev/config-group": "web"}));
    let web_token = token(server, &team, "sideyard", Some(("web-1", &web_uid)));
    let (_web, api, admin) = sidecar(&config_dir, "web-1", &web_token);
    let admin_metrics = || async move { common::get(admin, "/metrics").await.body };
    until(&operator, "the web pod's stream is open", || async {
        metric(&admin_metrics().await, "sideyard_config_stream_connected") == 1
    })
    .await;
    assert_eq!(call(api, "sk-app", "chat").await, 200);
    assert_eq!(call(api, "sk-app", "invoices").await, 404, "the billing route does not select a web pod");

    // What each token is sent: only what selects its pod, of its own namespace.
    let (status, web_frame) = first_frame(port, &ca, &web_token).await;
    assert_eq!(status, 200, "{web_frame}");
    assert!(web_frame.contains("\"chat\"") && !web_frame.contains(INVOICES_KEY), "{web_frame}");
    let billing_uid = pod(server, &team, "billing-1", json!({"app": "billing"}));
    let billing_token = token(server, &team, "sideyard", Some(("billing-1", &billing_uid)));
    let (_, billing_frame) = first_frame(port, &ca, &billing_token).await;
    assert!(billing_frame.contains(INVOICES_KEY), "the billing pod gets its route's credential");
    let stranger_uid = pod(server, &other, "stranger", json!({"app": "billing"}));
    let stranger_token = token(server, &other, "sideyard", Some(("stranger", &stranger_uid)));
    let (_, stranger_frame) = first_frame(port, &ca, &stranger_token).await;
    let stranger: Value = serde_json::from_str(&stranger_frame).expect("a frame");
    assert_eq!(stranger["namespace"], other.as_str());
    assert!(!stranger_frame.contains("sk-app") && !stranger_frame.contains(INVOICES_KEY), "{stranger_frame}");
    let unbound = token(server, &team, "sideyard", None);
    let (status, refusal) = first_frame(port, &ca, &unbound).await;
    assert_eq!(status, 403, "a token bound to no pod: {refusal}");

    // A route changes: the running sidecar serves it, its mounted file as it was.
    apply(
        server,
        &[json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "chat", "namespace": team},
                 "spec": {"model": "chat", "aliases": ["chat-next"], "targets": [mock("m", None)]}})],
    );
    until(&operator, "the new alias is served", || async { call(api, "sk-app", "chat-next").await == 200 }).await;
    let version = get(server, &["secret", "sideyard-config", "-n", &team])
        .and_then(|s| s["metadata"]["annotations"]["sideyard.dev/config-version"].as_str()?.parse::<u64>().ok())
        .expect("the published version");
    let m = admin_metrics().await;
    assert_eq!(metric(&m, "sideyard_config_version"), version, "{m}");
    // Every selected, connected pod (the web pod) says it serves it: the route is Programmed for
    // its new generation, and `kubectl wait` says so.
    until(&operator, "Programmed for the new generation", || async {
        let Some(route) = get(server, &["proute", "chat", "-n", &team]) else { return false };
        let conditions = route["status"]["conditions"].as_array().cloned().unwrap_or_default();
        conditions.iter().any(|c| {
            c["type"] == "Programmed"
                && c["status"] == "True"
                && c["observedGeneration"] == route["metadata"]["generation"]
        })
    })
    .await;
    let out = server.kubectl(&["wait", "--for=condition=Programmed", "proute/chat", "-n", &team, "--timeout=20s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(metric(&m, "sideyard_config_source{source=\"push\"}"), 1);
    assert_eq!(std::fs::read(config_dir.join("config.json")).expect("config file"), mounted);

    // A budget is deleted: its key is refused at once, the other budget's still served.
    let out = server.kubectl(&["delete", "apikeybudget", "bot", "-n", &team]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until(&operator, "the deleted budget's key is refused", || async { call(api, "sk-app", "chat").await == 401 })
        .await;
    assert_eq!(call(api, "sk-other", "chat").await, 200);

    let log = operator.log();
    assert!(!log.to_lowercase().contains("forbidden"), "pods read under the chart's RBAC:\n{log}");
}
