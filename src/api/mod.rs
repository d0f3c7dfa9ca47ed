//! The Kubernetes API of Sideyard: custom resource types, their schemas and validation rules.

mod api_key_budget;
mod provider_route;
pub mod units;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use api_key_budget::*;
pub use provider_route::*;

/// API group of every Sideyard resource.
pub const GROUP: &str = "sideyard.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Sideyard resource.
pub const API_VERSION: &str = "sideyard.dev/v1alpha1";

/// Every CustomResourceDefinition Sideyard installs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ProviderRoute::crd(), ApiKeyBudget::crd()].into_iter().map(with_known_formats).collect()
}

/// The CRD with only the integer formats the API server knows: schemars writes `uint32` and
/// `uint64`, which it warns about on every write. A `uint32` keeps its bound as a `maximum`.
fn with_known_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(node: &mut serde_json::Value) {
        match node {
            serde_json::Value::Object(map) => {
                let format = map.get("format").and_then(serde_json::Value::as_str).map(str::to_owned);
                match format.as_deref() {
                    Some("uint32") => {
                        map.remove("format");
                        map.entry("maximum").or_insert_with(|| u32::MAX.into());
                    }
                    Some("uint64" | "uint" | "uint16" | "uint8" | "int16" | "int8") => {
                        map.remove("format");
                    }
                    _ => {}
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    // A CRD is plain data: it serialises, and what it serialised to reads back.
    let Ok(mut value) = serde_json::to_value(&crd) else { return crd };
    if let Some(versions) = value.pointer_mut("/spec/versions") {
        walk(versions);
    }
    serde_json::from_value(value).unwrap_or(crd)
}

/// The structural schema (`openAPIV3Schema`, as JSON) of the kind `kind` of [`API_VERSION`]:
/// what the API server checks a document against before it stores it.
pub fn schema_of(kind: &str) -> Option<serde_json::Value> {
    let crd = crds().into_iter().find(|crd| crd.spec.names.kind == kind)?;
    let version = crd.spec.versions.into_iter().find(|v| v.name == VERSION)?;
    serde_json::to_value(version.schema?.open_api_v3_schema?).ok()
}

/// The CRDs as one multi-document YAML stream, as `sideyard crd` prints and `crds/` holds.
pub fn crds_yaml() -> String {
    yaml_of(crds())
}

/// The CRDs for the sideyard-crds Helm chart: marked `helm.sh/resource-policy: keep`, so that
/// uninstalling the chart does not delete every ProviderRoute and ApiKeyBudget with them.
pub fn crds_helm_yaml() -> String {
    let mut crds = crds();
    for crd in &mut crds {
        crd.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("helm.sh/resource-policy".into(), "keep".into());
    }
    yaml_of(crds)
}

fn yaml_of(crds: Vec<CustomResourceDefinition>) -> String {
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        // A CRD is plain data; serialising it cannot fail.
        out.push_str(&serde_yaml::to_string(&crd).expect("CRD serialises to YAML"));
    }
    out
}
