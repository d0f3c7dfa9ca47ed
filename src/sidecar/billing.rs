//! Budgets on the request path: who is calling (by the hash of their key), what they may use,
//! the credit held for their request, and the cost settled for its answer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use super::calls::error::ProxyError;
use super::cluster::fleet::{self, Fleet, FleetAccount};
use crate::api::BudgetState;
use crate::api::units::format_micros;
use crate::budget::period::period_end;
use crate::budget::protocol::BudgetFigures;
use crate::budget::{BudgetCounters, Ledger, Level, RateStatus, Refusal, Reservation, Spend, cost, worst_case};
use crate::config::{Budget, Prices};
use crate::providers::anthropic::X_API_KEY;
use crate::providers::openai::ChunkInfo;
use crate::providers::{BYTES_PER_TOKEN, Usage};

/// A budget, ready for requests.
pub struct ServedBudget {
    /// `namespace/name`.
    pub id: String,
    /// What the ApiKeyBudget says.
    pub terms: Budget,
    /// What its parent says, and the parent's parent: the levels above it, nearest first.
    pub parents: Vec<Budget>,
    /// The route ids this key may use; `None`: every route.
    allowed: Option<HashSet<String>>,
    pub meter: Meter,
}

/// Where a budget's spend is kept: the sidecar's own ledger (standalone), or leases of the
/// operator's ledger (cluster mode).
pub enum Meter {
    /// `levels[0]` is the budget's own account, then its parents', as in `ServedBudget::parents`.
    Embedded {
        ledger: Ledger,
        levels: Arc<[Level]>,
    },
    Fleet {
        fleet: Arc<Fleet>,
        account: Arc<FleetAccount>,
    },
}

/// Where a budget stands, from whichever ledger keeps it.
pub struct Standing {
    pub spent: u64,
    /// Left of the limit, with what top-ups added to it this period.
    pub remaining: Option<u64>,
    /// What top-ups from the parent added to the limit this period.
    pub topped_up: u64,
    pub state: BudgetState,
    /// Unix seconds.
    pub period_start: u64,
    /// Since the budget was created, and per calendar window (standalone mode only).
    pub windows: Option<Spend>,
}

impl ServedBudget {
    /// `allowed_routes` maps the budget's `allowedModels` to route ids; `parents` are the levels
    /// above it, nearest first.
    pub fn new(
        budget: &Budget,
        parents: Vec<Budget>,
        allowed_routes: Option<HashSet<String>>,
        meter: Meter,
    ) -> ServedBudget {
        ServedBudget { id: budget.id(), terms: budget.clone(), parents, allowed: allowed_routes, meter }
    }

    /// The terms of level `level` of the chain: 0 is the budget's own.
    fn level_terms(&self, level: usize) -> &Budget {
        level.checked_sub(1).and_then(|p| self.parents.get(p)).unwrap_or(&self.terms)
    }

    /// Whether the key may use the route with this id.
    pub fn allows(&self, route_id: &str) -> bool {
        self.allowed.as_ref().is_none_or(|ids| ids.contains(route_id))
    }

    pub fn counters(&self) -> &BudgetCounters {
        match &self.meter {
            Meter::Embedded { levels, .. } => &levels[0].account.counters,
            Meter::Fleet { account, .. } => &account.counters,
        }
    }

    /// Where the budget stands now: from the embedded ledger, or the fleet's figures as of the
    /// ledger's last answer (`None` before its first).
    pub fn standing(&self) -> Option<Standing> {
        match &self.meter {
            Meter::Embedded { ledger, levels } => Some(embedded_standing(&self.terms, &levels[0], ledger.now())),
            Meter::Fleet { account, .. } => {
                let leased = account.leased.lock();
                let figures: &BudgetFigures = leased.figures.as_ref()?;
                Some(Standing {
                    spent: figures.spent,
                    remaining: figures.remaining,
                    topped_up: figures.topped_up,
                    state: figures.state,
                    period_start: figures.period_start,
                    windows: None,
                })
            }
        }
    }

