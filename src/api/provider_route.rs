//! `ProviderRoute`: which providers serve a model, in what order, at what price.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::units::{DECIMAL_PATTERN, DURATION_PATTERN, durations_valid};

/// Desired routing for one model name: the providers that serve it, in what order, at what price,
/// and when to fall back from one to the next.
// Clippy mistakes the repeated `type_ = "string"` of the printer columns for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sideyard.dev",
    version = "v1alpha1",
    kind = "ProviderRoute",
    namespaced,
    shortname = "proute",
    category = "sideyard",
    status = "ProviderRouteStatus",
    derive = "PartialEq",
    doc = "Routes one model name to an ordered list of LLM providers, with fallback, timeouts and prices.",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.strategy"),
    printcolumn(name = "Targets", type_ = "string", json_path = ".status.targetNames"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.aliases) || !self.aliases.exists(a, a == self.model)")
        .message("aliases must not repeat model"),
    validation = Rule::new(concat!("!has(self.hedge) || !has(self.holdBack) || !(", durations_valid!("self.hedge.after", "self.holdBack"), ") || duration(self.hedge.after) < duration(self.holdBack)"))
        .message("hedge.after must be shorter than holdBack: a stream is committed to its first target when hold-back ends, so a later hedge would never start"),
    validation = Rule::new("!has(self.serves) || self.serves != 'embeddings' || self.targets.all(t, !has(t.api) || t.api != 'anthropic')")
        .message("an embeddings route's targets must speak the OpenAI API: Anthropic's has no embeddings")
)]
pub struct ProviderRouteSpec {
    /// The model name that applications send in the request's `model` field. Unique per namespace
    /// across every route's `model` and `aliases`.
    #[schemars(length(min = 1, max = 253), pattern(r"^\S+$"))]
    pub model: String,

    /// Other model names that reach this route, for example the upstream names that existing
    /// clients already send.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253), pattern(r"^\S+$")))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self.all(a, self.exists_one(b, b == a))").message("aliases must be unique")
    )]
    pub aliases: Vec<String>,

    /// What the route's models do. `chat` (the default): conversations, served on
    /// `/v1/chat/completions`, `/v1/messages` and (by OpenAI-compatible targets)
    /// `/v1/completions`. `embeddings`: vectors, served on `/v1/embeddings`; every target must be
    /// OpenAI-compatible.
    #[serde(default, skip_serializing_if = "is_default")]
    pub serves: Serves,

    /// Make this route the namespace's pass-through default: API calls the sidecar does not serve
    /// itself (files, batches, audio, images, ...) and that name no model go to this route's
    /// first available target. At most one route per namespace.
    #[serde(default, skip_serializing_if = "is_default")]
    pub passthrough_default: bool,

    /// Which pods' sidecars receive this route, by pod labels. Absent: every injected pod in the
    /// namespace. Ignored in standalone mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,

    /// How targets are ordered for each request. `priority` tries them in the order written.
    #[serde(default)]
    pub strategy: Strategy,

    /// The upstreams that serve this model, tried in strategy order; a failed attempt falls back
    /// to the next one as `fallback` allows.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(t, self.exists_one(u, u.name == t.name))").message("target names must be unique")
    )]
    pub targets: Vec<Target>,

    /// When a failed attempt moves on to the next target, and how many attempts a request may make.
    #[serde(default)]
    pub fallback: Fallback,

    /// Passive health checking: when a target that keeps failing is taken out of rotation.
    #[serde(default)]
    pub health: Health,

    /// For streamed answers: hold the response headers until the first token arrives, at most
    /// this long, so that a target failing before its first token falls back invisibly. `0s`
    /// commits as soon as the upstream's headers arrive.
    #[serde(default = "default_hold_back")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    pub hold_back: String,

    /// Completion tokens reserved against the caller's budget for a request that sets no
    /// `max_tokens`. A stream that goes past them reserves more as it goes.
    #[serde(default = "default_reserved_completion_tokens")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub reserved_completion_tokens: u32,

    /// Start the next target as well when an attempt has produced no first token after a while;
    /// the first to produce one wins and the other is cancelled. Absent: no hedging. `after` must
    /// be shorter than `holdBack`, which is how long a stream may wait for its first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<Hedge>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// What a route's models do, and so which endpoints serve them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Serves {
    /// Conversations: chat completions, Messages, legacy completions.
    #[default]
    Chat,
    /// Embeddings.
    Embeddings,
}

