//! The Kubernetes API of Switchyard: custom resource types, their schemas and validation rules.

mod api_key_budget;
mod provider_route;
pub mod units;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use api_key_budget::*;
pub use provider_route::*;

/// API group of every Switchyard resource.
pub const GROUP: &str = "switchyard.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Switchyard resource.
pub const API_VERSION: &str = "switchyard.dev/v1alpha1";

/// Every CustomResourceDefinition Switchyard installs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ProviderRoute::crd(), ApiKeyBudget::crd()]
}

/// The CRDs as one multi-document YAML stream, as `switchyard crd` prints and `crds/` holds.
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        // A CRD is plain data; serialising it cannot fail.
        out.push_str(&serde_yaml::to_string(&crd).expect("CRD serialises to YAML"));
    }
    out
}
