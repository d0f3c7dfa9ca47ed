//! The CRDs: `crds/` matches the code, the schema's CEL rules compile and fit the API server's
//! cost budget, and the schema (OpenAPI constraints plus CEL) and the compile step of standalone
//! mode accept and reject the same ProviderRoutes.

mod common;

use kube::core::cel::{Validator, compile_schema, estimate_rule_cost};
use regex::Regex;
use serde_json::Value;
use sideyard::api::{self, ProviderRoute};
use sideyard::config::{Documents, MapResolver, compile, parse_file};

#[test]
fn crds_folder_matches_the_generated_crds() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/sideyard.yaml")).unwrap();
    let (code, printed, stderr) = common::run(&["crd"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(printed, api::crds_yaml());
    assert!(
        committed == printed,
        "crds/sideyard.yaml is stale: regenerate it with `cargo run -- crd > crds/sideyard.yaml`"
    );
}

#[test]
fn crds_chart_matches_the_generated_crds() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/sideyard-crds/templates/crds.yaml"))
            .unwrap();
    let (code, printed, stderr) = common::run(&["crd", "--helm"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        committed == printed,
        "charts/sideyard-crds/templates/crds.yaml is stale: regenerate it with \
         `cargo run -- crd --helm > charts/sideyard-crds/templates/crds.yaml`"
    );
    assert!(!printed.contains("{{"), "the CRDs are a Helm template: braces would be read as template actions");
}

#[test]
fn names_columns_and_status_are_as_documented() {
    let crd = serde_json::to_value(&api::crds()[0]).unwrap();
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], "providerroutes.sideyard.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["proute"]));
    assert_eq!(spec["names"]["categories"], serde_json::json!(["sideyard"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let columns: Vec<&str> =
        version["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Model", "Strategy", "Targets", "Ready", "Age"]);
    assert!(version["subresources"]["status"].is_object());
    let conditions = &schema_of("ProviderRoute")["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], serde_json::json!(["type"]));
}

fn schema_of(kind: &str) -> Value {
    let crds = api::crds();
    let crd = crds.iter().find(|c| c.spec.names.kind == kind).unwrap();
    serde_json::to_value(crd).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Every `description` is set, so `kubectl explain` documents every field.
#[test]
fn every_field_is_documented() {
    fn walk(node: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let child_path = format!("{path}.{name}");
                if child.get("description").is_none() && !path.contains("metadata") {
                    missing.push(child_path.clone());
                }
                walk(child, &child_path, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
    }
    let mut missing = Vec::new();
    for kind in ["ProviderRoute", "ApiKeyBudget"] {
        walk(&schema_of(kind)["properties"]["spec"], kind, &mut missing);
        walk(&schema_of(kind)["properties"]["status"], kind, &mut missing);
    }
    assert!(missing.is_empty(), "fields without a description: {missing:?}");
}

#[test]
fn cel_rules_compile_and_fit_the_cost_budget() {
    fn walk(node: &Value, path: &str, problems: &mut Vec<String>, rules: &mut usize) {
        if let Some(list) = node.get("x-kubernetes-validations").and_then(Value::as_array) {
            let compiled = compile_schema(node);
            for e in compiled.compilation_errors() {
                problems.push(format!("{path}: {e}"));
            }
            for rule in list {
                *rules += 1;
                let rule = rule["rule"].as_str().unwrap();
                for warning in estimate_rule_cost(rule, &compiled) {
                    problems.push(format!("{path}: {rule}: {warning:?}"));
                }
            }
        }
        for key in ["properties"] {
            if let Some(props) = node.get(key).and_then(Value::as_object) {
                for (name, child) in props {
                    walk(child, &format!("{path}.{name}"), problems, rules);
                }
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), problems, rules);
        }
    }
    let (mut problems, mut rules) = (Vec::new(), 0);
    for kind in ["ProviderRoute", "ApiKeyBudget"] {
        walk(&schema_of(kind), kind, &mut problems, &mut rules);
    }
    assert_eq!(rules, 17, "every rule of both CRDs is checked");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn unit_patterns_match_their_parsers() {
    use sideyard::api::units::*;
    let duration = Regex::new(DURATION_PATTERN).unwrap();
    for s in ["0s", "800ms", "2s", "5m", "1h", "1h30m", "1m500ms", "", "2", "2 s", "1.5s", "-1s", "2d", "ms", "1msx"] {
        assert_eq!(duration.is_match(s), parse_duration(s).is_ok(), "duration {s:?}");
    }
    let decimal = Regex::new(DECIMAL_PATTERN).unwrap();
    for s in ["0", "2.50", "0.000125", "10", "", ".5", "5.", "1.1234567", "-1", "1e3", "1,5", " 1", "1000000000000"] {
        assert_eq!(decimal.is_match(s), parse_micros(s).is_ok(), "decimal {s:?}");
    }
}

/// Violations of the OpenAPI constraints this CRD uses (the API server checks them before CEL).
fn openapi_violations(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() {
        if !schema["nullable"].as_bool().unwrap_or(false) {
            out.push(format!("{path}: must not be null"));
        }
        return;
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(map) = value.as_object() else { return out.push(format!("{path}: must be an object")) };
            for required in schema["required"].as_array().into_iter().flatten() {
                if !map.contains_key(required.as_str().unwrap()) {
                    out.push(format!("{path}.{}: required", required.as_str().unwrap()));
                }
            }
            if let Some(max) = schema["maxProperties"].as_u64()
                && map.len() as u64 > max
            {
                out.push(format!("{path}: more than {max} properties"));
            }
            for (k, v) in map {
                if let Some(child) = schema["properties"].get(k) {
                    openapi_violations(child, v, &format!("{path}.{k}"), out);
                } else if let Some(child) = schema.get("additionalProperties") {
                    openapi_violations(child, v, &format!("{path}.{k}"), out);
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else { return out.push(format!("{path}: must be an array")) };
            if schema["minItems"].as_u64().is_some_and(|min| (items.len() as u64) < min) {
                out.push(format!("{path}: too few items"));
            }
            if schema["maxItems"].as_u64().is_some_and(|max| items.len() as u64 > max) {
                out.push(format!("{path}: too many items"));
            }
            for (i, item) in items.iter().enumerate() {
                openapi_violations(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        Some("string") => {
            let Some(s) = value.as_str() else { return out.push(format!("{path}: must be a string")) };
            let len = s.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|min| len < min)
                || schema["maxLength"].as_u64().is_some_and(|max| len > max)
            {
                out.push(format!("{path}: bad length"));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && !Regex::new(pattern).unwrap().is_match(s)
            {
                out.push(format!("{path}: does not match {pattern}"));
            }
            if let Some(allowed) = schema["enum"].as_array()
                && !allowed.contains(value)
            {
                out.push(format!("{path}: not one of {allowed:?}"));
            }
        }
        Some("integer") => {
            let Some(n) = value.as_i64() else { return out.push(format!("{path}: must be an integer")) };
            if schema["minimum"].as_f64().is_some_and(|min| (n as f64) < min)
                || schema["maximum"].as_f64().is_some_and(|max| n as f64 > max)
            {
                out.push(format!("{path}: out of range"));
            }
        }
        _ => {}
    }
}

/// Whether the API server would reject `object`: OpenAPI constraints, then CEL with defaults.
fn schema_rejects(object: &Value) -> Vec<String> {
    let route = object;
    let schema = schema_of(object["kind"].as_str().unwrap());
    let mut problems = Vec::new();
    openapi_violations(&schema, route, "", &mut problems);
    if problems.is_empty()
        && let Err(errors) = Validator::new().validate_with_defaults(&schema, route, None)
    {
        problems.extend(errors.iter().map(|e| e.to_string()));
    }
    problems
}

/// Whether standalone mode rejects `object`: parsing plus compile (with a route and a Secret for
/// the budgets to refer to).
fn compile_rejects(object: &Value) -> Vec<String> {
    let mut yaml = serde_yaml::to_string(object).unwrap();
    if object["kind"] == "ApiKeyBudget" {
        yaml = format!(
            "{yaml}---\n{}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: key, namespace: team-a}}\nstringData: {{key: sk-1}}\n",
            serde_yaml::to_string(&valid_route()).unwrap()
        );
    }
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    parse_file("route.yaml", &yaml, &mut docs, &mut errors);
    if errors.is_empty()
        && let Err(e) =
            compile(&docs, &MapResolver::new(&[("OPENAI_API_KEY", "sk-env")], &[("/keys/openai", "sk-file\n")]))
    {
        errors = e.0;
    }
    errors.iter().map(ToString::to_string).collect()
}

fn valid_route() -> Value {
    serde_json::json!({
        "apiVersion": "sideyard.dev/v1alpha1",
        "kind": "ProviderRoute",
        "metadata": {"name": "chat", "namespace": "team-a"},
        "spec": {
            "model": "chat",
            "aliases": ["gpt-4o"],
            "workloadSelector": {"matchLabels": {"app": "support-bot"}},
            "targets": [
                {
                    "name": "openai", "provider": "OpenAI", "api": "openai", "baseUrl": "https://api.openai.com/v1",
                    "model": "gpt-4o-2024-08-06", "credentials": {"env": "OPENAI_API_KEY"},
                    "headers": {"OpenAI-Organization": "org-1"}, "weight": 3,
                    "pricing": {"prompt": "2.50", "completion": "10.00", "cachedPrompt": "1.25", "request": "0"},
                    "contextWindow": 128000, "timeouts": {"connect": "2s", "firstByte": "20s", "total": "10m"}
                },
                {"name": "backup", "baseUrl": "http://10.0.0.7:8000/v1", "credentials": {"file": "/keys/openai"}},
                {"name": "demo", "api": "mock", "baseUrl": "mock://local?latency=5ms"}
            ],
            "strategy": "weighted",
            "fallback": {"when": ["connect", "timeout", "429", "5xx", "4xx-context-length", "4xx"], "maxAttempts": 3},
            "health": {"consecutiveFailures": 3, "baseEjection": "10s", "maxEjection": "5m"},
            "holdBack": "2s",
            "hedge": {"after": "800ms"}
        }
    })
}

/// Applies a change to the valid route, given as a JSON pointer and a value (`null` removes).
fn mutated(pointer: &str, value: Value) -> Value {
    let mut route = valid_route();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = route.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}"));
    match (parent, value) {
        (Value::Object(map), Value::Null) => {
            map.remove(key);
        }
        (Value::Object(map), v) => {
            map.insert(key.to_string(), v);
        }
        (Value::Array(list), v) => list[key.parse::<usize>().unwrap()] = v,
        _ => panic!("cannot set {pointer}"),
    }
    route
}

fn valid_budget() -> Value {
    serde_json::json!({
        "apiVersion": "sideyard.dev/v1alpha1",
        "kind": "ApiKeyBudget",
        "metadata": {"name": "support-bot", "namespace": "team-a"},
        "spec": {
            "key": {"secretRef": {"name": "key", "key": "key"}},
            "limit": "100.00",
            "period": "weekly",
            "lowBalanceThreshold": "10",
            "onLedgerUnavailable": "failOpen",
            "maxDebt": "5.00",
            "allowedModels": ["chat", "gpt-4o"],
            "rateLimit": {"requestsPerMinute": 600, "tokensPerMinute": 200000},
            "workloadSelector": {"matchLabels": {"app": "support-bot"}}
        }
    })
}

#[test]
fn the_valid_budget_is_accepted_by_both() {
    assert_eq!(schema_rejects(&valid_budget()), Vec::<String>::new());
    assert_eq!(compile_rejects(&valid_budget()), Vec::<String>::new());
    let by_hash = mutated_budget("/spec/key", serde_json::json!({"sha256": "a".repeat(64)}));
    assert_eq!(compile_rejects(&by_hash), Vec::<String>::new());
}

fn mutated_budget(pointer: &str, value: Value) -> Value {
    let mut budget = valid_budget();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = budget.pointer_mut(parent).unwrap().as_object_mut().unwrap();
    if value.is_null() {
        parent.remove(key);
    } else {
        parent.insert(key.to_string(), value);
    }
    budget
}

#[test]
fn the_schema_and_standalone_mode_reject_the_same_budgets() {
    use serde_json::json;
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "two key sources",
            "/spec/key",
            json!({"secretRef": {"name": "key", "key": "key"}, "sha256": "a".repeat(64)}),
            "key",
        ),
        ("no key source", "/spec/key", json!({}), "key"),
        ("uppercase sha256", "/spec/key", json!({"sha256": "A".repeat(64)}), "sha256"),
        ("short sha256", "/spec/key", json!({"sha256": "abc"}), "sha256"),
        ("limit with 7 decimals", "/spec/limit", json!("1.0000001"), "limit"),
        ("negative limit", "/spec/limit", json!("-5"), "limit"),
        ("unknown period", "/spec/period", json!("yearly"), "period"),
        ("threshold without limit", "/spec/limit", Value::Null, "lowBalanceThreshold"),
        ("unknown ledger policy", "/spec/onLedgerUnavailable", json!("ignore"), "onLedgerUnavailable"),
        ("debt allowed while failing closed", "/spec/onLedgerUnavailable", json!("failClosed"), "maxDebt"),
        ("debt allowed by default policy", "/spec/onLedgerUnavailable", Value::Null, "maxDebt"),
        ("debt that is no decimal", "/spec/maxDebt", json!("lots"), "maxDebt"),
        ("empty rate limit", "/spec/rateLimit", json!({}), "rateLimit"),
        ("zero requests per minute", "/spec/rateLimit", json!({"requestsPerMinute": 0}), "rateLimit"),
        ("model with a space", "/spec/allowedModels", json!(["my model"]), "allowedModels"),
        ("missing key", "/spec/key", Value::Null, "key"),
    ];
    let mut failures = Vec::new();
    for (what, pointer, value, field) in cases {
        check(&mut failures, what, &mutated_budget(pointer, value), field);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn budgets_print_their_spend() {
    let crds = api::crds();
    let crd = serde_json::to_value(crds.iter().find(|c| c.spec.names.kind == "ApiKeyBudget").unwrap()).unwrap();
    assert_eq!(crd["spec"]["names"]["shortNames"], serde_json::json!(["akb"]));
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Limit", "Spent", "Remaining", "State", "Ready", "Age"]);
}

#[test]
fn the_valid_route_is_accepted_by_both() {
    let route = valid_route();
    assert_eq!(schema_rejects(&route), Vec::<String>::new());
    assert_eq!(compile_rejects(&route), Vec::<String>::new());
    let _: ProviderRoute = serde_json::from_value(route).unwrap();
}

#[test]
fn the_schema_and_standalone_mode_reject_the_same_routes() {
    use serde_json::json;
    let target = |overrides: Value| {
        let mut t = json!({"name": "t", "baseUrl": "https://api.example.com/v1"});
        for (k, v) in overrides.as_object().unwrap() {
            t[k] = v.clone();
        }
        t
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("duplicate target names", json!([target(json!({})), target(json!({}))]), "target"),
        ("no targets", json!([]), "targets"),
        ("17 targets", Value::Array((0..17).map(|i| target(json!({"name": format!("t{i}")}))).collect()), "targets"),
        (
            "two credential sources",
            json!([target(json!({"credentials": {"env": "OPENAI_API_KEY", "file": "/keys/openai"}}))]),
            "credentials",
        ),
        ("no credential source", json!([target(json!({"credentials": {}}))]), "credentials"),
        ("openai without baseUrl", json!([{"name": "t"}]), "baseUrl"),
        ("mock with an https baseUrl", json!([target(json!({"api": "mock"}))]), "baseUrl"),
        ("openai with a mock baseUrl", json!([target(json!({"baseUrl": "mock://local"}))]), "baseUrl"),
        ("unknown api", json!([target(json!({"api": "gemini"}))]), "api"),
        ("anthropic baseUrl with /v1", json!([target(json!({"api": "anthropic"}))]), "baseUrl"),
        (
            "nativeResponses on an anthropic target",
            json!([target(
                json!({"api": "anthropic", "baseUrl": "https://api.anthropic.com", "nativeResponses": true})
            )]),
            "nativeResponses",
        ),
        ("bad target name", json!([target(json!({"name": "Bad_Name"}))]), "name"),
        ("bad provider label", json!([target(json!({"provider": "-x"}))]), "provider"),
        ("weight 0", json!([target(json!({"weight": 0}))]), "weight"),
        ("weight 1001", json!([target(json!({"weight": 1001}))]), "weight"),
        ("negative weight", json!([target(json!({"weight": -1}))]), "weight"),
        ("price with 7 decimals", json!([target(json!({"pricing": {"prompt": "0.0000001"}}))]), "pricing"),
        ("price as a number", json!([target(json!({"pricing": {"prompt": 2.5}}))]), "pricing"),
        ("negative price", json!([target(json!({"pricing": {"completion": "-1"}}))]), "pricing"),
        ("context window 0", json!([target(json!({"contextWindow": 0}))]), "contextWindow"),
        ("bad duration", json!([target(json!({"timeouts": {"connect": "2 seconds"}}))]), "timeouts"),
        ("connect over total", json!([target(json!({"timeouts": {"connect": "20s", "total": "10s"}}))]), "timeouts"),
        ("firstByte over total", json!([target(json!({"timeouts": {"firstByte": "11m"}}))]), "timeouts"),
        ("model with a space", json!([target(json!({"model": "gpt 4"}))]), "model"),
        (
            "33 headers",
            json!([target(
                json!({"headers": (0..33).map(|i| (format!("x-h{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()})
            )]),
            "headers",
        ),
    ];
    let mut failures = Vec::new();
    for (what, targets, field) in cases {
        check(&mut failures, what, &mutated("/spec/targets", targets), field);
    }
    let spec_cases: Vec<(&str, &str, Value, &str)> = vec![
        ("unknown strategy", "/spec/strategy", json!("fastest"), "strategy"),
        ("model with a space", "/spec/model", json!("my model"), "model"),
        ("empty model", "/spec/model", json!(""), "model"),
        ("duplicate aliases", "/spec/aliases", json!(["a", "a"]), "aliases"),
        ("alias repeats model", "/spec/aliases", json!(["chat"]), "aliases"),
        ("unknown fallback reason", "/spec/fallback/when", json!(["connect", "4xx-content-filter"]), "fallback"),
        ("bad holdBack", "/spec/holdBack", json!("2 s"), "holdBack"),
        ("hedge without after", "/spec/hedge", json!({}), "hedge"),
        ("bad hedge duration", "/spec/hedge", json!({"after": "soon"}), "hedge"),
        ("hedge after hold-back ends", "/spec/hedge", json!({"after": "2s"}), "hedge"),
        ("hedge without hold-back", "/spec/holdBack", json!("0s"), "hedge"),
        ("maxAttempts 0", "/spec/fallback/maxAttempts", json!(0), "maxAttempts"),
        ("maxAttempts 17", "/spec/fallback/maxAttempts", json!(17), "maxAttempts"),
        ("consecutiveFailures 0", "/spec/health/consecutiveFailures", json!(0), "consecutiveFailures"),
        ("baseEjection over maxEjection", "/spec/health/baseEjection", json!("10m"), "health"),
        ("bad ejection duration", "/spec/health/maxEjection", json!("forever"), "maxEjection"),
        ("missing targets", "/spec/targets", Value::Null, "targets"),
        ("unknown serves", "/spec/serves", json!("images"), "serves"),
    ];
    for (what, pointer, value, field) in spec_cases {
        check(&mut failures, what, &mutated(pointer, value), field);
    }
    let mut anthropic_embeddings = mutated("/spec/serves", json!("embeddings"));
    anthropic_embeddings["spec"]["targets"] =
        json!([target(json!({"api": "anthropic", "baseUrl": "https://api.anthropic.com"}))]);
    check(&mut failures, "an embeddings route with an anthropic target", &anthropic_embeddings, "api");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check(failures: &mut Vec<String>, what: &str, route: &Value, field: &str) {
    let by_schema = schema_rejects(route);
    let by_compile = compile_rejects(route);
    if by_schema.is_empty() {
        failures.push(format!("{what}: the schema accepts it"));
    }
    if by_compile.is_empty() {
        failures.push(format!("{what}: standalone mode accepts it"));
    } else if !by_compile.iter().any(|e| e.contains(field)) {
        failures.push(format!("{what}: standalone mode's error does not name {field}: {by_compile:?}"));
    }
}
