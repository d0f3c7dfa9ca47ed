//! Budgets on the request path: who is calling (by the hash of their key), what they may use,
//! the credit held for their request, and the cost settled for its answer.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use super::error::ProxyError;
use crate::api::units::format_micros;
use crate::api::{BudgetState, Period};
use crate::budget::Spend;
use crate::budget::{Account, Ledger, Refusal, Reservation, cost, worst_case};
use crate::config::{Budget, Prices, RateLimitPolicy};
use crate::providers::openai::{ChunkInfo, with_cost};
use crate::providers::{BYTES_PER_TOKEN, Usage};

/// A budget, ready for requests.
pub struct ServedBudget {
    /// `namespace/name`.
    pub id: String,
    pub limit: Option<u64>,
    pub period: Period,
    pub low_balance: Option<u64>,
    pub fail_open: bool,
    pub rate_limit: Option<RateLimitPolicy>,
    /// The route ids this key may use; `None`: every route.
    allowed: Option<HashSet<String>>,
    pub account: Arc<Account>,
}

impl ServedBudget {
    /// `allowed_routes` maps the budget's `allowedModels` to route ids.
    pub fn new(budget: &Budget, allowed_routes: Option<HashSet<String>>, account: Arc<Account>) -> ServedBudget {
        ServedBudget {
            id: budget.id(),
            limit: budget.limit,
            period: budget.period,
            low_balance: budget.low_balance,
            fail_open: budget.fail_open,
            rate_limit: budget.rate_limit,
            allowed: allowed_routes,
            account,
        }
    }

    /// Whether the key may use the route with this id.
    pub fn allows(&self, route_id: &str) -> bool {
        self.allowed.as_ref().is_none_or(|ids| ids.contains(route_id))
    }

    /// What is left of the limit after what was spent (reservations not counted).
    pub fn remaining(&self, spend: &Spend) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(spend.spent))
    }

    pub fn state(&self, spend: &Spend) -> BudgetState {
        match self.remaining(spend) {
            Some(0) => BudgetState::Exhausted,
            Some(left) if self.low_balance.is_some_and(|low| left < low) => BudgetState::Low,
            _ => BudgetState::Active,
        }
    }
}

/// The key of `Authorization: Bearer <key>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Reserves the worst case of the targets a route may try (`prices`, one per target): every
/// prompt token at its highest price (a token is at least one byte, so the body's length bounds
/// the prompt) and `completion_tokens`.
pub fn reserve<'a>(
    ledger: &Ledger,
    budget: &ServedBudget,
    prices: impl Iterator<Item = &'a Prices>,
    body_len: u64,
    completion_tokens: u64,
) -> Result<Reservation, ProxyError> {
    let amount = prices.map(|p| worst_case(body_len, completion_tokens, p)).max().unwrap_or(0);
    ledger.reserve(&budget.account, budget.limit, budget.period, budget.fail_open, amount).map_err(|refusal| {
        match refusal {
            Refusal::Insufficient { remaining } => {
                budget.account.refused.inc();
                ProxyError::InsufficientCredits { remaining, reservation: amount }
            }
            Refusal::Unavailable => ProxyError::LedgerUnavailable,
        }
    })
}

/// What answering a request costs, once the answer is known. A JSON answer is billed at once
/// ([`Bill::settle`]); a stream is billed as it goes ([`StreamBill`]).
pub struct Bill {
    pub reservation: Option<Reservation>,
    pub prices: Prices,
    /// Estimated prompt tokens, for answers without usage.
    pub prompt_estimate: u64,
}

impl Bill {
    /// Settles an answer and returns its cost as a JSON number's text. Without a reported usage
    /// the tokens are estimated, and the estimate is counted.
    pub fn settle(self, usage: Option<Usage>, output_bytes: u64, ledger: Option<&Ledger>) -> String {
        let estimated = usage.is_none();
        let usage = usage.unwrap_or(Usage {
            prompt: self.prompt_estimate,
            completion: output_bytes.div_ceil(BYTES_PER_TOKEN),
            cached_prompt: 0,
        });
        let amount = cost(&usage, &self.prices);
        if let Some(reservation) = self.reservation {
            let account = reservation.account().clone();
            if estimated {
                account.estimated.inc();
            }
            reservation.settle(amount);
            if let Some(ledger) = ledger {
                account.add_tokens(usage.total(), ledger.now());
            }
        }
        format_micros(amount)
    }
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
    ledger: Option<Ledger>,
    /// The caller asked for the usage chunk; otherwise only the sidecar did, and it is dropped.
    keep_usage_chunk: bool,
    /// Completion tokens reserved so far, when the request set no `max_tokens`.
    reserved_completion: Option<u64>,
    extend_by: u64,
    usage: Option<Usage>,
    output_bytes: u64,
}

impl StreamBill {
    pub fn new(bill: Bill, ledger: Option<Ledger>, keep_usage_chunk: bool, reserved_completion: Option<u64>) -> Self {
        StreamBill {
            bill: Some(bill),
            ledger,
            keep_usage_chunk,
            extend_by: reserved_completion.unwrap_or(0).max(64),
            reserved_completion,
            usage: None,
            output_bytes: 0,
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
        self.usage = Some(usage);
        if !self.keep_usage_chunk {
            return EventAction::Drop;
        }
        let prices = self.bill.as_ref().map(|b| b.prices).unwrap_or_default();
        match with_cost(payload, &format_micros(cost(&usage, &prices))) {
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
        let tokens_cost =
            |tokens: u64| worst_case(0, tokens, &Prices { prompt: 0, cached_prompt: 0, completion: price, request: 0 });
        let tokens = match reservation.extend(tokens_cost(self.extend_by)) {
            Ok(()) => self.extend_by,
            Err(Refusal::Insufficient { remaining }) if price > 0 => {
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
    pub fn settle(&mut self) {
        if let Some(bill) = self.bill.take() {
            bill.settle(self.usage, self.output_bytes, self.ledger.as_ref());
        }
    }
}

impl Drop for StreamBill {
    /// A caller that leaves mid-stream pays for what was produced; the rest is released.
    fn drop(&mut self) {
        self.settle();
    }
}
