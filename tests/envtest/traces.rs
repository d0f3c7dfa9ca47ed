//! The operator's traces, as a collector receives them: started with `--otlp-endpoint`, the
//! operator exports a span for each namespace it reconciles and for each ledger call a sidecar
//! makes, to an OTLP/HTTP receiver on 127.0.0.1 in this test.

use serde_json::json;

use crate::common::otlp::{Received, attributes, receiver};
use crate::common::temp_dir;
use crate::ledger::{LedgerReplicas, apply_chat_and_budget, chat, pod, sidecar, token};
use crate::operator::{install_chart, one_operator_at_a_time, until};
use crate::{cluster_or_skip, namespace};

/// The attributes of every span named `name` the operator sent so far.
fn spans_named(received: &Received, name: &str) -> Vec<std::collections::HashMap<String, String>> {
    let spans = received.0.lock().unwrap();
    spans
        .iter()
        .filter(|(service, s)| service == "sideyard-operator" && s.name == name)
        .map(|(_, s)| attributes(s))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_traces_its_reconciles_and_the_ledger_calls_it_answers() {
    let server = cluster_or_skip!();
    let _turn = one_operator_at_a_time().await;
    install_chart(server).await;
    let client = server.admin().await;
    let team = namespace(&client, "traced", json!({})).await;
    let (collector, received) = receiver().await;

    let replicas = LedgerReplicas::new(server);
    let endpoint = format!("http://{collector}");
    let operator = replicas.start_with("op-traced", true, &["--otlp-endpoint", &endpoint]);
    apply_chat_and_budget(server, &team);
    let reconcile = format!("reconcile {team}");
    let applied = || {
        spans_named(&received, &reconcile)
            .into_iter()
            .find(|s| s["sideyard.routes"] == "1" && s["sideyard.budgets"] == "1")
    };
    until(&operator, "a span of the namespace's reconcile with its route and budget", || async { applied().is_some() })
        .await;
    let span = applied().unwrap_or_default();
    assert_eq!(span["k8s.namespace.name"], team);
    assert_eq!(span["sideyard.result"], "success");

    // A sidecar's lease of the budget is a ledger call, traced with the budget and the pod.
    let config_dir = temp_dir("traced-config");
    replicas.mount_config(server, &operator, &team, &config_dir).await;
    let uid = pod(server, &team, "bot-1", json!({}));
    let (_bot, api, _) = sidecar(&config_dir, "bot-1", &token(server, &team, "sideyard", Some(("bot-1", &uid))));
    let (status, body) = chat(api).await;
    assert_eq!(status, 200, "{body}");
    until(&operator, "a span of the lease", || async { !spans_named(&received, "ledger lease").is_empty() }).await;
    let lease = spans_named(&received, "ledger lease")
        .into_iter()
        .find(|s| s["sideyard.result"] == "ok")
        .expect("a lease that was granted");
    assert_eq!(lease["sideyard.ledger.call"], "lease");
    assert_eq!(lease["sideyard.budget"], format!("{team}/bot"));
    assert_eq!(lease["k8s.pod.name"], "bot-1");
}
