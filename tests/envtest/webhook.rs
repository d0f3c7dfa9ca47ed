//! The injection webhook called by the real API server: a MutatingWebhookConfiguration as the
//! chart renders it, pointed at the operator on 127.0.0.1; pods stored injected and accepted by
//! the API server's own Pod validation, once; clashes refused with our message; and what a pod
//! meets while the webhook is down.

use serde_json::{Value, json};

use crate::common::cluster::replica_args;
use crate::common::helm::{find, template};
use crate::operator::{apply, get, one_operator_at_a_time, start_operator, until};
use crate::server::{ApiServer, b64};
use crate::{cluster_or_skip, namespace};

fn pod(name: &str, ns: &str) -> Value {
    // No ServiceAccount admission plugin runs here to fill in the pod's account.
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "example/bot:1"}]}})
}

/// `kubectl create -f -` of `object`: the stored object, or kubectl's error.
fn create(server: &ApiServer, object: &Value, dry_run: bool) -> Result<Value, String> {
    let mut args = vec!["create", "-o", "json", "-f", "-"];
    if dry_run {
        args.push("--dry-run=server");
    }
    let out = server.kubectl_as(&server.admin_kubeconfig, &args, Some(&object.to_string()));
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("kubectl's JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn sidecars(pod: &Value) -> usize {
    let spec = &pod["spec"];
    [&spec["initContainers"], &spec["containers"]]
        .iter()
        .flat_map(|list| list.as_array().into_iter().flatten())
        .filter(|c| c["name"] == "sideyard")
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_stores_pods_injected_once_refuses_clashes_and_fails_closed_without_the_webhook() {
    let server = cluster_or_skip!();
    let _turn = one_operator_at_a_time().await;
    let client = server.admin().await;
    let ops = namespace(&client, "hook-ops", json!({})).await;
    let injected = namespace(&client, "hook-on", json!({"sideyard.dev/inject": "enabled"})).await;
    let plain = namespace(&client, "hook-off", json!({})).await;

    let cert_dir = server.webhook_cert_dir.to_str().expect("path");
    let args = replica_args("op-hook", "127.0.0.1:0", &["--lease-namespace", &ops, "--webhook-cert-dir", cert_dir]);
    let (mut operator, running) = start_operator(&args, &server.admin_kubeconfig);
    let webhook = running["webhook"].as_str().expect("the webhook's address").to_string();

    // The chart's MutatingWebhookConfiguration, its clientConfig pointed at 127.0.0.1.
    let docs = template(&[]).expect("helm template");
    let mut configuration = find(&docs, "MutatingWebhookConfiguration", "sideyard").clone();
    configuration["webhooks"][0]["clientConfig"] =
        json!({"url": format!("https://{webhook}/mutate-pods"), "caBundle": b64(&server.ca_pem)});
    apply(server, &[configuration]);

    // The API server picks the configuration up within moments: a dry run shows when.
    until(&operator, "the API server calls the webhook", || async {
        create(server, &pod("probe", &injected), true).is_ok_and(|p| sidecars(&p) == 1)
    })
    .await;

    let stored = create(server, &pod("bot", &injected), false).expect("the injected pod is valid");
    let init = &stored["spec"]["initContainers"][0];
    assert_eq!(init["name"], "sideyard");
    assert_eq!(init["restartPolicy"], "Always", "a native sidecar");
    let token = stored["spec"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "sideyard-token"))
        .expect("the token volume");
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "sideyard");
    let env = &stored["spec"]["containers"][0]["env"];
    assert!(env.as_array().into_iter().flatten().any(|e| e["name"] == "OPENAI_BASE_URL"), "{env}");
    assert!(stored["metadata"]["annotations"]["sideyard.dev/status"].is_string());

    // The pod mounts only its configuration group's key, which the operator renders with only
    // what selects the group's pods: not another workload's route, nor its credential.
    let group = stored["metadata"]["labels"]["sideyard.dev/config-group"].as_str().expect("the group label");
    let config = stored["spec"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "sideyard-config"))
        .expect("the config volume");
    let key = format!("{group}.json");
    assert_eq!(config["secret"]["items"], json!([{"key": key, "path": "config.json"}]));
    let sy = "sideyard.dev/v1alpha1";
    let mock = json!([{"name": "m", "api": "mock", "credentials": {"secretRef": {"name": "keys", "key": "other"}}}]);
    apply(
        server,
        &[
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": injected},
                   "stringData": {"other": "sk-other-workload"}}),
            json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "everyone", "namespace": injected},
                   "spec": {"model": "everyone", "targets": [{"name": "m", "api": "mock"}]}}),
            json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "others", "namespace": injected},
                   "spec": {"model": "others", "workloadSelector": {"matchLabels": {"app": "other"}}, "targets": mock}}),
        ],
    );
    let group_config = || {
        let secret = get(server, &["secret", "sideyard-config", "-n", &injected])?;
        let bytes = crate::common::base64_decode(secret["data"][key.as_str()].as_str()?);
        Some(String::from_utf8_lossy(&bytes).into_owned())
    };
    until(&operator, "the pod's group is rendered with both routes compiled", || async {
        let whole = get(server, &["secret", "sideyard-config", "-n", &injected])
            .and_then(|s| s["data"]["config.json"].as_str().map(crate::common::base64_decode))
            .is_some_and(|c| String::from_utf8_lossy(&c).contains("\"others\""));
        whole && group_config().is_some()
    })
    .await;
    let rendered = group_config().expect("the group's key");
    assert!(rendered.contains("\"everyone\"") && !rendered.contains("\"others\""), "{rendered}");
    assert!(!rendered.contains("sk-other-workload"), "no credential of a route that does not select the pod");

    // Created again from what was stored (as a controller or a backup restore would): not
    // injected twice.
    let mut again = stored.clone();
    again["metadata"] =
        json!({"name": "bot-again", "namespace": injected, "annotations": stored["metadata"]["annotations"]});
    assert_eq!(sidecars(&create(server, &again, false).expect("stored")), 1);

    // A namespace without the label is not the webhook's.
    let untouched = create(server, &pod("bot", &plain), false).expect("stored");
    assert_eq!(sidecars(&untouched), 0);
    assert_eq!(untouched["spec"].get("volumes").and_then(Value::as_array).map_or(0, Vec::len), 0);

    // A clash is refused with our message, not the API server's duplicate-name error.
    let mut clashing = pod("clash", &injected);
    clashing["spec"]["volumes"] = json!([{"name": "sideyard-config", "emptyDir": {}}]);
    let refused = create(server, &clashing, false).expect_err("refused");
    assert!(
        refused.contains(r#"denied the request: volume "sideyard-config" is named like one the Sideyard sidecar adds"#),
        "{refused}"
    );
    assert!(!refused.contains("Duplicate value"), "{refused}");
    let mut port = pod("port", &injected);
    port["spec"]["containers"][0]["ports"] = json!([{"containerPort": 7700}]);
    let refused = create(server, &port, false).expect_err("refused");
    assert!(refused.contains("declares port 7700"), "{refused}");

    // With the webhook down, failurePolicy Fail (the chart's default) refuses pods of labelled
    // namespaces, as docs/install.md says; other namespaces are not affected.
    operator.terminate();
    operator.wait_exit();
    let refused = create(server, &pod("down", &injected), false).expect_err("refused while the webhook is down");
    assert!(refused.contains(r#"failed calling webhook "pods.sideyard.dev""#), "{refused}");
    assert!(create(server, &pod("down", &plain), false).is_ok());
    let pods = get(server, &["pods", "-n", &injected]).expect("pods");
    let names: Vec<&str> =
        pods["items"].as_array().into_iter().flatten().filter_map(|p| p["metadata"]["name"].as_str()).collect();
    assert_eq!(names, ["bot", "bot-again"], "nothing else was stored in the labelled namespace");
}
