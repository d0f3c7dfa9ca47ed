//! Sidecar injection: a pure `inject(pod) -> pod`, shared by the admission webhook and
//! `sideyard inject`.
//!
//! The injected pod runs `sideyard sidecar` on its namespace's `sideyard-config` Secret, with
//! the pod's labels from the downward API for `workloadSelector`. The status annotation makes
//! injection idempotent: a pod that carries it is left as it is.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EmptyDirVolumeSource,
    EnvVar, HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::plan::{CONFIG_GROUP_LABEL, CONFIG_KEY, CONFIG_SECRET, config_group, group_key};

/// Namespace label that turns injection on (`enabled`), and pod label that opts a pod in or out
/// (`true`, `false`).
pub const INJECT_LABEL: &str = "sideyard.dev/inject";
/// Records what was injected; its presence makes injection a no-op.
pub const STATUS_ANNOTATION: &str = "sideyard.dev/status";
pub const IMAGE_ANNOTATION: &str = "sideyard.dev/image";
pub const LOG_LEVEL_ANNOTATION: &str = "sideyard.dev/log-level";
pub const CPU_REQUEST_ANNOTATION: &str = "sideyard.dev/proxy-cpu-request";
pub const MEMORY_REQUEST_ANNOTATION: &str = "sideyard.dev/proxy-memory-request";
pub const MEMORY_LIMIT_ANNOTATION: &str = "sideyard.dev/proxy-memory-limit";
/// `"false"`: inject a regular container instead of a native sidecar (clusters before 1.29).
pub const NATIVE_SIDECAR_ANNOTATION: &str = "sideyard.dev/native-sidecar";
pub const ACCESS_LOG_ANNOTATION: &str = "sideyard.dev/access-log";
pub const GENERATIONS_ANNOTATION: &str = "sideyard.dev/generations";
pub const OTLP_ENDPOINT_ANNOTATION: &str = "sideyard.dev/otlp-endpoint";
pub const TRACE_SAMPLING_ANNOTATION: &str = "sideyard.dev/trace-sampling-ratio";
/// The most records a pod may ask its sidecar to keep (about a kilobyte each).
pub const MAX_GENERATIONS: u32 = 100_000;
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// The injected container's name.
pub const CONTAINER_NAME: &str = "sideyard";
pub const API_PORT: u16 = 7700;
pub const ADMIN_PORT: i32 = 7701;
/// The name of the sidecar's admin port (metrics, health), which the chart's PodMonitor scrapes.
pub const ADMIN_PORT_NAME: &str = "sy-admin";
const CONFIG_VOLUME: &str = "sideyard-config";
const POD_INFO_VOLUME: &str = "sideyard-pod";
const STATE_VOLUME: &str = "sideyard-state";
const TOKEN_VOLUME: &str = "sideyard-token";
const CONFIG_DIR: &str = "/etc/sideyard/config";
const POD_INFO_DIR: &str = "/etc/sideyard/pod";
const STATE_DIR: &str = "/var/run/sideyard";
/// The projected ServiceAccount token the sidecar presents to the operator's budget ledger.
const TOKEN_DIR: &str = "/var/run/secrets/sideyard.dev";
/// The token's audience: the ledger accepts no other, so the token is useless to the API server.
pub const TOKEN_AUDIENCE: &str = "sideyard";
/// The kubelet rotates the token at 80% of this; the sidecar re-reads it.
const TOKEN_SECONDS: i64 = 3600;

/// Cluster-wide defaults (operator flags, chart values); pods override some by annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectParams {
    pub image: String,
    pub native_sidecar: bool,
    /// UID and GID of the sidecar process.
    pub uid: i64,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    pub log_level: String,
    /// The sidecar writes an access line per request.
    pub access_log: bool,
    /// Records the sidecar keeps for `GET /api/v1/generation`; 0: none.
    pub generations: u32,
    /// Where the sidecar exports traces (OTLP/HTTP); empty: nowhere.
    pub otlp_endpoint: String,
    /// The fraction of new traces recorded, as the sidecar's flag takes it.
    pub trace_sampling_ratio: String,
}