    /// Where each budget above this one stands, nearest first, with its terms.
    pub fn parent_standings(&self) -> Vec<(&Budget, Standing)> {
        match &self.meter {
            Meter::Embedded { ledger, levels } => {
                let now = ledger.now();
                self.parents.iter().zip(levels.iter().skip(1)).map(|(b, l)| (b, embedded_standing(b, l, now))).collect()
            }
            // As of the ledger's last answer, by the parents' names in it.
            Meter::Fleet { account, .. } => {
                let leased = account.leased.lock();
                let above = leased.figures.as_ref().map_or(&[][..], |f| f.parents.as_slice());
                self.parents
                    .iter()
                    .filter_map(|b| {
                        let id = b.id();
                        let f = above.iter().find(|p| p.budget == id)?;
                        let standing = Standing {
                            spent: f.spent,
                            remaining: f.remaining,
                            topped_up: 0,
                            state: f.state,
                            period_start: f.period_start,
                            windows: None,
                        };
                        Some((b, standing))
                    })
                    .collect()
            }
        }
    }
}

/// Where one level of a chain stands in the embedded ledger.
fn embedded_standing(terms: &Budget, level: &Level, now: u64) -> Standing {
    let spend = level.account.view(terms.period, now);
    let remaining = terms.limit.map(|l| l.saturating_add(spend.topped_up).saturating_sub(spend.spent));
    let state = match remaining {
        Some(0) => BudgetState::Exhausted,
        Some(left) if terms.low_balance.is_some_and(|low| left < low) => BudgetState::Low,
        _ => BudgetState::Active,
    };
    Standing {
        spent: spend.spent,
        remaining,
        topped_up: spend.topped_up,
        state,
        period_start: spend.period_start,
        windows: Some(spend),
    }
}

/// Counts a request against the key's rate limits: `Ok` with the status for the
/// `X-RateLimit-*` headers, or the 429.
pub async fn admit_rate(budget: &ServedBudget) -> Result<Option<RateStatus>, ProxyError> {
    let Some(policy) = budget.terms.rate_limit else { return Ok(None) };
    let admitted = match &budget.meter {
        Meter::Embedded { ledger, levels } => levels[0].account.admit_rate(policy, ledger.now()),
        Meter::Fleet { fleet, account } => match fleet.admit_rate_local(account, &budget.terms) {
            Ok(status) => Ok(status),
            Err(_) => fleet.admit_rate_slow(account, &budget.terms).await,
        },
    };
    admitted.map_err(|status| {
        budget.counters().rate_limited.inc();
        ProxyError::RateLimited { status }
    })
}

/// Credit held for one request, from either ledger.
pub enum Hold {
    Embedded(Reservation),
    Fleet(fleet::Hold),
}

impl Hold {
    fn extend(&mut self, more: u64) -> Result<(), Option<u64>> {
        match self {
            Hold::Embedded(r) => r.extend(more).map_err(|refusal| match refusal {
                Refusal::Insufficient { remaining, .. } => Some(remaining),
                Refusal::Unavailable => None,
            }),
            Hold::Fleet(h) => h.extend(more).map_err(|()| None),
        }
    }

    fn counters(&self) -> &BudgetCounters {
        match self {
            Hold::Embedded(r) => &r.account().counters,
            Hold::Fleet(h) => &h.account().counters,
        }
    }

    fn settle(self, cost: u64, tokens: u64) {
        match self {
            Hold::Embedded(r) => r.settle(cost, tokens),
            Hold::Fleet(h) => h.settle(cost, tokens),
        }
    }
}

