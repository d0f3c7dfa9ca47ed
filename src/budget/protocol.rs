//! What sidecars and the operator's ledger say to each other, as JSON over HTTP/2.
//!
//! JSON with serde_json, which the project already uses everywhere: the messages are a few small
//! objects exchanged a few times a minute per budget, so a binary encoding would buy nothing
//! worth a second schema language and its code generator.
//!
//! Every figure a sidecar reports is cumulative for its lease (credit spent on it, requests and
//! tokens used in its rate window), so a report sent twice, or late, counts once.

use serde::{Deserialize, Serialize};

/// Amounts of each thing a budget limits: credit (micro-units, per period) and the current
/// minute's requests and tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allowance {
    #[serde(default)]
    pub credit: u64,
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub tokens: u64,
}

impl Allowance {
    pub fn is_zero(&self) -> bool {
        *self == Allowance::default()
    }

    /// Takes in a cumulative figure: each amount grows to `other`'s, never shrinks (a report
    /// that comes late or twice changes nothing).
    pub fn raise_to(&mut self, other: &Allowance) {
        self.credit = self.credit.max(other.credit);
        self.requests = self.requests.max(other.requests);
        self.tokens = self.tokens.max(other.tokens);
    }
}

/// A sidecar asks for a lease on a budget of its namespace, or for more on the one it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseRequest {
    /// The ApiKeyBudget as `namespace/name` (the namespace must be the caller's), or its name in
    /// the caller's namespace.
    pub budget: String,
    /// The lease to renew and top up; absent for a new one.
    #[serde(default)]
    pub lease_id: Option<String>,
    /// On the lease renewed: what was used so far (cumulative, as in a [`Report`]).
    #[serde(default)]
    pub used: Allowance,
    /// The room the sidecar would like the lease to have after this answer, from its demand:
    /// credit not yet used (what requests in flight hold included), requests and tokens left in
    /// the window. A lease that has it already is given nothing more, so leases follow demand
    /// instead of growing with every renewal.
    pub want: Allowance,
    /// Of that, what requests waiting now need: granted first and in full while the remainder
    /// has it, before the share of the rest.
    #[serde(default, skip_serializing_if = "Allowance::is_zero")]
    pub need: Allowance,
}

/// How a sidecar spends a budget now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Spend locally against the lease.
    Lease,
    /// The budget is Low: every request reserves and settles with the ledger.
    PerRequest,
    /// Nothing is left in this period: refuse with 402.
    Exhausted,
}

/// The ledger's answer to a [`LeaseRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseGrant {
    pub lease_id: String,
    pub mode: Mode,
    /// Granted on this lease so far (cumulative): credit for its life, requests and tokens for
    /// the rate window `window`.
    pub granted: Allowance,
    /// The minute (Unix seconds / 60) that the request and token grants are for.
    pub window: u64,
    /// Unix milliseconds after which the lease may not be spent from.
    pub expires_at: u64,
    /// The budget as the whole fleet stands.
    pub budget: BudgetFigures,
}

/// A budget's fleet-wide figures, for `GET /api/v1/key` and for choosing a mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetFigures {
    /// Reported spend in the current period.
    pub spent: u64,
    /// `limit - spent` (the limit with this period's top-ups); absent without a limit.
    #[serde(default)]
    pub remaining: Option<u64>,
    /// Credit granted to leases and reservations and not yet reported.
    pub outstanding: u64,
    /// What top-ups from the parent added to the limit this period.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub topped_up: u64,
    /// Unix seconds.
    pub period_start: u64,
    pub state: crate::api::BudgetState,
    /// The term of the leader that answered: a new one means the sidecar tells it what it holds
    /// ([`Holdings`]).
    #[serde(default)]
    pub term: u64,
    /// The change this answer made, and the last change the budget's status holds: a sidecar
    /// keeps what it reported until `durable` reaches the change that took it in.
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub durable: u64,
    /// The budgets above it, nearest first, each with its own and its descendants' spend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<ParentFigures>,
}

/// Where a budget above a key stands, for the key's `GET /api/v1/key` and its 402s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentFigures {
    /// `namespace/name`.
    pub budget: String,
    /// Its own spend and all of its descendants', in its period.
    pub spent: u64,
    #[serde(default)]
    pub remaining: Option<u64>,
    pub period_start: u64,
    pub state: crate::api::BudgetState,
}

