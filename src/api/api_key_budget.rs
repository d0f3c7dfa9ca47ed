//! `ApiKeyBudget`: an API key that callers present, with its credit limit and rate limits.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;
use super::units::DECIMAL_PATTERN;

/// A caller's API key and what it may spend.
// Clippy mistakes the repeated `type_ = "string"` of the printer columns for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sideyard.dev",
    version = "v1alpha1",
    kind = "ApiKeyBudget",
    namespaced,
    shortname = "akb",
    category = "sideyard",
    status = "ApiKeyBudgetStatus",
    derive = "PartialEq",
    doc = "An API key that applications present to the sidecar, with a credit limit per period and rate limits.",
    printcolumn(name = "Parent", type_ = "string", json_path = ".spec.parent"),
    printcolumn(name = "Limit", type_ = "string", json_path = ".spec.limit"),
    printcolumn(name = "Spent", type_ = "string", json_path = ".status.spent"),
    printcolumn(name = "Remaining", type_ = "string", json_path = ".status.remaining"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.lowBalanceThreshold) || has(self.limit)")
    .message("lowBalanceThreshold needs a limit"))]
#[x_kube(validation = Rule::new("!has(self.maxDebt) || (has(self.onLedgerUnavailable) && self.onLedgerUnavailable == 'failOpen')")
    .message("maxDebt needs onLedgerUnavailable: failOpen"))]
#[x_kube(validation = Rule::new("!(has(self.key) && has(self.keys))")
    .message("set key or keys, not both"))]
#[x_kube(validation = Rule::new("!has(self.topUp) || (has(self.parent) && has(self.limit))")
    .message("topUp needs a parent and a limit"))]
pub struct ApiKeyBudgetSpec {
    /// The key applications send as `Authorization: Bearer <key>`. The sidecar keeps only its
    /// SHA-256 hash. Absent: the budget has no key of its own, and exists to be a `parent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<BudgetKey>,

    /// Instead of `key`: a key for every Secret of the namespace that `secretSelector` matches,
    /// each with this budget's terms and tracked apart, as `<name>:<secret>`. Labelling a
    /// Secret issues a key; deleting it, or its label, revokes the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyTemplate>,

    /// The name of another ApiKeyBudget of this namespace (a team's, say) whose limit this
    /// budget's spend also counts against. A request is admitted only when every level has
    /// credit; a chain is at most three budgets long, and each level keeps its own period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub parent: Option<String>,

    /// Credits that may be spent per period, as a decimal string (`"100.00"`), in the currency of
    /// the routes' prices. Absent: spend is tracked but not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub limit: Option<String>,

    /// When spend starts over, at UTC boundaries: `daily`, `weekly` (Monday to Sunday), `monthly`,
    /// or `never`.
    #[serde(default)]
    pub period: Period,

    /// Below this remaining balance the key is in state Low. Requires `limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub low_balance_threshold: Option<String>,

    /// What requests with this key do when the ledger cannot be reached or written:
    /// `failClosed` rejects them (503), `failOpen` serves them and counts the spend in memory.
    #[serde(default)]
    pub on_ledger_unavailable: LedgerUnavailable,

    /// With `onLedgerUnavailable: failOpen`, in a cluster: the most credit one sidecar may spend
    /// on this key, as a decimal string, while the ledger cannot be reached; it is recorded as
    /// debt and reported when the ledger is back. Absent: no bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub max_debt: Option<String>,

    /// The models (route names or aliases) this key may use. Absent: every route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253), pattern(r"^\S+$")))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub allowed_models: Option<Vec<String>>,

    /// Raises this budget's limit for the current period when its remaining credit falls below
    /// `threshold`, by `amount` of its parent's remaining credit, at most `maxPerPeriod` in a
    /// period: a key of a well-funded team stays out of state Low and on the fast path. The
    /// team's total never grows. Requires `parent` and `limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_up: Option<TopUp>,

    /// Requests and tokens per minute for this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Which pods' sidecars accept this key, by pod labels. Absent: every injected pod in the
    /// namespace. Ignored in standalone mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
}

/// Where the key comes from. Exactly one source must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.sha256)")
    .message("exactly one of secretRef or sha256 must be set"))]
pub struct BudgetKey {
    /// A key of a Secret in the budget's namespace that holds the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// The lowercase hex SHA-256 of the API key, for keys kept elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// When spend starts over.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Period {
    /// Every day at 00:00 UTC.
    Daily,
    /// Every Monday at 00:00 UTC.
    Weekly,
    /// On the first of every month at 00:00 UTC.
    #[default]
    Monthly,
    /// Never: the limit is for the key's lifetime.
    Never,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Never => "never",
        }
    }
}

/// What happens to requests when the ledger is unavailable.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LedgerUnavailable {
    /// Reject requests with 503 until the ledger is back.
    #[default]
    FailClosed,
    /// Serve requests; their spend is counted in memory.
    FailOpen,
}

/// Keys issued from labelled Secrets.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyTemplate {
    /// Which Secrets of the namespace hold keys, by their labels.
    pub secret_selector: LabelSelector,
    /// The key of each Secret's data that holds the API key.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_key: String,
}

fn default_secret_key() -> String {
    "key".into()
}

