//! The sidecar's runtime configuration: what the CRDs compile into.
//!
//! [`compile`] turns ProviderRoute and Secret objects into a [`Config`]; it is pure and shared by
//! standalone mode (objects read from YAML files by [`load`]) and the operator (objects read from the
//! API server), so that both modes mean the same.

mod compile;
mod load;
pub mod watch;

use std::{fmt, sync::Arc, time::Duration};

pub use compile::{DEFAULT_NAMESPACE, Document, Documents, Resolver, compile};
pub use load::{Fingerprint, Loaded, Sources, load, parse_file};

use crate::api::{FallbackReason, Period, Strategy};
use crate::mock_provider::MockOptions;

/// A compiled, validated configuration. Immutable once built; the sidecar swaps whole configs.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub routes: Vec<Route>,
    pub budgets: Vec<Budget>,
}

/// One ApiKeyBudget, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub namespace: String,
    pub name: String,
    /// SHA-256 of the API key; the key itself is not kept.
    pub key_hash: [u8; 32],
    /// Micro-units per period; `None`: tracked, not limited.
    pub limit: Option<u64>,
    pub period: Period,
    pub low_balance: Option<u64>,
    pub fail_open: bool,
    /// Model names (routes' models or aliases) the key may use; `None`: all.
    pub allowed_models: Option<Vec<String>>,
    pub rate_limit: Option<RateLimitPolicy>,
}

impl Budget {
    /// `namespace/name`: the budget's identity in the ledger and in metrics.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// One ProviderRoute, compiled.
#[derive(Clone, Debug, PartialEq)]
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
    pub hold_back: Duration,
    pub hedge_after: Option<Duration>,
    /// Completion tokens reserved for a request without `max_tokens`.
    pub reserved_completion_tokens: u32,
}

impl Route {
    /// Every model name that reaches this route: `model` first, then `aliases`.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.model.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// One target of a route, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: String,
    pub provider: String,
    pub upstream: Upstream,
    /// The model name sent upstream.
    pub model: String,
    pub credential: Option<Credential>,
    /// Extra request headers, validated as HTTP header names and values.
    pub headers: Vec<(String, String)>,
    pub weight: u32,
    pub pricing: Prices,
    pub context_window: Option<u32>,
    pub timeouts: Timeouts,
}

/// Where a target's requests go.
#[derive(Clone, Debug, PartialEq)]
pub enum Upstream {
    /// An OpenAI-compatible HTTP API; `base_url` has no trailing slash.
    OpenAi { base_url: String },
    /// The built-in fake provider, run in-process.
    Mock(Arc<MockOptions>),
}

/// An upstream API key. Its `Debug` never shows the value, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(String);

impl Credential {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret value, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// Prices in micro-units per one million tokens; `request` in micro-units per call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prices {
    pub prompt: u64,
    pub completion: u64,
    pub cached_prompt: u64,
    pub request: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub total: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FallbackPolicy {
    pub on: ReasonSet,
    pub max_attempts: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

/// A set of [`FallbackReason`]s as a bit set: checked on every failed attempt, so it is a mask test.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