impl Default for InjectParams {
    fn default() -> Self {
        InjectParams {
            image: format!("ghcr.io/sideyard/sideyard:{}", env!("CARGO_PKG_VERSION")),
            native_sidecar: true,
            uid: 65532,
            cpu_request: "50m".into(),
            memory_request: "64Mi".into(),
            memory_limit: "256Mi".into(),
            log_level: "info".into(),
            access_log: false,
            generations: 0,
            otlp_endpoint: String::new(),
            trace_sampling_ratio: "1".into(),
        }
    }
}

/// What injection did with a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Injection {
    Injected(Box<Pod>),
    /// Left unchanged, and why.
    Skipped(&'static str),
}

/// The pod with the sidecar, or why it is left alone. An annotation that cannot be used is an
/// error, so the pod is refused with a message instead of failing later.
pub fn inject(pod: &Pod, defaults: &InjectParams) -> Result<Injection, String> {
    let labels = pod.metadata.labels.as_ref();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if labels.and_then(|l| l.get(INJECT_LABEL)).is_some_and(|v| v == "false") {
        return Ok(Injection::Skipped("opted out"));
    }
    let Some(spec) = &pod.spec else { return Ok(Injection::Skipped("no pod spec")) };
    // Only the annotation says so: a container that happens to be named like the sidecar is a
    // clash, refused below.
    if annotations.contains_key(STATUS_ANNOTATION) {
        return Ok(Injection::Skipped("already injected"));
    }
    if spec.host_network == Some(true) {
        // The sidecar's loopback port would be the node's.
        return Ok(Injection::Skipped("host network"));
    }
    clash(spec)?;
    let params = with_overrides(defaults, &annotations)?;

    let mut pod = pod.clone();
    let mut annotations = annotations;
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    if let Some(first) = spec.containers.first() {
        annotations.entry(DEFAULT_CONTAINER_ANNOTATION.into()).or_insert_with(|| first.name.clone());
    }
    for container in &mut spec.containers {
        set_env_defaults(container);
    }
    let sidecar = sidecar_container(&params);
    if params.native_sidecar {
        // First among the init containers, so the ones after it can call providers too.
        spec.init_containers.get_or_insert_with(Vec::new).insert(0, sidecar);
    } else {
        spec.containers.insert(0, sidecar);
    }
    // The pod's configuration group, from its labels as created: it mounts only its group's key,
    // which holds only what selects every pod of the group.
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    let group = config_group(labels);
    labels.insert(CONFIG_GROUP_LABEL.into(), group.clone());
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes(&group));
    let status = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mode": if params.native_sidecar { "native" } else { "container" },
        "image": params.image,
        "containers": [CONTAINER_NAME],
        "volumes": [CONFIG_VOLUME, POD_INFO_VOLUME, STATE_VOLUME, TOKEN_VOLUME],
    });
    annotations.insert(STATUS_ANNOTATION.into(), status.to_string());
    pod.metadata.annotations = Some(annotations);
    Ok(Injection::Injected(Box::new(pod)))
}