/// Automatic top-up from the parent budget's credit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopUp {
    /// Below this remaining credit (a decimal string), the limit is raised.
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub threshold: String,
    /// What one top-up adds to the limit (a decimal string).
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub amount: String,
    /// The most added in one period (a decimal string); the period's top-ups start over with it.
    #[schemars(pattern(DECIMAL_PATTERN))]
    pub max_per_period: String,
}

/// Rate limits per key, over fixed one-minute windows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.requestsPerMinute) || has(self.tokensPerMinute)")
    .message("set requestsPerMinute, tokensPerMinute or both"))]
pub struct RateLimit {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
}

/// Observed state of an ApiKeyBudget, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyBudgetStatus {
    /// The `metadata.generation` that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The budget ledger's figures (in a cluster).
    #[serde(flatten)]
    pub ledger: LedgerBook,
    /// The keys a `keys` template issued, by Secret name, each with its ledger figures (at most
    /// 100 keys a template).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub keys: Vec<IssuedKey>,
    /// Current conditions: `Accepted` (the spec is valid and the key resolves), `Ready`
    /// (compiled into the namespace's `sideyard-config`), and `Ledger` (in a cluster: which
    /// operator replica's ledger keeps the budget's spend, and since when).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The version of the namespace's compiled configuration that carries this budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<i64>,
}

/// What the budget ledger keeps of a budget (or of one key a template issued).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LedgerBook {
    /// Credits spent in the current period, as a decimal string: by the budget's own key and by
    /// every budget below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent: Option<String>,
    /// Credits left in the current period; absent without a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<String>,
    /// When the current period started (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<String>,
    /// `Active`, `Low` (remaining under lowBalanceThreshold) or `Exhausted` (nothing left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BudgetState>,
    /// Credits granted to sidecars (leases and per-request reservations) and not reported as
    /// spent yet, as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outstanding: Option<String>,
    /// The ledger's open leases, kept so that a new leader goes on where the last one stopped:
    /// it counts their unreported credit as outstanding and accepts their late reports once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub leases: Vec<LedgerLease>,
    /// Credits the ledger may have out beyond `spent` (granted and not reported, or reported and
    /// not yet written here), as a decimal string: a new leader grants none of it until the
    /// `holders` have said what they hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pledged: Option<String>,
    /// The pods (sidecars) that may hold credit of this budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub holders: Vec<String>,
    /// For each ledger term (leader) whose reports these figures hold, the last change they hold:
    /// a new leader takes a sidecar's report it finds here as counted already.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub ledger_writes: Vec<LedgerWrite>,
    /// A budget with budgets below it: the part of `spent` no budget below it holds (what its own
    /// key spent, and what budgets removed from below it spent this period), as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_spent: Option<String>,
    /// Its own part of the spend (`ownSpent`) in the periods of the budgets above it that differ
    /// from its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub spent_in: Vec<SpendInPeriod>,
    /// What automatic top-ups from the parent added to the limit this period, as a decimal
    /// string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topped_up: Option<String>,
}

/// One key a `keys` template issued, and its ledger figures.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuedKey {
    /// The Secret that holds the key.
    pub secret: String,
    #[serde(flatten)]
    pub ledger: LedgerBook,
}

/// A key's spend in the period of a budget above it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpendInPeriod {
    pub period: Period,
    /// When that period started (RFC 3339, UTC).
    pub start: String,
    /// As a decimal string.
    pub spent: String,
}

/// A ledger term and the last of its changes a status holds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LedgerWrite {
    /// The leader's term (a number its answers name).
    pub term: u64,
    /// The last of that term's changes these figures hold.
    pub version: u64,
}

/// The condition the budget ledger keeps on each budget it serves (under its own field manager).
pub const LEDGER_CONDITION: &str = "Ledger";

impl ApiKeyBudgetStatus {
    /// Whether the status says a fleet ledger keeps the budget (`Ledger=True`).
    pub fn kept_by_ledger(&self) -> bool {
        self.conditions.iter().any(|c| c.type_ == LEDGER_CONDITION && c.status == "True")
    }
}

/// One lease the ledger granted to a sidecar (or one per-request reservation).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LedgerLease {
    /// The lease's id, unique across leaders.
    pub id: String,
    /// The pod that holds it.
    pub holder: String,
    /// Credits granted on it, as a decimal string.
    pub granted: String,
    /// Credits its holder reported spent on it, as a decimal string.
    pub used: String,
    /// Requests granted on it for the minute `window`.
    #[serde(default)]
    pub granted_requests: u64,
    /// Tokens granted on it for the minute `window`.
    #[serde(default)]
    pub granted_tokens: u64,
    /// Requests its holder reported using in that minute.
    #[serde(default)]
    pub used_requests: u64,
    /// Tokens its holder reported using in that minute.
    #[serde(default)]
    pub used_tokens: u64,
    /// The minute (Unix seconds / 60) of the request and token figures.
    #[serde(default)]
    pub window: u64,
    /// When it expires, in Unix milliseconds.
    pub expires_at_millis: u64,
    /// Its holder reported it done.
    #[serde(default)]
    pub done: bool,
}

/// How much credit a key has left.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum BudgetState {
    Active,
    Low,
    Exhausted,
}

impl BudgetState {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetState::Active => "Active",
            BudgetState::Low => "Low",
            BudgetState::Exhausted => "Exhausted",
        }
    }
}
