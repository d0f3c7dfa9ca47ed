//! The sidecar's runtime configuration: what the CRDs compile into.
//!
//! [`compile`] turns ProviderRoute and Secret objects into a [`Config`]; it is pure and shared by
//! standalone mode (objects read from YAML files by [`load`]) and the operator (objects read from the
//! API server), so that both modes mean the same.

mod compile;
mod load;
mod mock;
mod schema;
pub mod selector;
mod values;
pub mod watch;
mod wire;

use std::{fmt, sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};

pub use compile::{
    Analysis, CredentialState, DEFAULT_NAMESPACE, Document, Documents, MapResolver, ObjectOutcome, Resolver,
    TargetCredential, analyse, compile,
};
pub use load::{Fingerprint, Loaded, Sources, compile_texts, load, parse_file};
pub use mock::{MockOptions, UsageChunk, parse_count, parse_fail_status, parse_rate, parse_usage};
pub use wire::{
    COMPILED_CONFIG_KIND, CONFIG_SERVED_PATH, CONFIG_STREAM_PATH, CompiledConfig, FLEET_HEALTH_KIND, FleetHealth,
    HEALTH_REPORT_PATH, HealthReport, Measure, ServedVersion, TargetOutage, TargetOutcomes, TargetPerformance,
    content_hash, hex,
};

use crate::api::{FallbackReason, Period, Serves, Strategy};

/// A compiled, validated configuration. Immutable once built; the sidecar swaps whole configs.
///
/// It serialises (as a [`CompiledConfig`]) into the Secret the operator writes for each namespace,
/// so its form is part of the contract between operator and sidecar.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub routes: Vec<Route>,
    pub budgets: Vec<Budget>,
    /// In a cluster: the operator's budget ledger, which the sidecar leases credit from instead of
    /// keeping its own. Absent in standalone mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerEndpoint>,
}

/// Where the fleet's budget ledger is, and how to trust it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LedgerEndpoint {
    /// `https://<service>.<namespace>.svc:<port>`.
    pub url: String,
    /// PEM certificates that sign the ledger's serving certificate.
    pub ca_bundle: String,
}

impl Config {
    /// Keeps the routes and budgets whose `workloadSelector` selects a pod with `labels`.
    pub fn retain_for(&mut self, labels: &selector::Labels) {
        self.retain_for_all(std::slice::from_ref(labels));
    }

    /// Keeps the routes and budgets whose `workloadSelector` selects every one of the pods, and
    /// the parents of the budgets kept: a request needs credit at every level. A parent kept only
    /// as a parent loses its key, which these pods have no business accepting.
    pub fn retain_for_all(&mut self, pods: &[selector::Labels]) {
        let selected = |s: &Option<LabelSelector>| {
            s.as_ref().is_none_or(|s| pods.iter().all(|labels| selector::matches(s, labels)))
        };
        self.routes.retain(|r| selected(&r.workload_selector));
        let kept: Vec<bool> = self.budgets.iter().map(|b| selected(&b.workload_selector)).collect();
        let mut parents: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
        for (budget, _) in self.budgets.iter().zip(&kept).filter(|(_, k)| **k) {
            let mut at = budget;
            while let Some(name) = &at.parent
                && let Some(parent) = self.budgets.iter().find(|b| b.namespace == at.namespace && &b.name == name)
            {
                if !parents.insert((parent.namespace.clone(), parent.name.clone())) {
                    break;
                }
                at = parent;
            }
        }
        let mut keep = kept.into_iter();
        self.budgets.retain_mut(|b| {
            let selected = keep.next().unwrap_or(false);
            if !selected && parents.contains(&(b.namespace.clone(), b.name.clone())) {
                b.key_hash = None;
                return true;
            }
            selected
        });
    }
}

/// The most budgets in a chain of parents: a key, its team, the team's organisation.
pub const MAX_BUDGET_CHAIN: usize = 3;

/// One ApiKeyBudget, compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Budget {
    pub namespace: String,
    pub name: String,
    /// SHA-256 of the API key; the key itself is not kept. `None`: a budget with no key of its
    /// own, there to be a parent.
    #[serde(default, with = "wire::hex32")]
    pub key_hash: Option<[u8; 32]>,
    /// The name of the budget of the same namespace above this one, whose limit its spend also
    /// counts against. Compiled configurations hold whole chains, without cycles, at most
    /// [`MAX_BUDGET_CHAIN`] long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Micro-units per period; `None`: tracked, not limited.
    pub limit: Option<u64>,
    pub period: Period,
    pub low_balance: Option<u64>,
    pub fail_open: bool,
    /// With `fail_open`, in a cluster: the most one sidecar may spend while the ledger is
    /// unreachable; `None`: no bound.
    #[serde(default)]
    pub max_debt: Option<u64>,
    /// Raising `limit` from the parent's credit when little is left; only with a parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_up: Option<TopUpPolicy>,
    /// Model names (routes' models or aliases) the key may use; `None`: all.
    pub allowed_models: Option<Vec<String>>,
    pub rate_limit: Option<RateLimitPolicy>,
    /// Which pods' sidecars apply this budget; `None`: every pod.
    pub workload_selector: Option<LabelSelector>,
}