/// A name or port of the pod that the sidecar's would clash with. The API server would refuse a
/// duplicate volume with a message that does not say where it came from, and would only warn
/// about a duplicate port, which then fails at run time: the pod is refused here instead, with
/// the clash named.
fn clash(spec: &PodSpec) -> Result<(), String> {
    let way_out = format!("or opt the pod out of injection with the label {INJECT_LABEL}=false");
    let containers = || spec.init_containers.iter().flatten().chain(&spec.containers);
    if let Some(c) = containers().find(|c| c.name == CONTAINER_NAME) {
        return Err(format!("container {:?} is named like the sidecar Sideyard injects: rename it, {way_out}", c.name));
    }
    let ours = [CONFIG_VOLUME, POD_INFO_VOLUME, STATE_VOLUME, TOKEN_VOLUME];
    if let Some(v) = spec.volumes.iter().flatten().find(|v| ours.contains(&v.name.as_str())) {
        return Err(format!("volume {:?} is named like one the Sideyard sidecar adds: rename it, {way_out}", v.name));
    }
    for c in containers() {
        if let Some(p) =
            c.ports.iter().flatten().find(|p| [i32::from(API_PORT), ADMIN_PORT].contains(&p.container_port))
        {
            return Err(format!(
                "container {:?} declares port {}, which the Sideyard sidecar listens on in the pod's network: \
                 move it, {way_out}",
                c.name, p.container_port
            ));
        }
    }
    Ok(())
}

fn with_overrides(defaults: &InjectParams, annotations: &BTreeMap<String, String>) -> Result<InjectParams, String> {
    let mut params = defaults.clone();
    let bad = |key: &str, value: &str, what: &str| format!("annotation {key}: {value:?} is not {what}");
    for (key, field) in [
        (CPU_REQUEST_ANNOTATION, &mut params.cpu_request),
        (MEMORY_REQUEST_ANNOTATION, &mut params.memory_request),
        (MEMORY_LIMIT_ANNOTATION, &mut params.memory_limit),
    ] {
        if let Some(value) = annotations.get(key) {
            if !is_quantity(value) {
                return Err(bad(key, value, "a quantity such as 100m or 128Mi"));
            }
            *field = value.clone();
        }
    }
    if let Some(image) = annotations.get(IMAGE_ANNOTATION) {
        if image.is_empty() || image.chars().any(char::is_whitespace) {
            return Err(bad(IMAGE_ANNOTATION, image, "an image reference"));
        }
        params.image = image.clone();
    }
    if let Some(level) = annotations.get(LOG_LEVEL_ANNOTATION) {
        let ok = !level.is_empty()
            && level.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '=' | ',' | ':' | '-'));
        if !ok {
            return Err(bad(LOG_LEVEL_ANNOTATION, level, "a log filter such as debug or info,sideyard=debug"));
        }
        params.log_level = level.clone();
    }
    for (key, field) in
        [(NATIVE_SIDECAR_ANNOTATION, &mut params.native_sidecar), (ACCESS_LOG_ANNOTATION, &mut params.access_log)]
    {
        match annotations.get(key).map(String::as_str) {
            None => {}
            Some("true") => *field = true,
            Some("false") => *field = false,
            Some(other) => return Err(bad(key, other, "true or false")),
        }
    }
    if let Some(value) = annotations.get(GENERATIONS_ANNOTATION) {
        match value.parse::<u32>() {
            Ok(n) if n <= MAX_GENERATIONS => params.generations = n,
            _ => {
                return Err(bad(
                    GENERATIONS_ANNOTATION,
                    value,
                    &format!("a number of records from 0 to {MAX_GENERATIONS}"),
                ));
            }
        }
    }
    if let Some(url) = annotations.get(OTLP_ENDPOINT_ANNOTATION) {
        let ok = url.is_empty()
            || url
                .parse::<http::Uri>()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            return Err(bad(OTLP_ENDPOINT_ANNOTATION, url, "an http:// or https:// URL of an OTLP/HTTP collector"));
        }
        params.otlp_endpoint = url.clone();
    }
    if let Some(ratio) = annotations.get(TRACE_SAMPLING_ANNOTATION) {
        if !ratio.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r)) {
            return Err(bad(TRACE_SAMPLING_ANNOTATION, ratio, "a ratio from 0 to 1, such as 0.1"));
        }
        params.trace_sampling_ratio = ratio.clone();
    }
    Ok(params)
}

