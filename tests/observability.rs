//! The pictures and alerts the chart ships, checked against what Sideyard exports, so that they
//! cannot rot: every PromQL expression of the Grafana dashboard and of the alert rules parses, and
//! every metric they name is one that a running sidecar (standalone and in cluster mode) or the
//! operator exports; the rules pass Prometheus's own `promtool check rules`, and its unit tests
//! (tests/testdata/promtool/) fire each alert on series shaped like those metrics.
//!
//! promtool is built with Go by `scripts/promtool` (`.ci/run` does it); without
//! `SIDEYARD_PROMTOOL` its test says loudly that it skipped, and fails instead when
//! `SIDEYARD_REQUIRE_PROMTOOL=1`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fleet::{CHAT as FLEET_CHAT, Fleet, KEY as FLEET_KEY};
use common::*;
use promql_parser::parser::{self, Expr};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const DASHBOARD: &str = "charts/sideyard/files/sideyard-dashboard.json";
const RULES: &str = "charts/sideyard/files/sideyard-rules.yaml";
const RULE_TESTS: &str = "tests/testdata/promtool/sideyard-rules.test.yaml";

/// Every PromQL expression of the dashboard (its panels', and its variables' `label_values`
/// selectors), with Grafana's variables given values, as Grafana sends them.
fn dashboard_expressions() -> Vec<String> {
    let text = std::fs::read_to_string(root().join(DASHBOARD)).expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    fn panels(list: &Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(target["expr"].as_str().expect("every target has an expression").to_string());
            }
            panels(&panel["panels"], out);
        }
    }
    let mut exprs = Vec::new();
    panels(&dashboard["panels"], &mut exprs);
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).unwrap_or_default();
        if let Some(inner) = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')) {
            // `label_values(selector, label)`: the selector is PromQL.
            let selector = inner.rsplit_once(',').map_or(inner, |(selector, _)| selector);
            exprs.push(selector.to_string());
        }
    }
    exprs.iter().map(|e| e.replace("$__rate_interval", "5m").replace("$namespace", ".*")).collect()
}

/// Every alert's expression.
fn rule_expressions() -> Vec<String> {
    let text = std::fs::read_to_string(root().join(RULES)).expect("the rules");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("the rules are YAML");
    let groups = rules["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .map(|r| r["expr"].as_str().expect("every rule has an expression").to_string())
        .collect()
}

/// The metric names an expression selects.
fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    match expr {
        Expr::VectorSelector(vs) => {
            let named = vs.matchers.matchers.iter().find(|m| m.name == "__name__").map(|m| m.value.clone());
            out.extend(vs.name.clone().or(named));
        }
        Expr::MatrixSelector(ms) => metric_names(&Expr::VectorSelector(ms.vs.clone()), out),
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(param) = &a.param {
                metric_names(param, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The series names an exposition offers: each family's, with a histogram's `_bucket`, `_sum`
/// and `_count` (a summary's `_sum` and `_count`).
fn exported(exposition: &str, into: &mut BTreeSet<String>) {
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
            into.insert(name.to_string());
            let suffixes: &[&str] = match kind {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                _ => &[],
            };
            into.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#')
            && let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty())
        {
            into.insert(name.to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_the_alerts_name_only_metrics_a_running_sideyard_exports() {
    let dashboard = dashboard_expressions();
    let rules = rule_expressions();
    assert!(
        dashboard.len() >= 20 && rules.len() >= 9,
        "{} panels' and {} rules' expressions",
        dashboard.len(),
        rules.len()
    );
    let mut named = BTreeSet::new();
    for expr in dashboard.iter().chain(&rules) {
        let parsed = parser::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let mut names = BTreeSet::new();
        metric_names(&parsed, &mut names);
        assert!(!names.is_empty(), "{expr} names no metric");
        named.append(&mut names);
    }

    // A standalone sidecar with a route and a budget, and in cluster mode a sidecar leasing from
    // the operator's ledger: each has served a request, so that every per-target and per-budget
    // series exists.
    let config =
        route_yaml("chat", "", &["{name: mock, api: mock, baseUrl: 'mock://local', pricing: {request: '0.01'}}"])
            + &budget_yaml("team-a", "sk-observed", "limit: \"10\"");
    let standalone = Sidecar::start(&config);
    let body = r#"{"model":"chat","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = read(send_as(standalone.api, Some("sk-observed"), "POST", "/v1/chat/completions", body).await).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let budget = serde_json::json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "10"});
    let fleet = Fleet::new(&[("bot", budget)]).await;
    let (_operator, operator_admin) = fleet.replica("op-1", fleet.port);
    fleet.publish_config().await;
    let (_sidecar, api, admin) = fleet.sidecar("pod-0", &temp_dir("observed-state"));
    let reply = read(send_as(api, Some(FLEET_KEY), "POST", "/v1/chat/completions", FLEET_CHAT).await).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let mut offered = BTreeSet::new();
    for at in [standalone.admin, admin, operator_admin] {
        exported(&get(at, "/metrics").await.body, &mut offered);
    }
    let missing: Vec<&String> = named.difference(&offered).collect();
    assert!(missing.is_empty(), "named by the dashboard or the alerts, exported by no process: {missing:?}");
}

/// promtool, or `None` when the test is to be skipped (it has said why).
fn promtool() -> Option<PathBuf> {
    match std::env::var_os("SIDEYARD_PROMTOOL").map(PathBuf::from).filter(|p| p.is_file()) {
        Some(path) => Some(path),
        None if std::env::var("SIDEYARD_REQUIRE_PROMTOOL").as_deref() == Ok("1") => {
            panic!("SIDEYARD_REQUIRE_PROMTOOL=1 and no promtool: export SIDEYARD_PROMTOOL=\"$(scripts/promtool)\"")
        }
        None => {
            eprintln!(
                "SKIPPED: promtool is not built; export SIDEYARD_PROMTOOL=\"$(scripts/promtool)\" to check the alerts with it"
            );
            None
        }
    }
}

fn run(promtool: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool).args(args).current_dir(root()).output().expect("promtool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alerts_pass_promtool_check_rules_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let checked = run(&promtool, &["check", "rules", RULES]);
    assert!(checked.contains(&format!("SUCCESS: {} rules found", rule_expressions().len())), "{checked}");
    let tested = run(&promtool, &["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Each alert has a unit test that expects it to fire.
    let tests = std::fs::read_to_string(root().join(RULE_TESTS)).expect("the unit tests");
    let rules = std::fs::read_to_string(root().join(RULES)).expect("the rules");
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        let fires = tests.split("alertname: ").skip(1).any(|t| t.starts_with(alert) && t.contains("exp_labels"));
        assert!(fires, "no unit test fires {alert}");
    }
}