impl Budget {
    /// `namespace/name`: the budget's identity in the ledger and in metrics.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The most keys one `keys` template issues: the ledger keeps each one's figures in the
/// template's status, which must stay small.
pub const MAX_ISSUED_KEYS: usize = 100;

/// The name of the key a `keys` template issues for a Secret: `<template>:<secret>`. No
/// Kubernetes name has a colon, so it is never an ApiKeyBudget's.
pub fn issued_name(template: &str, secret: &str) -> String {
    format!("{template}:{secret}")
}

/// The template and Secret of an issued key's name ([`issued_name`]); `None` for any other.
pub fn issued_by(name: &str) -> Option<(&str, &str)> {
    name.split_once(':')
}

/// The ApiKeyBudget whose status holds a budget's ledger figures: an issued key's template, any
/// other budget itself.
pub fn status_owner(name: &str) -> &str {
    issued_by(name).map_or(name, |(template, _)| template)
}

/// `spec.topUp`, in micro-units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopUpPolicy {
    pub threshold: u64,
    pub amount: u64,
    pub max_per_period: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// One ProviderRoute, compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    /// The primary model name.
    pub model: String,
    pub aliases: Vec<String>,
    pub strategy: Strategy,
    pub targets: Vec<Target>,
    pub fallback: FallbackPolicy,
    pub health: HealthPolicy,
    /// Zero: streams are committed when the upstream's headers arrive.
    #[serde(with = "wire::duration")]
    pub hold_back: Duration,
    #[serde(with = "wire::optional_duration")]
    pub hedge_after: Option<Duration>,
    /// Completion tokens reserved for a request without `max_tokens`.
    pub reserved_completion_tokens: u32,
    /// Which pods' sidecars serve this route; `None`: every pod.
    pub workload_selector: Option<LabelSelector>,
    /// Written only when not the default, so that sidecars older than the field read the
    /// configurations that do not use it.
    #[serde(default, skip_serializing_if = "is_chat")]
    pub serves: Serves,
    /// The namespace's pass-through default route.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough_default: bool,
}

fn is_chat(serves: &Serves) -> bool {
    *serves == Serves::Chat
}

impl Route {
    /// Every model name that reaches this route: `model` first, then `aliases`.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.model.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// One target of a route, compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    pub name: String,
    pub provider: String,
    #[serde(flatten)]
    pub upstream: Upstream,
    /// The model name sent upstream.
    pub model: String,
    pub credential: Option<Credential>,
    /// Extra request headers.
    #[serde(with = "wire::headers")]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The `anthropic-beta` values forwarded from callers; `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic_betas: Option<Vec<String>>,
    /// The upstream serves the Responses API itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub native_responses: bool,
    pub weight: u32,
    pub pricing: Prices,
    pub context_window: Option<u32>,
    pub timeouts: Timeouts,
}

/// Where a target's requests go. Serialised as the ProviderRoute spells it (`api`, `baseUrl`) and
/// parsed back by the same function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "wire::UpstreamSpec", try_from = "wire::UpstreamSpec")]
pub enum Upstream {
    /// An HTTP API; `base_url` has no trailing slash.
    Http {
        format: Format,
        base_url: String,
        /// Where conversations go: `{base_url}/chat/completions` (OpenAI) or
        /// `{base_url}/v1/messages` (Anthropic).
        conversation: http::Uri,
    },
    /// The built-in fake provider, run in-process, speaking `format`; `url` is the `mock://` URL
    /// it was configured by.
    Mock { format: Format, url: Option<String>, options: Arc<MockOptions> },
}

impl Upstream {
    pub fn format(&self) -> Format {
        match self {
            Upstream::Http { format, .. } | Upstream::Mock { format, .. } => *format,
        }
    }
}

/// The wire format a target speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenAI's Chat Completions.
    OpenAi,
    /// Anthropic's Messages.
    Anthropic,
}

/// An upstream API key. Its `Debug` never shows the value, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Credential {
    value: String,
    /// `Bearer <value>`, marked sensitive: kept out of HTTP/2 header compression tables and
    /// debug output.
    bearer: http::HeaderValue,
    /// The value alone, marked sensitive likewise.
    api_key: http::HeaderValue,
}

impl Credential {
    /// A key as read from a Secret, file or variable, without the trailing newline that `echo`
    /// leaves; it must be usable in an HTTP header.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err("the key is empty".into());
        }
        let not_a_header = |_| "the key contains characters that are not allowed in an HTTP header".to_string();
        let mut api_key = http::HeaderValue::from_str(value).map_err(not_a_header)?;
        api_key.set_sensitive(true);
        let mut bearer = http::HeaderValue::from_str(&format!("Bearer {value}")).map_err(not_a_header)?;
        bearer.set_sensitive(true);
        Ok(Self { value: value.to_string(), bearer, api_key })
    }

    /// The secret value, for the places that put it on the wire or look for it in answers.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The `Authorization` header value that sends this key.
    pub fn bearer(&self) -> &http::HeaderValue {
        &self.bearer
    }

    /// The key alone as a header value, as Anthropic's `x-api-key` sends it.
    pub fn api_key(&self) -> &http::HeaderValue {
        &self.api_key
    }
}

