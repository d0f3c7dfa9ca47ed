//! A team budget over keys a template issues from labelled Secrets, with the operator's ledger
//! under the chart's RBAC and two sidecars on pushed configuration: the team's limit holds across
//! keys and sidecars, top-ups move credit from the team to a key, every level's figures are in
//! its status in the API server (and in `kubectl get`), and labelling or unlabelling a Secret
//! issues or revokes a key in the running sidecars.

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::common::{read, send_as, temp_dir};
use crate::ledger::{LedgerReplicas, condition_of, pod, sidecar, token};
use crate::operator::{apply, condition, get, install_chart, one_operator_at_a_time, until};
use crate::{cluster_or_skip, namespace};

const CHAT: &str = r#"{"model":"chat","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
const LABEL: &str = "sideyard.dev/key";

fn key_of(secret: &str) -> String {
    format!("sk-team-{secret}")
}

/// A Secret holding the key of `secret`, labelled for the template or not.
fn secret(ns: &str, name: &str, labelled: bool) -> Value {
    let labels = if labelled { json!({LABEL: "apps"}) } else { json!({}) };
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns, "labels": labels},
           "stringData": {"key": key_of(name)}})
}

/// A chat call with the key of Secret `secret`: its status and body.
async fn chat(api: SocketAddr, secret: &str) -> (u16, Value) {
    let reply = read(send_as(api, Some(&key_of(secret)), "POST", "/v1/chat/completions", CHAT).await).await;
    (reply.status.as_u16(), serde_json::from_str(&reply.body).unwrap_or(Value::Null))
}

/// `GET /api/v1/key` with the key of Secret `secret`: spends nothing.
async fn key_info(api: SocketAddr, secret: &str) -> (u16, Value) {
    let reply = read(send_as(api, Some(&key_of(secret)), "GET", "/api/v1/key", "").await).await;
    (reply.status.as_u16(), serde_json::from_str(&reply.body).unwrap_or(Value::Null))
}

/// Chats with `secret`'s key until it is refused (within a bound): the answers served, and the
/// refusal.
async fn spend_all(api: SocketAddr, secret: &str) -> (usize, Value) {
    for served in 0..20 {
        let (status, body) = chat(api, secret).await;
        match status {
            200 => continue,
            402 => return (served, body),
            other => panic!("{secret}: {other} {body}"),
        }
    }
    panic!("{secret}'s key was never refused: its limits do not hold");
}

/// The row of `kubectl get akb` for `name`, by column.
fn columns(table: &str, name: &str) -> Vec<(String, String)> {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_default();
    // Columns are aligned: each cell starts where its header does (cells may be empty).
    let starts: Vec<(usize, &str)> =
        header.match_indices(|c: char| !c.is_whitespace()).fold(Vec::new(), |mut v, (i, _)| {
            if i == 0 || header.as_bytes()[i - 1] == b' ' {
                let end = header[i..].find(' ').map_or(header.len(), |e| i + e);
                v.push((i, &header[i..end]));
            }
            v
        });
    starts
        .iter()
        .map(|&(at, title)| {
            let cell = row.get(at..).unwrap_or_default().split_whitespace().next().unwrap_or_default();
            (title.to_string(), cell.to_string())
        })
        .collect()
}

