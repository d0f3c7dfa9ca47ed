//! The CRDs as the real API server reads them: applied by kubectl (a YAML 1.1 reader) and by
//! server-side apply, every example accepted without a warning, printer columns.

use std::process::Output;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::Value;

use crate::common::crd_cases::{refused_budgets, refused_routes, valid_budget, valid_route};
use crate::common::helm::yaml_blocks;
use crate::{cluster_or_skip, namespace};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn the_generated_crds_apply_server_side_over_what_kubectl_applied_without_warnings() {
    let server = cluster_or_skip!();
    let client = server.admin().await;
    let crds = Api::<CustomResourceDefinition>::all(client);
    for crd in sideyard::api::crds() {
        let name = crd.metadata.name.clone().expect("name");
        let patch = PatchParams::apply("sideyard-envtest").force();
        let stored = crds.patch(&name, &patch, &Patch::Apply(&crd)).await.expect("server-side apply of the CRD");
        let established = stored
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not established");
    }
    // kubectl prints the API server's warnings (unknown formats, deprecated fields) on stderr.
    let out =
        server.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &format!("{ROOT}/crds/sideyard.yaml")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("Warning"), "the API server warns about the CRDs: {}", stderr(&out));
}

/// Every ProviderRoute and ApiKeyBudget the examples and the docs show, as the objects they are.
fn documented_objects() -> Vec<(String, Value)> {
    let mut sources: Vec<(String, String)> = Vec::new();
    for dir in ["examples", "docs"] {
        let mut files: Vec<_> =
            std::fs::read_dir(format!("{ROOT}/{dir}")).expect("dir").map(|e| e.expect("entry").path()).collect();
        files.sort();
        for file in files {
            let read = || std::fs::read_to_string(&file).expect("read");
            match file.extension().and_then(|e| e.to_str()) {
                Some("yaml") => sources.push((file.display().to_string(), read())),
                Some("md") => {
                    for (i, block) in yaml_blocks(&read()).into_iter().enumerate() {
                        sources.push((format!("{} (yaml block {})", file.display(), i + 1), block));
                    }
                }
                _ => {}
            }
        }
    }
    let mut objects = Vec::new();
    for (source, text) in sources {
        for document in serde_yaml::Deserializer::from_str(&text) {
            let Ok(object) = <Value as serde::Deserialize>::deserialize(document) else { continue };
            if ["ProviderRoute", "ApiKeyBudget"].contains(&object["kind"].as_str().unwrap_or_default()) {
                objects.push((source.clone(), object));
            }
        }
    }
    objects
}