impl Serves {
    pub fn as_str(self) -> &'static str {
        match self {
            Serves::Chat => "chat",
            Serves::Embeddings => "embeddings",
        }
    }
}

fn default_hold_back() -> String {
    "2s".into()
}

fn default_reserved_completion_tokens() -> u32 {
    4096
}

/// Hedged requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hedge {
    /// How long the first attempt may go without a first token before the next target starts.
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    pub after: String,
}

/// How the targets of a route are ordered for a request. Healthy targets always come before
/// ejected ones, whatever the strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    /// Try targets in the order they are written.
    #[default]
    Priority,
    /// Spread first attempts by `weight` (smooth weighted round robin); the others follow as
    /// fallbacks in descending weight.
    Weighted,
    /// Lowest recent median time to first token first; targets without recent data are tried
    /// first now and then, to learn their latency.
    Latency,
    /// Highest recent median output tokens per second first.
    Throughput,
    /// Lowest prompt plus completion price first; equal prices by latency.
    Cost,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::Weighted => "weighted",
            Strategy::Latency => "latency",
            Strategy::Throughput => "throughput",
            Strategy::Cost => "cost",
        }
    }
}

/// One upstream that can serve the route's model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.api == 'mock' || has(self.baseUrl)").message("baseUrl is required unless api is mock"),
    validation = Rule::new("!has(self.baseUrl) || self.api == 'anthropic' || (self.api == 'mock') == self.baseUrl.startsWith('mock://')").message("baseUrl must use mock:// when api is mock, and http:// or https:// when api is openai"),
    validation = Rule::new("!has(self.baseUrl) || self.api != 'anthropic' || !(self.baseUrl.endsWith('/v1') || self.baseUrl.endsWith('/v1/'))").message("an anthropic baseUrl is the API's root, without /v1: /v1/messages is appended to it"),
    validation = Rule::new("!has(self.nativeResponses) || !self.nativeResponses || self.api != 'anthropic'").message("nativeResponses is for OpenAI-compatible targets: Anthropic's API has no Responses endpoint")
)]
pub struct Target {
    /// Unique name of the target within the route. Shows in metrics, response headers and status.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// The provider label that request preferences (`provider.order`, `only`, `ignore`) match.
    /// Defaults to the target's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub provider: Option<String>,

    /// Wire protocol of the upstream. `openai`: an OpenAI-compatible HTTP API. `anthropic`:
    /// Anthropic's Messages API (requests of the other API are translated). `mock`: the built-in
    /// fake provider, run inside the sidecar (for demos and tests; no network, no key).
    #[serde(default)]
    pub api: ProviderApi,

    /// Base URL of the API: for `openai`, up to and including the version path
    /// (`https://api.openai.com/v1`); for `anthropic`, the root (`https://api.anthropic.com`).
    /// Required unless `api` is `mock`. A `mock://local?latency=50ms&chunks=8` URL runs the
    /// built-in fake provider instead, speaking the target's `api` (`mock` speaks OpenAI's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^(https?|mock)://\S+$"))]
    pub base_url: Option<String>,

    /// The model name sent upstream. Defaults to the route's `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(r"^\S+$"))]
    pub model: Option<String>,

    /// Where the upstream API key comes from; sent as `Authorization: Bearer <key>` (for
    /// `anthropic`, as `x-api-key: <key>`). Absent: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,

    /// Extra static request headers sent upstream, for example an organisation or API version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub headers: BTreeMap<String, String>,

    /// For `anthropic`: the `anthropic-beta` values of callers of `/v1/messages` this target
    /// accepts; the others are dropped from the header it is sent. Absent: all are forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub anthropic_betas: Option<Vec<String>>,

    /// For `openai` (and `mock`): whether the upstream serves OpenAI's Responses API itself, so
    /// `/v1/responses` calls are passed to it (`{baseUrl}/responses`) instead of translated to
    /// chat completions. Defaults to true for `https://api.openai.com`, false otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_responses: Option<bool>,

    /// Relative share of traffic for the `weighted` strategy.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: u32,

    /// Prices in currency units per one million tokens (`request`: per call), as decimal strings
    /// with at most six decimal places. Absent prices are zero.
    #[serde(default)]
    pub pricing: Pricing,