fn column<'a>(row: &'a [(String, String)], title: &str) -> &'a str {
    row.iter().find(|(t, _)| t == title).map_or("", |(_, cell)| cell)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_team_limit_holds_across_issued_keys_and_sidecars_and_every_level_is_in_its_status() {
    let server = cluster_or_skip!();
    let _turn = one_operator_at_a_time().await;
    install_chart(server).await;
    let client = server.admin().await;
    let ns = namespace(&client, "teams", json!({})).await;

    let replicas = LedgerReplicas::new(server);
    let operator = replicas.start("op-teams", true);

    let sy = "sideyard.dev/v1alpha1";
    // The team has 0.10 for its three keys of 0.03 each, which top up by 0.02 twice at most.
    apply(
        server,
        &[
            secret(&ns, "a", true),
            secret(&ns, "b", true),
            secret(&ns, "c", false),
            json!({"apiVersion": sy, "kind": "ProviderRoute", "metadata": {"name": "chat", "namespace": ns},
                   "spec": {"model": "chat", "targets": [{"name": "m", "api": "mock", "pricing": {"request": "0.01"}}]}}),
            json!({"apiVersion": sy, "kind": "ApiKeyBudget", "metadata": {"name": "team", "namespace": ns},
                   "spec": {"limit": "0.10"}}),
            // Broken links: not Accepted, with the reason.
            json!({"apiVersion": sy, "kind": "ApiKeyBudget", "metadata": {"name": "orphan", "namespace": ns},
                   "spec": {"limit": "1", "parent": "nowhere"}}),
            json!({"apiVersion": sy, "kind": "ApiKeyBudget", "metadata": {"name": "loop-a", "namespace": ns},
                   "spec": {"limit": "1", "parent": "loop-b"}}),
            json!({"apiVersion": sy, "kind": "ApiKeyBudget", "metadata": {"name": "loop-b", "namespace": ns},
                   "spec": {"limit": "1", "parent": "loop-a"}}),
            json!({"apiVersion": sy, "kind": "ApiKeyBudget", "metadata": {"name": "apps", "namespace": ns},
                   "spec": {"keys": {"secretSelector": {"matchLabels": {LABEL: "apps"}}}, "parent": "team",
                            "limit": "0.03", "topUp": {"threshold": "0.02", "amount": "0.02", "maxPerPeriod": "0.04"}}}),
        ],
    );
    let config_dir = temp_dir("teams-config");
    replicas.mount_config(server, &operator, &ns, &config_dir).await;
    let mut sidecars = Vec::new();
    for name in ["team-1", "team-2"] {
        let uid = pod(server, &ns, name, json!({}));
        sidecars.push(sidecar(&config_dir, name, &token(server, &ns, "sideyard", Some((name, &uid)))));
    }
    let (one, two) = (sidecars[0].1, sidecars[1].1);

    // A Secret labelled later is a key in the running sidecars; until then it is none.
    assert_eq!(key_info(one, "c").await.0, 401);
    apply(server, &[secret(&ns, "c", true)]);
    until(&operator, "the key of Secret c is issued", || async { key_info(one, "c").await.0 == 200 }).await;
    let (_, info) = key_info(one, "c").await;
    assert_eq!(info["data"]["label"], format!("{ns}/apps:c"), "{info}");
    assert_eq!(info["data"]["parents"][0]["label"], format!("{ns}/team"), "{info}");

    let budget = |name: &str| get(server, &["apikeybudget", name, "-n", &ns]).unwrap_or(Value::Null);
    // Key a, on the first sidecar, spends its 0.03 and two top-ups from the team.
    let (served, refusal) = spend_all(one, "a").await;
    let statuses = || format!("{}\n{}", budget("team")["status"], budget("apps")["status"]);
    assert_eq!(served, 7, "0.03 and the period's 0.04 of top-ups: {refusal}\n{}", statuses());
    assert_eq!(refusal["error"]["metadata"]["budget"], Value::Null, "a's own limit: {refusal}");
    // Key b, on the other sidecar, has only what the team has left: 0.03.
    let (served, refusal) = spend_all(two, "b").await;
    assert_eq!(served, 3, "{refusal}");
    // Key c has its own 0.03 untouched, and the team nothing.
    let (status, refusal) = chat(one, "c").await;
    assert_eq!(status, 402, "{refusal}");
    assert_eq!(refusal["error"]["metadata"]["budget"], format!("{ns}/team"), "{refusal}");

    let accepted = |name: &str| condition_of(&budget(name), "Accepted");
    until(&operator, "the broken links are not Accepted, with their reasons", || async {
        accepted("orphan") == ("False".into(), "ParentNotFound".into())
            && accepted("loop-a") == ("False".into(), "ParentCycle".into())
    })
    .await;

    // Every level's book in the API server: the team's total, each issued key in the template's.
    let issued = |name: &str| {
        let template = budget("apps");
        let keys = template["status"]["keys"].as_array().cloned().unwrap_or_default();
        keys.into_iter().find(|k| k["secret"] == name).unwrap_or(Value::Null)
    };
    until(&operator, "the team's status holds what its keys spent", || async {
        let team = budget("team");
        team["status"]["spent"] == "0.1" && issued("b")["spent"] == "0.03"
    })
    .await;
    let team = budget("team");
    assert_eq!((&team["status"]["remaining"], &team["status"]["state"]), (&json!("0"), &json!("Exhausted")), "{team}");
    let a = issued("a");
    assert_eq!((&a["spent"], &a["toppedUp"], &a["remaining"]), (&json!("0.07"), &json!("0.04"), &json!("0")), "{a}");
    assert_eq!(issued("b")["toppedUp"], Value::Null, "the team had no whole top-up left for b");
    let table = String::from_utf8_lossy(&server.kubectl(&["get", "akb", "-n", &ns]).stdout).into_owned();
    let row = columns(&table, "team");
    assert_eq!((column(&row, "SPENT"), column(&row, "STATE")), ("0.1", "Exhausted"), "{table}");
    assert_eq!(column(&columns(&table, "apps"), "PARENT"), "team", "{table}");
    let ledger_condition = || condition(&budget("apps"), "Ledger").cloned().unwrap_or(Value::Null);
    let kept = ledger_condition();
    assert_eq!((&kept["status"], &kept["reason"]), (&json!("True"), &json!("Serving")), "{kept}");

    // Each top-up is an Event on the template, naming the Secret.
    let events = get(server, &["events.events.k8s.io", "-n", &ns]).unwrap_or(Value::Null);
    let top_ups: Vec<&Value> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "ToppedUp" && e["regarding"]["name"] == "apps")
        .collect();
    assert!(!top_ups.is_empty(), "{events}");
    assert!(top_ups.iter().all(|e| e["note"].as_str().is_some_and(|n| n.contains("Secret \"a\""))), "{events}");

    // Unlabelled, b is no key in any sidecar; the team keeps what b spent, so a key issued in
    // its place has nothing of the team's credit.
    apply(server, &[secret(&ns, "b", false), secret(&ns, "d", true)]);
    until(&operator, "b revoked and d issued", || async {
        key_info(two, "b").await.0 == 401 && key_info(two, "d").await.0 == 200
    })
    .await;
    assert_eq!(chat(two, "b").await.0, 401);
    let (status, refusal) = chat(two, "d").await;
    assert_eq!((status, &refusal["error"]["metadata"]["budget"]), (402, &json!(format!("{ns}/team"))), "{refusal}");
    until(&operator, "b's book leaves the template's status, its spend stays the team's", || async {
        let team = budget("team");
        issued("b").is_null() && team["status"]["ownSpent"] == "0.03" && team["status"]["spent"] == "0.1"
    })
    .await;

    // The template's status said the ledger keeps it through the reconciles of the changes: its
    // condition never went False and back.
    assert_eq!(ledger_condition(), kept, "the template's Ledger condition changed");
}
