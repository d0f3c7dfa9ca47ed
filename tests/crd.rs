//! The CRDs: `crds/` matches the code, the schema's CEL rules compile and fit the API server's
//! cost budget, and the schema (OpenAPI constraints plus CEL) and the compile step of standalone
//! mode accept and reject the same ProviderRoutes.

mod common;

use kube::core::cel::{Validator, compile_schema, estimate_rule_cost};
use regex::Regex;
use serde_json::Value;
use sideyard::api::{self, ProviderRoute};
use sideyard::config::{Documents, MapResolver, compile, parse_file};

use common::crd_cases::{Case, mutated_budget, refused_budgets, refused_routes, valid_budget, valid_route};

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
    assert_eq!(rules, 19, "every rule of both CRDs is checked");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn unit_patterns_match_their_parsers() {
    use sideyard::api::units::*;
    let duration = Regex::new(DURATION_PATTERN).unwrap();
    let bounds = [
        "99999h",
        "100000h",
        "999999999h",
        "9999999m",
        "10000000m",
        "999999999s",
        "1000000000s",
        "999999999ms",
        "1h2m3s4ms",
        "1h1h1h1h",
        "1h1h1h1h1h",
        "99999h9999999m999999999s999999999ms",
    ];
    for s in ["0s", "800ms", "2s", "5m", "1h", "1h30m", "1m500ms", "", "2", "2 s", "1.5s", "-1s", "2d", "ms", "1msx"]
        .into_iter()
        .chain(bounds)
    {
        assert_eq!(duration.is_match(s), parse_duration(s).is_ok(), "duration {s:?}");
    }
    let decimal = Regex::new(DECIMAL_PATTERN).unwrap();
    for s in ["0", "2.50", "0.000125", "10", "", ".5", "5.", "1.1234567", "-1", "1e3", "1,5", " 1", "1000000000000"] {
        assert_eq!(decimal.is_match(s), parse_micros(s).is_ok(), "decimal {s:?}");
    }
}

/// Violations of the OpenAPI constraints this CRD uses (the API server checks them before CEL),
/// in the API server's words, so that the shared table's `says` holds for both.
fn openapi_violations(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let child = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    let type_name = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let wrong_type = |out: &mut Vec<String>, expected: &str| {
        out.push(format!("{path} in body must be of type {expected}: \"{}\"", type_name(value)));
    };
    if value.is_null() {
        if !schema["nullable"].as_bool().unwrap_or(false) {
            wrong_type(out, schema["type"].as_str().unwrap_or("object"));
        }
        return;
    }
    let bound = |key: &str| schema[key].as_f64().map(|b| b as i64);
    match schema["type"].as_str() {
        Some("object") => {
            let Some(map) = value.as_object() else { return wrong_type(out, "object") };
            for required in schema["required"].as_array().into_iter().flatten() {
                if !map.contains_key(required.as_str().unwrap()) {
                    out.push(format!("{}: Required value", child(required.as_str().unwrap())));
                }
            }
            if let Some(max) = bound("maxProperties")
                && map.len() as i64 > max
            {
                out.push(format!("{path}: Too many: {}: must have at most {max} items", map.len()));
            }
            for (k, v) in map {
                if let Some(property) = schema["properties"].get(k) {
                    openapi_violations(property, v, &child(k), out);
                } else if let Some(property) = schema.get("additionalProperties") {
                    openapi_violations(property, v, &child(k), out);
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else { return wrong_type(out, "array") };
            if let Some(min) = bound("minItems")
                && (items.len() as i64) < min
            {
                out.push(format!("{path} in body should have at least {min} items"));
            }
            if let Some(max) = bound("maxItems")
                && items.len() as i64 > max
            {
                out.push(format!("{path}: Too many: {}: must have at most {max} items", items.len()));
            }
            for (i, item) in items.iter().enumerate() {
                openapi_violations(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        Some("string") => {
            let Some(s) = value.as_str() else { return wrong_type(out, "string") };
            let len = s.chars().count() as i64;
            if let Some(min) = bound("minLength")
                && len < min
            {
                out.push(format!("{path} in body should be at least {min} chars long"));
            }
            if let Some(max) = bound("maxLength")
                && len > max
            {
                out.push(format!("{path} in body should be at most {max} chars long"));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && !Regex::new(pattern).unwrap().is_match(s)
            {
                out.push(format!("{path} in body should match '{pattern}'"));
            }
            if let Some(allowed) = schema["enum"].as_array()
                && !allowed.contains(value)
            {
                out.push(format!("{path}: Unsupported value: {value}"));
            }
        }
        Some("integer") => {
            let Some(n) = value.as_i64() else { return wrong_type(out, "integer") };
            if let Some(min) = bound("minimum")
                && n < min
            {
                out.push(format!("{path} in body should be greater than or equal to {min}"));
            }
            if let Some(max) = bound("maximum")
                && n > max
            {
                out.push(format!("{path} in body should be less than or equal to {max}"));
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
        // In the API server's words: `path: Invalid value: message`.
        problems.extend(errors.iter().map(|e| {
            let text = e.to_string();
            match text.split_once(": ") {
                Some((path, message)) => format!("{path}: Invalid value: {message}"),
                None => text,
            }
        }));
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

#[test]
fn the_valid_budget_is_accepted_by_both() {
    assert_eq!(schema_rejects(&valid_budget()), Vec::<String>::new());
    assert_eq!(compile_rejects(&valid_budget()), Vec::<String>::new());
    let by_hash = mutated_budget("/spec/key", serde_json::json!({"sha256": "a".repeat(64)}));
    assert_eq!(compile_rejects(&by_hash), Vec::<String>::new());
}

#[test]
fn the_schema_and_standalone_mode_reject_the_same_budgets() {
    let mut failures = Vec::new();
    for case in refused_budgets() {
        check(&mut failures, &case);
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
    assert_eq!(columns, ["Parent", "Limit", "Spent", "Remaining", "State", "Ready", "Age"]);
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/budgets.md")).unwrap();
    let (last, rest) = columns.split_last().unwrap();
    let listed = format!("`kubectl get akb` shows {} and {last}.", rest.join(", "));
    assert!(docs.contains(&listed), "docs/budgets.md lists the columns: {listed}");
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
    let mut failures = Vec::new();
    for case in refused_routes() {
        check(&mut failures, &case);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check(failures: &mut Vec<String>, case: &Case) {
    let by_schema = schema_rejects(&case.object);
    let by_compile = compile_rejects(&case.object);
    let what = case.what;
    if by_schema.is_empty() {
        failures.push(format!("{what}: the schema accepts it"));
    } else if !by_schema.iter().any(|e| e.contains(case.says)) {
        failures.push(format!("{what}: the schema's errors do not say {:?}: {by_schema:?}", case.says));
    }
    if by_compile.is_empty() {
        failures.push(format!("{what}: standalone mode accepts it"));
    } else if !by_compile.iter().any(|e| e.contains(case.field)) {
        failures.push(format!("{what}: standalone mode's error does not name {}: {by_compile:?}", case.field));
    }
}