#[tokio::test]
async fn every_route_and_budget_in_the_examples_and_docs_is_accepted_without_a_warning() {
    let server = cluster_or_skip!();
    let client = server.admin().await;
    let ns = namespace(&client, "documented", serde_json::json!({})).await;
    let objects = documented_objects();
    assert!(objects.len() >= 6, "found only {} documented objects", objects.len());
    let mut failures = Vec::new();
    for (source, mut object) in objects {
        object["metadata"]["namespace"] = ns.clone().into();
        let out = server.kubectl_as(
            &server.admin_kubeconfig,
            &["create", "--dry-run=server", "-o", "name", "-f", "-"],
            Some(&object.to_string()),
        );
        let name = format!("{source}: {} {}", object["kind"], object["metadata"]["name"]);
        if !out.status.success() {
            failures.push(format!("{name}: refused: {}", stderr(&out)));
        } else if stderr(&out).contains("Warning") {
            failures.push(format!("{name}: warned: {}", stderr(&out)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The API server's answer to creating `object` in `ns` (dry run): None when it is accepted, or
/// kubectl's error message.
fn refusal(server: &crate::ApiServer, ns: &str, object: &Value) -> Option<String> {
    let mut object = object.clone();
    object["metadata"]["namespace"] = ns.into();
    let out = server.kubectl_as(
        &server.admin_kubeconfig,
        &["create", "--dry-run=server", "-o", "name", "-f", "-"],
        Some(&object.to_string()),
    );
    (!out.status.success()).then(|| stderr(&out))
}

#[tokio::test]
async fn the_api_server_refuses_every_case_of_the_offline_table() {
    let server = cluster_or_skip!();
    let client = server.admin().await;
    let ns = namespace(&client, "refused", serde_json::json!({})).await;
    let mut failures = Vec::new();
    let cases: Vec<_> = refused_routes().into_iter().chain(refused_budgets()).collect();
    assert!(cases.len() > 50, "the whole table runs");
    for case in cases {
        match refusal(server, &ns, &case.object) {
            None => failures.push(format!("{}: accepted", case.what)),
            Some(message) if message.contains("type conversion error") => {
                failures.push(format!("{}: a CEL conversion error beside ours: {message}", case.what))
            }
            Some(message) if !message.contains(case.says) => {
                failures.push(format!("{}: the API server does not say {:?}: {message}", case.what, case.says))
            }
            Some(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The longest durations the schema accepts are ones the API server's CEL rules can convert; one
/// digit more is refused by the pattern, with our message rather than a conversion error.
#[tokio::test]
async fn every_duration_the_schema_accepts_converts_in_cel() {
    let server = cluster_or_skip!();
    let client = server.admin().await;
    let ns = namespace(&client, "durations", serde_json::json!({})).await;
    let longest = "99999h9999999m999999999s999999999ms";
    let mut route = valid_route();
    route["spec"]["health"] = serde_json::json!({"baseEjection": longest, "maxEjection": longest});
    route["spec"]["holdBack"] = longest.into();
    route["spec"]["targets"][0]["timeouts"] =
        serde_json::json!({"connect": longest, "firstByte": longest, "total": longest});
    assert_eq!(refusal(server, &ns, &route), None);
    for (pointer, too_long) in [("/spec/holdBack", "100000h"), ("/spec/health/baseEjection", "999999999h")] {
        let mut route = valid_route();
        *route.pointer_mut(pointer).expect("field") = too_long.into();
        let message = refusal(server, &ns, &route).unwrap_or_else(|| panic!("{pointer}: {too_long} accepted"));
        assert!(message.contains("in body should match"), "{pointer}: {message}");
        assert!(!message.contains("type conversion error"), "{pointer}: {message}");
    }
}

/// kubectl asks for strict field validation: a misspelt field is refused, naming it; a client
/// that does not ask has it pruned, never stored.
#[tokio::test]
async fn unknown_fields_are_refused_by_kubectl_and_pruned_otherwise() {
    let server = cluster_or_skip!();
    let client = server.admin().await;
    let ns = namespace(&client, "unknown-fields", serde_json::json!({})).await;
    let mut route = valid_route();
    route["metadata"]["namespace"] = ns.clone().into();
    route["spec"]["fallbak"] = serde_json::json!({"maxAttempts": 2});
    let out = server.kubectl_as(&server.admin_kubeconfig, &["apply", "-f", "-"], Some(&route.to_string()));
    assert!(!out.status.success(), "kubectl applied an unknown field");
    assert!(stderr(&out).contains(r#"unknown field "spec.fallbak""#), "{}", stderr(&out));

    let routes: Api<DynamicObject> = Api::namespaced_with(client, &ns, &route_resource());
    let object: DynamicObject = serde_json::from_value(route).expect("object");
    let stored = routes.create(&PostParams::default(), &object).await.expect("created without strict validation");
    assert_eq!(stored.data["spec"].get("fallbak"), None, "an unknown field is pruned");
    assert_eq!(stored.data["spec"]["model"], "chat");
}

fn route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("sideyard.dev", "v1alpha1", "ProviderRoute"),
        "providerroutes",
    )
}

/// The printer columns `kubectl get` shows, with what the operator-free object has.
#[tokio::test]
async fn kubectl_get_prints_the_documented_columns() {
    let server = cluster_or_skip!();
    let client = server.admin().await;
    let ns = namespace(&client, "columns", serde_json::json!({})).await;
    let mut route = valid_route();
    route["metadata"]["namespace"] = ns.clone().into();
    let out = server.kubectl_as(&server.admin_kubeconfig, &["apply", "-f", "-"], Some(&route.to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.kubectl(&["get", "proute", "-n", &ns]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "MODEL", "STRATEGY", "TARGETS", "READY", "AGE"], "{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..3], ["chat", "chat", "weighted"], "{table}");

    let mut budget = valid_budget();
    budget["metadata"]["namespace"] = ns.clone().into();
    budget["spec"]["parent"] = "team".into();
    let out = server.kubectl_as(&server.admin_kubeconfig, &["apply", "-f", "-"], Some(&budget.to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&server.kubectl(&["get", "akb", "-n", &ns]).stdout).into_owned();
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "PARENT", "LIMIT", "SPENT", "REMAINING", "STATE", "READY", "AGE"], "{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..3], ["support-bot", "team", "100.00"], "{table}");
}