/// A Kubernetes quantity: a decimal number with an optional SI, binary or exponent suffix.
fn is_quantity(s: &str) -> bool {
    let digits = s.trim_start_matches(['+', '-']);
    let number_end = digits.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(digits.len());
    let (number, suffix) = digits.split_at(number_end);
    let valid_number = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let valid_suffix = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|exp| {
        let exp = exp.trim_start_matches(['+', '-']);
        !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
    });
    valid_number && valid_suffix
}

/// Points OpenAI and Anthropic clients at the sidecar, unless the application chose otherwise.
fn set_env_defaults(container: &mut Container) {
    let openai = format!("http://127.0.0.1:{API_PORT}/v1");
    let anthropic = format!("http://127.0.0.1:{API_PORT}");
    let env = container.env.get_or_insert_with(Vec::new);
    for (name, value) in
        [("OPENAI_BASE_URL", &openai), ("OPENAI_API_BASE", &openai), ("ANTHROPIC_BASE_URL", &anthropic)]
    {
        if !env.iter().any(|e| e.name == name) {
            env.push(EnvVar { name: name.into(), value: Some(value.clone()), ..Default::default() });
        }
    }
}

fn sidecar_container(params: &InjectParams) -> Container {
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(params.image.clone()),
        args: Some(
            [
                "sidecar",
                "--file",
                CONFIG_DIR,
                "--pod-labels-file",
                &format!("{POD_INFO_DIR}/labels"),
                "--listen",
                &format!("127.0.0.1:{API_PORT}"),
                "--admin-listen",
                &format!("0.0.0.0:{ADMIN_PORT}"),
                "--state-dir",
                STATE_DIR,
                "--ledger-token-file",
                &format!("{TOKEN_DIR}/token"),
                "--log",
                &params.log_level,
            ]
            .map(String::from)
            .into_iter()
            .chain(params.access_log.then(|| "--access-log".to_string()))
            .chain((params.generations > 0).then(|| format!("--generations={}", params.generations)))
            .chain((!params.otlp_endpoint.is_empty()).then(|| format!("--otlp-endpoint={}", params.otlp_endpoint)))
            .chain(
                (!params.otlp_endpoint.is_empty() && params.trace_sampling_ratio != "1")
                    .then(|| format!("--trace-sampling-ratio={}", params.trace_sampling_ratio)),
            )
            .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity(params.cpu_request.clone())),
                ("memory".into(), Quantity(params.memory_request.clone())),
            ])),
            // No CPU limit: throttling a proxy adds latency to every call.
            limits: Some(BTreeMap::from([("memory".into(), Quantity(params.memory_limit.clone()))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(params.uid),
            run_as_group: Some(params.uid),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        // The application starts once routing is ready (native sidecars block the next container
        // until their startup probe passes).
        startup_probe: Some(probe("/readyz", 1, 120)),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        volume_mounts: Some(vec![
            mount(CONFIG_VOLUME, CONFIG_DIR, true),
            mount(POD_INFO_VOLUME, POD_INFO_DIR, true),
            mount(STATE_VOLUME, STATE_DIR, false),
            mount(TOKEN_VOLUME, TOKEN_DIR, true),
        ]),
        restart_policy: params.native_sidecar.then(|| "Always".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn volumes(group: &str) -> [Volume; 4] {
    [
        Volume {
            name: CONFIG_VOLUME.into(),
            // Not optional: the pod waits for its group's configuration rather than starting
            // without one. Only the group's key is written into the pod, as `config.json`.
            secret: Some(SecretVolumeSource {
                secret_name: Some(CONFIG_SECRET.into()),
                items: Some(vec![KeyToPath { key: group_key(group), path: CONFIG_KEY.into(), mode: None }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: POD_INFO_VOLUME.into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![DownwardAPIVolumeFile {
                    path: "labels".into(),
                    field_ref: Some(ObjectFieldSelector { field_path: "metadata.labels".into(), ..Default::default() }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume { name: STATE_VOLUME.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_SECONDS),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_recognised() {
        for ok in ["50m", "1", "0.5", "128Mi", "1Gi", "2e3", "1E+2", "100k", ".5"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "lots", "1.2.3", "12MB", "m", "1e", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}

/// The sidecar's settings as flags, shared by `sideyard operator` (for the webhook) and
/// `sideyard inject`.
#[derive(clap::Args, Clone, Debug)]
pub struct InjectArgs {
    /// Image of the injected sidecar.
    #[arg(long = "proxy-image", env = "SIDEYARD_PROXY_IMAGE", default_value_t = InjectParams::default().image)]
    pub image: String,

    /// Inject a native sidecar (an init container with `restartPolicy: Always`, Kubernetes 1.29+);
    /// `false` injects a regular container, for older clusters.
    #[arg(long, env = "SIDEYARD_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,

    /// UID and GID the sidecar runs as.
    #[arg(long = "proxy-uid", env = "SIDEYARD_PROXY_UID", default_value_t = 65532)]
    pub uid: i64,

    /// CPU request of the sidecar (no CPU limit is set).
    #[arg(long = "proxy-cpu-request", env = "SIDEYARD_PROXY_CPU_REQUEST", default_value = "50m")]
    pub cpu_request: String,

    /// Memory request of the sidecar.
    #[arg(long = "proxy-memory-request", env = "SIDEYARD_PROXY_MEMORY_REQUEST", default_value = "64Mi")]
    pub memory_request: String,

    /// Memory limit of the sidecar.
    #[arg(long = "proxy-memory-limit", env = "SIDEYARD_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    pub memory_limit: String,

    /// Log filter of the sidecar.
    #[arg(long = "proxy-log-level", env = "SIDEYARD_PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// The sidecar writes one access line per request (`--access-log`).
    #[arg(long = "proxy-access-log", env = "SIDEYARD_PROXY_ACCESS_LOG", default_value_t = false, action = clap::ArgAction::Set)]
    pub access_log: bool,

    /// Records of recent requests the sidecar keeps for `GET /api/v1/generation` (`--generations`).
    #[arg(long = "proxy-generations", env = "SIDEYARD_PROXY_GENERATIONS", default_value_t = 0)]
    pub generations: u32,

    /// Where the sidecar exports traces (an OTLP/HTTP collector, `http://collector:4318`); empty:
    /// no traces.
    #[arg(long = "proxy-otlp-endpoint", env = "SIDEYARD_PROXY_OTLP_ENDPOINT", default_value = "")]
    pub proxy_otlp_endpoint: String,

    /// The fraction of new traces the sidecar records, from 0 to 1.
    #[arg(long = "proxy-trace-sampling-ratio", env = "SIDEYARD_PROXY_TRACE_SAMPLING_RATIO", default_value = "1")]
    pub proxy_trace_sampling_ratio: String,
}

impl InjectArgs {
    /// The settings, checked as a pod's annotations would be.
    pub fn params(&self) -> Result<InjectParams, String> {
        let params = InjectParams {
            image: self.image.clone(),
            native_sidecar: self.native_sidecar,
            uid: self.uid,
            cpu_request: self.cpu_request.clone(),
            memory_request: self.memory_request.clone(),
            memory_limit: self.memory_limit.clone(),
            log_level: self.log_level.clone(),
            access_log: self.access_log,
            generations: self.generations,
            otlp_endpoint: self.proxy_otlp_endpoint.clone(),
            trace_sampling_ratio: self.proxy_trace_sampling_ratio.clone(),
        };
        let as_annotations = BTreeMap::from([
            (IMAGE_ANNOTATION.to_string(), params.image.clone()),
            (CPU_REQUEST_ANNOTATION.to_string(), params.cpu_request.clone()),
            (MEMORY_REQUEST_ANNOTATION.to_string(), params.memory_request.clone()),
            (MEMORY_LIMIT_ANNOTATION.to_string(), params.memory_limit.clone()),
            (LOG_LEVEL_ANNOTATION.to_string(), params.log_level.clone()),
            (GENERATIONS_ANNOTATION.to_string(), params.generations.to_string()),
            (OTLP_ENDPOINT_ANNOTATION.to_string(), params.otlp_endpoint.clone()),
            (TRACE_SAMPLING_ANNOTATION.to_string(), params.trace_sampling_ratio.clone()),
        ]);
        with_overrides(&params, &as_annotations).map_err(|e| {
            // Name the flag, not the annotation it is checked as.
            let flags = [
                (IMAGE_ANNOTATION, "--proxy-image"),
                (LOG_LEVEL_ANNOTATION, "--proxy-log-level"),
                (CPU_REQUEST_ANNOTATION, "--proxy-cpu-request"),
                (MEMORY_REQUEST_ANNOTATION, "--proxy-memory-request"),
                (MEMORY_LIMIT_ANNOTATION, "--proxy-memory-limit"),
                (GENERATIONS_ANNOTATION, "--proxy-generations"),
                (OTLP_ENDPOINT_ANNOTATION, "--proxy-otlp-endpoint"),
                (TRACE_SAMPLING_ANNOTATION, "--proxy-trace-sampling-ratio"),
            ];
            flags.iter().fold(e, |e, (annotation, flag)| e.replace(&format!("annotation {annotation}"), flag))
        })?;
        if params.uid <= 0 {
            return Err("--proxy-uid must be a non-root UID (above 0)".into());
        }
        Ok(params)
    }
}

/// `sideyard inject`: every document of a YAML stream, with the sidecar injected into each Pod
/// and pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, also inside a
/// List); other kinds pass through unchanged. Changes are applied as a JSON Patch to the document
/// itself, so fields this version does not know are kept.
pub fn inject_manifests(text: &str, params: &InjectParams) -> Result<String, String> {
    use serde::Deserialize;
    let mut out = String::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = |e: String| format!("document {}: {e}", i + 1);
        let value = serde_yaml::Value::deserialize(de).map_err(|e| at(format!("invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let mut object = serde_json::to_value(&value).map_err(|e| at(e.to_string()))?;
        inject_object(&mut object, params).map_err(at)?;
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object).map_err(|e| at(e.to_string()))?);
    }
    Ok(out)
}

fn inject_object(object: &mut serde_json::Value, params: &InjectParams) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let template = match kind.as_str() {
        "Pod" => return inject_pod_json(object, params),
        "List" => {
            for item in object["items"].as_array_mut().into_iter().flatten() {
                inject_object(item, params)?;
            }
            return Ok(());
        }
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            object.pointer_mut("/spec/template")
        }
        "CronJob" => object.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => None,
    };
    let Some(template) = template else { return Ok(()) };
    inject_pod_json(template, params).map_err(|e| format!("{kind} {name}: {e}"))
}

/// Injects into a Pod, or a pod template (a Pod without apiVersion and kind), in place.
fn inject_pod_json(pod: &mut serde_json::Value, params: &InjectParams) -> Result<(), String> {
    if !pod.is_object() {
        return Err("the pod template is not a mapping".into());
    }
    // The patch adds annotations under metadata, which a template may leave out.
    pod.as_object_mut().into_iter().for_each(|o| {
        o.entry("metadata").or_insert_with(|| json!({}));
    });
    let mut as_pod = pod.clone();
    as_pod["apiVersion"] = "v1".into();
    as_pod["kind"] = "Pod".into();
    let typed: Pod = serde_json::from_value(as_pod).map_err(|e| format!("not a valid pod: {e}"))?;
    let Injection::Injected(injected) = inject(&typed, params)? else { return Ok(()) };
    let before = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let after = serde_json::to_value(&*injected).map_err(|e| e.to_string())?;
    json_patch::patch(pod, &json_patch::diff(&before, &after)).map_err(|e| format!("cannot apply the injection: {e}"))
}