impl TryFrom<String> for Credential {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::parse(&value)
    }
}

impl From<Credential> for String {
    fn from(c: Credential) -> Self {
        c.value
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// Prices in micro-units per one million tokens; `request` in micro-units per call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Prices {
    pub prompt: u64,
    pub completion: u64,
    pub cached_prompt: u64,
    /// Absent in configurations compiled before it existed, which had no Anthropic targets.
    #[serde(default)]
    pub cache_write: u64,
    pub request: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    #[serde(with = "wire::duration")]
    pub connect: Duration,
    #[serde(with = "wire::duration")]
    pub first_byte: Duration,
    #[serde(with = "wire::duration")]
    pub total: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackPolicy {
    pub when: ReasonSet,
    pub max_attempts: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthPolicy {
    pub consecutive_failures: u32,
    #[serde(with = "wire::duration")]
    pub base_ejection: Duration,
    #[serde(with = "wire::duration")]
    pub max_ejection: Duration,
}

/// A set of [`FallbackReason`]s as a bit set: checked on every failed attempt, so it is a mask test.
/// Serialised as the list of reasons, as in `spec.fallback.when`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Vec<FallbackReason>", from = "Vec<FallbackReason>")]
pub struct ReasonSet(u8);

impl ReasonSet {
    pub fn insert(&mut self, reason: FallbackReason) {
        self.0 |= Self::bit(reason);
    }

    pub fn contains(self, reason: FallbackReason) -> bool {
        self.0 & Self::bit(reason) != 0
    }

    fn bit(reason: FallbackReason) -> u8 {
        1 << reason.index()
    }
}

impl FromIterator<FallbackReason> for ReasonSet {
    fn from_iter<I: IntoIterator<Item = FallbackReason>>(iter: I) -> Self {
        let mut set = ReasonSet::default();
        for reason in iter {
            set.insert(reason);
        }
        set
    }
}

impl From<Vec<FallbackReason>> for ReasonSet {
    fn from(reasons: Vec<FallbackReason>) -> Self {
        reasons.into_iter().collect()
    }
}

impl From<ReasonSet> for Vec<FallbackReason> {
    fn from(set: ReasonSet) -> Self {
        FallbackReason::ALL.into_iter().filter(|r| set.contains(*r)).collect()
    }
}

impl fmt::Debug for ReasonSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reasons = FallbackReason::ALL.into_iter().filter(|r| self.contains(*r)).map(FallbackReason::as_str);
        f.debug_set().entries(reasons).finish()
    }
}

/// Where a YAML document came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The file as the user named it.
    pub file: String,
    /// 1-based position of the document in the file.
    pub document: usize,
}

/// The object a problem is about, as `kubectl` names it: `ProviderRoute team-a/chat`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One problem in the configuration, located as precisely as possible:
/// `routes.yaml: document 2 (ProviderRoute team-a/chat): spec.targets[1].credentials: secret "openai" not found`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Option<Origin>,
    pub object: Option<ObjectRef>,
    /// Field path within the object; empty when the problem is the whole document.
    pub path: String,
    pub message: String,
    pub reason: Reason,
}

impl ConfigError {
    /// A problem with the input as a whole (a file, a flag), not with one object.
    pub fn input(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { origin: None, object: None, path: path.into(), message: message.into(), reason: Reason::Invalid }
    }
}

/// Why an object is not accepted: the `reason` of its status conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The spec breaks a rule of the API.
    Invalid,
    /// A `secretRef` names a Secret that does not exist.
    SecretNotFound,
    /// A `secretRef` names a key that the Secret does not have.
    KeyNotFound,
    /// Another route, served first, already has one of this route's model names.
    DuplicateModel,
    /// Another budget, served first, already has this key.
    DuplicateKey,
    /// Another route of the namespace, served first, is already its pass-through default.
    DuplicatePassthroughDefault,
    /// A budget's `parent` (or an ancestor's) names no accepted budget of its namespace.
    ParentNotFound,
    /// A budget's chain of parents comes back to a budget already in it.
    ParentCycle,
    /// A budget's chain of parents is longer than three budgets.
    ParentTooDeep,
    /// A `keys` template matches more Secrets than it may issue keys for.
    TooManyKeys,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Invalid => "Invalid",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::KeyNotFound => "KeyNotFound",
            Reason::DuplicateModel => "DuplicateModel",
            Reason::DuplicateKey => "DuplicateKey",
            Reason::DuplicatePassthroughDefault => "DuplicatePassthroughDefault",
            Reason::ParentNotFound => "ParentNotFound",
            Reason::ParentCycle => "ParentCycle",
            Reason::ParentTooDeep => "ParentTooDeep",
            Reason::TooManyKeys => "TooManyKeys",
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{}: document {}", origin.file, origin.document)?;
            if let Some(object) = &self.object {
                write!(f, " ({object})")?;
            }
            f.write_str(": ")?;
        } else if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one configuration; a configuration with any problem is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}