impl BudgetFigures {
    /// The level of the chain that ran out, nearest first: what remains there and, for a budget
    /// above the key, its `namespace/name`.
    pub fn exhausted(&self) -> (u64, Option<&str>) {
        let above = self.parents.iter().find(|p| p.state == crate::api::BudgetState::Exhausted);
        match above {
            Some(p) if self.state != crate::api::BudgetState::Exhausted => (p.remaining.unwrap_or(0), Some(&p.budget)),
            _ => (self.remaining.unwrap_or(0), None),
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a sidecar holds of a budget, told to a leader that has just taken over: its open leases
/// and reservations with what they were granted and used, and what it reported done that the last
/// leader may not have written. The new leader goes on from it instead of from a guess.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Holdings {
    pub budget: String,
    pub held: Vec<Holding>,
}

/// The ledger's answer to [`Holdings`]: the budget's figures, and what the last leader's write
/// holds already (the sidecar keeps none of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HoldingsTaken {
    pub budget: BudgetFigures,
    #[serde(default)]
    pub written: Vec<String>,
}

/// One lease, reservation or debt a sidecar holds or reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Holding {
    pub id: String,
    pub kind: HoldingKind,
    /// As granted (cumulative); nothing for a debt.
    #[serde(default)]
    pub granted: Allowance,
    /// Used so far (cumulative).
    pub used: Allowance,
    /// The minute of the request and token figures.
    #[serde(default)]
    pub window: u64,
    /// Unix milliseconds; 0 for a debt.
    #[serde(default)]
    pub expires_at: u64,
    /// Reported done: nothing more will be used.
    #[serde(default)]
    pub done: bool,
    /// The leader term and change that took its last report in, if one did: a leader whose last
    /// write holds that change has it already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<Acked>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HoldingKind {
    Lease,
    Reservation,
    Debt,
}

/// Where a report was taken in: the leader's term and the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Acked {
    pub term: u64,
    pub version: u64,
}

/// What a sidecar has used of a lease so far; `done` gives the rest back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Report {
    /// The ApiKeyBudget as `namespace/name` (the namespace must be the caller's), or its name in
    /// the caller's namespace.
    pub budget: String,
    pub lease_id: String,
    pub used: Allowance,
    #[serde(default)]
    pub done: bool,
}

/// In per-request mode: hold `amount` for one request (and one request of the rate limit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReserveRequest {
    pub budget: String,
    pub amount: u64,
}

/// A per-request reservation: settle it with [`Settle`] (a lease of one request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reserved {
    pub reservation_id: String,
    pub expires_at: u64,
    pub budget: BudgetFigures,
}

/// The cost of a per-request reservation's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settle {
    /// The ApiKeyBudget as `namespace/name` (the namespace must be the caller's), or its name in
    /// the caller's namespace.
    pub budget: String,
    pub reservation_id: String,
    pub cost: u64,
    #[serde(default)]
    pub tokens: u64,
}

/// Spend a sidecar made without a grant (while the ledger was unreachable, with
/// `onLedgerUnavailable: failOpen`), or on a lease the ledger no longer knows. `id` is the
/// sidecar's own and `used` cumulative for it, so a repeated report counts once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Debt {
    /// The ApiKeyBudget as `namespace/name` (the namespace must be the caller's), or its name in
    /// the caller's namespace.
    pub budget: String,
    pub debt_id: String,
    pub used: Allowance,
}

/// Why the ledger refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "reason", deny_unknown_fields)]
pub enum Refused {
    /// Not enough credit for the reservation: what remains of the key's budget, or of the
    /// budget above it named by `budget` (`namespace/name`) that ran out.
    InsufficientCredits {
        remaining: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        budget: Option<String>,
    },
    /// The key's rate limit is used up in this window.
    RateLimited { limit: u64, reset: u64 },
    /// No such budget in the caller's namespace (or not one the ledger knows yet).
    UnknownBudget,
    /// No such lease or reservation, or another sidecar's.
    UnknownLease,
    /// The ledger has just taken over from another leader, and the credit asked for is among
    /// what that one may still have out: free again once every pod has said what it holds. Also
    /// the answer to a report, from a pod that has not said what it holds yet, on a lease or
    /// reservation the ledger does not know: the pod tells its holdings, then reports again.
    TakingOver,
}
