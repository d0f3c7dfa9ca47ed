//! The operator, the CRDs, the chart's RBAC, the webhook and the ledger against a real
//! kube-apiserver and etcd, envtest-style (docs/development.md#envtest): one API server for this
//! test binary, a namespace per test. Without assets every test says loudly that it skipped;
//! with `SIDEYARD_REQUIRE_ENVTEST=1` a missing asset fails instead.

#[path = "../common/mod.rs"]
mod common;

mod crds;
mod ledger;
mod operator;
mod push;
mod server;
mod teams;
mod traces;
mod webhook;

use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;

pub use server::{ApiServer, api_server};

/// The API server with the CRDs installed (once, with kubectl, as a user installs them), or
/// `None` when the suite is skipped.
pub fn cluster() -> Option<&'static ApiServer> {
    static CRDS: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let server = api_server()?;
    CRDS.get_or_init(|| {
        let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/sideyard.yaml");
        let out = server.kubectl(&["apply", "-f", crds]);
        assert!(out.status.success(), "kubectl apply -f crds/: {}", String::from_utf8_lossy(&out.stderr));
        let out = server.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/providerroutes.sideyard.dev",
            "crd/apikeybudgets.sideyard.dev",
        ]);
        assert!(out.status.success(), "CRDs not established: {}", String::from_utf8_lossy(&out.stderr));
    });
    Some(server)
}

/// A fresh namespace for one test, labelled with `labels`, with its `default` ServiceAccount (no
/// controller creates it here).
pub async fn namespace(client: &kube::Client, prefix: &str, labels: serde_json::Value) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("namespace");
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), &name)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create the default ServiceAccount");
    name
}

/// Skips the test (the server module has said why) when there is no API server.
#[macro_export]
macro_rules! cluster_or_skip {
    () => {
        match $crate::cluster() {
            Some(server) => server,
            None => return,
        }
    };
}