    /// Largest prompt plus completion, in tokens, that the upstream model accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub context_window: Option<u32>,

    /// How long an attempt may take before it counts as a timeout.
    #[serde(default)]
    pub timeouts: Timeouts,
}

fn default_weight() -> u32 {
    1
}

/// Wire protocol of an upstream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProviderApi {
    /// OpenAI-compatible HTTP API (`POST {baseUrl}/chat/completions`).
    #[default]
    Openai,
    /// Anthropic's Messages API (`POST {baseUrl}/v1/messages`, the key sent as `x-api-key`).
    Anthropic,
    /// The built-in fake provider, served inside the sidecar.
    Mock,
}

impl ProviderApi {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderApi::Openai => "openai",
            ProviderApi::Anthropic => "anthropic",
            ProviderApi::Mock => "mock",
        }
    }
}

/// Where a target's API key comes from. Exactly one source must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.secretRef), has(self.env), has(self.file)].exists_one(x, x)")
    .message("exactly one of secretRef, env or file must be set"))]
pub struct Credentials {
    /// A key of a Secret in the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,

    /// An environment variable of the sidecar process (standalone mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub env: Option<String>,

    /// A file whose content (without a trailing newline) is the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub file: Option<String>,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Prices in currency units per one million tokens, as decimal strings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// Price per 1M prompt (input) tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub prompt: Option<String>,
    /// Price per 1M completion (output) tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub completion: Option<String>,
    /// Price per 1M prompt tokens served from the provider's prompt cache. Absent: the prompt price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub cached_prompt: Option<String>,
    /// Price per 1M prompt tokens written to the provider's prompt cache (Anthropic charges them
    /// apart). Absent: the prompt price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub cache_write: Option<String>,
    /// Price per request, whatever its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub request: Option<String>,
}

/// Per-attempt time limits, as durations such as `800ms`, `2s`, `10m`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(concat!("!(", durations_valid!("self.connect", "self.total"), ") || duration(self.connect) <= duration(self.total)")).message("connect must not exceed total"),
    validation = Rule::new(concat!("!(", durations_valid!("self.firstByte", "self.total"), ") || duration(self.firstByte) <= duration(self.total)")).message("firstByte must not exceed total")
)]
pub struct Timeouts {
    /// Time to open the connection (TCP and TLS) to the upstream.
    #[serde(default = "default_connect_timeout")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    pub connect: String,
    /// Time from sending the request until the upstream's response headers arrive.
    #[serde(default = "default_first_byte_timeout")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    pub first_byte: String,
    /// Time for the whole attempt, including streaming the answer.
    #[serde(default = "default_total_timeout")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    pub total: String,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            first_byte: default_first_byte_timeout(),
            total: default_total_timeout(),
        }
    }
}

fn default_connect_timeout() -> String {
    "2s".into()
}
fn default_first_byte_timeout() -> String {
    "20s".into()
}
fn default_total_timeout() -> String {
    "600s".into()
}

/// When a failed attempt moves on to the next target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// The failures that move on to the next target. Any other failure is returned to the caller
    /// at once. `connect`: the connection could not be opened or broke before the answer arrived;
    /// `timeout`: a connect, first-byte or total timeout; `429`; `5xx`; `auth`: the provider
    /// refused the target's own credentials (401, 403); `4xx-context-length`: the prompt is too
    /// long for the target; `4xx`: any other 4xx status (context-length and auth errors too).
    #[serde(default = "default_fallback_when")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub when: Vec<FallbackReason>,
    /// Most attempts (first try included) a request makes across the targets.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 16))]
    pub max_attempts: u32,
}

impl Default for Fallback {
    fn default() -> Self {
        Self { when: default_fallback_when(), max_attempts: default_max_attempts() }
    }
}

fn default_fallback_when() -> Vec<FallbackReason> {
    vec![
        FallbackReason::Connect,
        FallbackReason::Timeout,
        FallbackReason::TooManyRequests,
        FallbackReason::ServerError,
        FallbackReason::Auth,
    ]
}
fn default_max_attempts() -> u32 {
    3
}