/// The caller's key: `Authorization: Bearer <key>`, or `x-api-key: <key>` as Anthropic's SDKs
/// send it.
pub fn caller_key(headers: &HeaderMap) -> Option<&str> {
    bearer(headers).or_else(|| Some(headers.get(X_API_KEY)?.to_str().ok()?.trim()).filter(|k| !k.is_empty()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The SHA-256 of a caller's key, which budgets are found by. Each thread remembers the digests of
/// the last keys it saw: hashing is about 5% of a request's instructions, and a caller sends the
/// same key on every request. The keys remembered are bounded in number and length, so that
/// callers sending many keys only cost what hashing costs.
pub fn key_hash(key: &str) -> [u8; 32] {
    const KEYS: usize = 64;
    const KEY_BYTES: usize = 256;
    thread_local! {
        static SEEN: std::cell::RefCell<HashMap<Box<str>, [u8; 32]>> = std::cell::RefCell::default();
    }
    let digest = |key: &str| Sha256::digest(key.as_bytes()).into();
    if key.len() > KEY_BYTES {
        return digest(key);
    }
    SEEN.with_borrow_mut(|seen| {
        if let Some(hash) = seen.get(key) {
            return *hash;
        }
        let hash = digest(key);
        if seen.len() >= KEYS {
            seen.clear();
        }
        seen.insert(key.into(), hash);
        hash
    })
}

/// Reserves the worst case of the targets a route may try (`prices`, one per target): every
/// prompt token at its highest price (a token is at least one byte, so the body's length bounds
/// the prompt) and `completion_tokens`.
pub async fn reserve<'a>(
    budget: &ServedBudget,
    prices: impl Iterator<Item = &'a Prices>,
    body_len: u64,
    completion_tokens: u64,
) -> Result<Hold, ProxyError> {
    let amount = prices.map(|p| worst_case(body_len, completion_tokens, p)).max().unwrap_or(0);
    let insufficient = |remaining, level: usize| {
        budget.counters().refused.inc();
        let terms = budget.level_terms(level);
        let resets_at = period_end(terms.period, fleet::now_ms() / 1000);
        let short = (level > 0).then(|| terms.id());
        ProxyError::InsufficientCredits { remaining, reservation: amount, resets_at, parent: short }
    };
    match &budget.meter {
        Meter::Embedded { ledger, levels } => match ledger.reserve(levels, budget.terms.fail_open, amount) {
            Ok(r) => Ok(Hold::Embedded(r)),
            Err(Refusal::Insufficient { remaining, level }) => Err(insufficient(remaining, level)),
            Err(Refusal::Unavailable) => Err(ProxyError::LedgerUnavailable { reason: None }),
        },
        Meter::Fleet { fleet, account } => {
            let held = match fleet.reserve_local(account, &budget.terms, amount) {
                Ok(hold) => Ok(hold),
                Err(miss) => fleet.reserve_slow(account, &budget.terms, amount, miss).await,
            };
            match held {
                Ok(h) => Ok(Hold::Fleet(h)),
                Err(fleet::Refusal::Insufficient { remaining, budget: above }) => {
                    let level =
                        above.and_then(|id| budget.parents.iter().position(|p| p.id() == id)).map_or(0, |p| p + 1);
                    Err(insufficient(remaining, level))
                }
                Err(fleet::Refusal::RateLimited(status)) => {
                    budget.counters().rate_limited.inc();
                    Err(ProxyError::RateLimited { status })
                }
                Err(fleet::Refusal::Unavailable(reason)) => Err(ProxyError::LedgerUnavailable { reason: Some(reason) }),
            }
        }
    }
}

/// What answering a request costs, once the answer is known. A JSON answer is billed at once
/// ([`Bill::settle`]); a stream is billed as it goes ([`StreamBill`]).
pub struct Bill {
    pub reservation: Option<Hold>,
    pub prices: Prices,
    /// Estimated prompt tokens, for answers without usage.
    pub prompt_estimate: u64,
}

impl Bill {
    /// Settles an answer at what it cost. Without a reported usage the tokens are estimated, and
    /// the estimate is counted.
    pub fn settle(self, usage: Option<Usage>, output_bytes: u64) -> Settled {
        let estimated = usage.is_none();
        let usage = usage.unwrap_or(Usage {
            prompt: self.prompt_estimate,
            completion: output_bytes.div_ceil(BYTES_PER_TOKEN),
            ..Usage::default()
        });
        let amount = cost(&usage, &self.prices);
        if let Some(hold) = self.reservation {
            if estimated {
                hold.counters().estimated.inc();
            }
            hold.settle(amount, usage.total());
        }
        Settled { usage, estimated, cost: amount }
    }
}

/// What an answer was billed at.
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    pub usage: Usage,
    /// The provider reported no usage: it was estimated from the answer's size.
    pub estimated: bool,
    /// Micro-units.
    pub cost: u64,
}

/// What to do with one event of a stream.
pub enum EventAction {
    Keep,
    Drop,
    Replace(Bytes),
}

/// The bill of a stream: counts its output, puts the cost into its usage chunk (or drops the
/// chunk if only the sidecar asked for it), extends the reservation when the answer outgrows it,
/// and settles when the stream ends or the caller leaves.
pub struct StreamBill {
    bill: Option<Bill>,
    /// The caller asked for the usage chunk; otherwise only the sidecar did, and it is dropped.
    keep_usage_chunk: bool,
    /// Completion tokens reserved so far, when the request set no `max_tokens`.
    reserved_completion: Option<u64>,
    extend_by: u64,
    usage: Option<Usage>,
    output_bytes: u64,
    /// Writes the cost into the event that carries the usage, where the stream's format has it.
    price_event: PriceEvent,
    /// What it was billed at, once settled.
    settled: Option<Settled>,
}

/// An event with `usage.cost` set (a JSON number's text), if it is the kind that carries usage.
pub type PriceEvent = fn(&[u8], &str) -> Option<Bytes>;

impl StreamBill {
    pub fn new(bill: Bill, keep_usage_chunk: bool, reserved_completion: Option<u64>, price_event: PriceEvent) -> Self {
        StreamBill {
            bill: Some(bill),
            keep_usage_chunk,
            price_event,
            extend_by: reserved_completion.unwrap_or(0).max(64),
            reserved_completion,
            usage: None,
            output_bytes: 0,
            settled: None,
        }
    }

    /// Whether the stream is billed against a budget (so every event must be read).
    pub fn is_metered(&self) -> bool {
        self.bill.as_ref().is_some_and(|b| b.reservation.is_some())
    }

    /// Output read elsewhere (during hold-back).
    pub fn count_output(&mut self, bytes: u64) {
        self.output_bytes = self.output_bytes.saturating_add(bytes);
    }

    pub fn see(&mut self, payload: &[u8], info: &ChunkInfo) -> EventAction {
        self.output_bytes = self.output_bytes.saturating_add(info.output_bytes);
        let Some(usage) = info.usage else { return EventAction::Keep };
        let usage = self.usage.map_or(usage, |earlier| earlier.merge(usage));
        self.usage = Some(usage);
        if info.partial_usage {
            // The cost goes where the usage is complete.
            return EventAction::Keep;
        }
        if !self.keep_usage_chunk {
            return EventAction::Drop;
        }
        let prices = self.bill.as_ref().map(|b| b.prices).unwrap_or_default();
        match (self.price_event)(payload, &format_micros(cost(&usage, &prices))) {
            Some(json) => EventAction::Replace(json),
            None => EventAction::Keep,
        }
    }

    /// Reserves more when the answer has outgrown its reservation: a step of tokens, or as many
    /// as the remaining credit covers. `Err` when not one more token is covered.
    pub fn keep_up(&mut self) -> Result<(), ()> {
        let Some(reserved) = self.reserved_completion else { return Ok(()) };
        if self.output_bytes.div_ceil(BYTES_PER_TOKEN) <= reserved {
            return Ok(());
        }
        let Some(bill) = self.bill.as_mut() else { return Ok(()) };
        let price = bill.prices.completion;
        let Some(reservation) = bill.reservation.as_mut() else { return Ok(()) };
        let tokens_cost = |tokens: u64| worst_case(0, tokens, &Prices { completion: price, ..Prices::default() });
        let tokens = match reservation.extend(tokens_cost(self.extend_by)) {
            Ok(()) => self.extend_by,
            Err(Some(remaining)) if price > 0 => {
                let affordable =
                    u64::try_from(u128::from(remaining) * 1_000_000 / u128::from(price)).unwrap_or(u64::MAX);
                if affordable == 0 || reservation.extend(tokens_cost(affordable)).is_err() {
                    return Err(());
                }
                affordable
            }
            Err(_) => return Err(()),
        };
        self.reserved_completion = Some(reserved.saturating_add(tokens));
        Ok(())
    }

    /// Settles what the stream cost: exactly from its usage, or estimated from its output.
    pub fn settle(&mut self) -> Option<Settled> {
        if let Some(bill) = self.bill.take() {
            self.settled = Some(bill.settle(self.usage, self.output_bytes));
        }
        self.settled
    }
}

impl Drop for StreamBill {
    /// A caller that leaves mid-stream pays for what was produced; the rest is released.
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::key_hash;

    #[test]
    fn a_remembered_key_hashes_as_sha256_does_however_many_keys_come() {
        let sha = |key: &str| -> [u8; 32] { Sha256::digest(key.as_bytes()).into() };
        // More keys than are remembered, some longer than a remembered key may be, each twice.
        let keys: Vec<String> = (0..200).map(|i| format!("sk-{i}-{}", "x".repeat(i * 2))).collect();
        for _ in 0..2 {
            for key in &keys {
                assert_eq!(key_hash(key), sha(key), "{key}");
            }
        }
        assert_eq!(key_hash(""), sha(""));
    }
}