/// A kind of failed attempt.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum FallbackReason {
    /// The connection could not be opened, or broke before the answer arrived.
    #[serde(rename = "connect")]
    Connect,
    /// A connect, first-byte or total timeout.
    #[serde(rename = "timeout")]
    Timeout,
    /// The upstream answered 429 Too Many Requests.
    #[serde(rename = "429")]
    TooManyRequests,
    /// The upstream answered with a 5xx status, or with a body that is not valid.
    #[serde(rename = "5xx")]
    ServerError,
    /// The upstream answered with a 4xx status other than 429, 401 and 403.
    #[serde(rename = "4xx")]
    ClientError,
    /// The upstream rejected the request as too long for its context window (a 400 or 413 saying
    /// so); the next target may have a larger one.
    #[serde(rename = "4xx-context-length")]
    ContextLength,
    /// The upstream refused the target's own credentials (401 or 403): the caller's key never
    /// goes upstream, so the target is misconfigured or its key revoked.
    #[serde(rename = "auth")]
    Auth,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 7] = [
        FallbackReason::Connect,
        FallbackReason::Timeout,
        FallbackReason::TooManyRequests,
        FallbackReason::ServerError,
        FallbackReason::ClientError,
        FallbackReason::ContextLength,
        FallbackReason::Auth,
    ];

    /// Position in [`FallbackReason::ALL`], for per-reason counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in the API, metrics and error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::Connect => "connect",
            FallbackReason::Timeout => "timeout",
            FallbackReason::TooManyRequests => "429",
            FallbackReason::ServerError => "5xx",
            FallbackReason::ClientError => "4xx",
            FallbackReason::ContextLength => "4xx-context-length",
            FallbackReason::Auth => "auth",
        }
    }

    /// Whether a `when` list falls back on this reason: listed, or a more specific 4xx of a
    /// listed `4xx`.
    pub fn listed_in(self, when: impl Fn(FallbackReason) -> bool) -> bool {
        when(self)
            || (matches!(self, FallbackReason::ContextLength | FallbackReason::Auth)
                && when(FallbackReason::ClientError))
    }

    /// The reason a completed upstream response with this status counts as, if it is a failure.
    pub fn for_status(status: u16) -> Option<FallbackReason> {
        match status {
            429 => Some(FallbackReason::TooManyRequests),
            401 | 403 => Some(FallbackReason::Auth),
            500..=599 => Some(FallbackReason::ServerError),
            400..=499 => Some(FallbackReason::ClientError),
            _ => None,
        }
    }
}

/// Passive health checking of targets.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(concat!("!(", durations_valid!("self.baseEjection", "self.maxEjection"), ") || duration(self.baseEjection) <= duration(self.maxEjection)"))
    .message("baseEjection must not exceed maxEjection"))]
pub struct Health {
    /// Consecutive failures after which a target is ejected.
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 1, max = 100))]
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; each repeat doubles it.
    #[serde(default = "default_base_ejection")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    pub base_ejection: String,
    /// The longest an ejection lasts.
    #[serde(default = "default_max_ejection")]
    #[schemars(length(max = 64), pattern(DURATION_PATTERN))]
    pub max_ejection: String,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    3
}
fn default_base_ejection() -> String {
    "10s".into()
}
fn default_max_ejection() -> String {
    "5m".into()
}

/// Observed state of a ProviderRoute, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRouteStatus {
    /// The `metadata.generation` that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions: `Accepted` (the spec is valid and its references resolve), `Ready`
    /// (compiled into the namespace's `sideyard-config`), and `ConfigNearLimit` while that
    /// Secret nears the 1 MiB object limit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The version of the namespace's compiled configuration that serves this route (see the
    /// sidecar's `sideyard_config_version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<i64>,
    /// Whether each target's credentials could be read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub targets: Vec<TargetStatus>,
    /// Every target's name, in the order written, comma-separated: the `Targets` column of
    /// `kubectl get` (a printer column shows only the first of a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_names: Option<String>,
}

/// The observed state of one target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// The target's name.
    pub name: String,
    /// `Resolved`, `NotConfigured` (no credentials), `SecretNotFound`, `KeyNotFound` or `Invalid`.
    pub credentials: String,
    /// Why the credentials could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The fleet's view, while sidecars follow the operator's configuration stream: `Healthy`,
    /// `Ejected` (a pod ejected it after failures, and every pod of the namespace skips it) or
    /// `CoolingDown` (a rate limit's retry hint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Until when the fleet skips the target (RFC 3339), while it is not `Healthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<String>,
}
