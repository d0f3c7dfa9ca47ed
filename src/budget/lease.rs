//! A sidecar's side of a fleet budget (cluster mode): requests spend the credit and rate
//! allowance leased from the operator's ledger locally, under one lock and without a network
//! call; what they used is reported back by the sidecar's lease keeper.
//!
//! This module is the pure bookkeeping (time is passed in); talking to the ledger is the
//! sidecar's. What a request may do, by the ledger's last word on the budget:
//!
//! - In mode `Lease`, spend the live lease while it has room; otherwise ask for more
//!   ([`Miss::Lease`]).
//! - In mode `PerRequest` (state Low), reserve and settle each request with the ledger.
//! - In mode `Exhausted`, refuse.
//! - The ledger unreachable and the lease spent or expired: refuse (`failClosed`), or spend on
//!   a debt of at most `maxDebt` (`failOpen`), reported when the ledger is back.

use std::sync::{Mutex, MutexGuard};

use super::ledger::RateStatus;
use super::protocol::{Acked, Allowance, BudgetFigures, Holding, HoldingKind, Holdings, LeaseGrant, Mode};
use crate::api::BudgetState;
use crate::config::{Budget, RateLimitPolicy};

/// What a lease (or a debt, or a settled per-request reservation) has used, and what of that
/// the ledger has acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub id: String,
    pub kind: UsageKind,
    /// Cumulative: credit settled, and requests and tokens of `window`.
    pub used: Allowance,
    pub acked: Allowance,
    /// The minute of `used.requests` and `used.tokens`.
    pub window: u64,
    /// Requests in flight on it, and the credit they hold.
    pub holds: u32,
    pub reserved: u64,
    /// The leader term and change that took its last report in: it is kept until an answer of
    /// that term says a write holds the change.
    pub acked_at: Option<Acked>,
    /// Its report as done (nothing in flight) was taken in.
    pub done_acked: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UsageKind {
    #[default]
    Lease,
    /// Spent without a grant: reported with [`super::protocol::Debt`].
    Debt,
    /// A settled per-request reservation: reported with [`super::protocol::Settle`].
    Reservation,
}

impl Usage {
    /// Reported and acknowledged in full.
    pub fn is_acked(&self) -> bool {
        self.used == self.acked
    }

    /// Not reported in full, or not yet as done once nothing is in flight on it.
    pub fn needs_report(&self) -> bool {
        !self.is_acked() || (self.holds == 0 && !self.done_acked)
    }

    /// Its last report is in a write of the leader of `term`, which holds changes up to `durable`.
    pub fn is_written(&self, term: u64, durable: u64) -> bool {
        self.acked_at.as_ref().is_some_and(|a| a.term == term && a.version <= durable)
    }

    /// As a new leader is told of it.
    fn holding(&self, granted: Allowance, expires_at: u64) -> Holding {
        let (kind, done) = match self.kind {
            UsageKind::Lease => (HoldingKind::Lease, self.holds == 0),
            UsageKind::Debt => (HoldingKind::Debt, false),
            UsageKind::Reservation => (HoldingKind::Reservation, true),
        };
        Holding {
            id: self.id.clone(),
            kind,
            granted,
            used: self.used,
            window: self.window,
            expires_at,
            done,
            acked: self.acked_at.clone(),
        }
    }

    fn settle(&mut self, reserved: u64, cost: u64, tokens: u64, now_ms: u64) {
        self.holds = self.holds.saturating_sub(1);
        self.reserved = self.reserved.saturating_sub(reserved);
        self.used.credit = self.used.credit.saturating_add(cost);
        if self.window == minute(now_ms) {
            self.used.tokens = self.used.tokens.saturating_add(tokens);
        }
    }
}

/// The lease a sidecar holds on a budget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub usage: Usage,
    /// Cumulative, as the ledger granted: credit for the lease's life, requests and tokens for
    /// `usage.window`.
    pub granted: Allowance,
    /// Unix milliseconds.
    pub expires_at: u64,
    /// When it was last granted, to renew it ahead of expiry.
    pub granted_at: u64,
}

impl Held {
    fn live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at
    }

    /// Credit neither spent nor held by a request in flight.
    pub fn credit_left(&self) -> u64 {
        self.granted.credit.saturating_sub(self.usage.used.credit).saturating_sub(self.usage.reserved)
    }
}

/// Why a request cannot spend locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Miss {
    /// The lease is missing, expired or short: ask the ledger for more.
    Lease,
    /// The budget is Low: reserve with the ledger.
    PerRequest,
    /// Nothing is left in this period (as of the ledger's last word), in the key's budget or in
    /// the budget above it named `budget`.
    Exhausted { remaining: u64, budget: Option<String> },
    /// The ledger is unreachable, and the budget fails closed (or its debt is at `maxDebt`).
    Unavailable,
}

/// A request's hold on a lease or a debt: settle it with [`LeasedAccount::settle`].
#[derive(Debug, PartialEq, Eq)]
pub struct LocalHold {
    pub id: String,
    pub amount: u64,
    /// Held on the debt (the ledger unreachable), not on a lease.
    pub on_debt: bool,
}

/// The mutable state of a leased budget.
#[derive(Clone, Debug, Default)]
pub struct Book {
    /// The ledger's last word; `None` before the first.
    pub mode: Option<Mode>,
    pub figures: Option<BudgetFigures>,
    pub lease: Option<Held>,
    /// Spend without a grant while the ledger is unreachable.
    pub debt: Option<Usage>,
    /// Retired leases, debts and settled reservations whose use is not acknowledged yet.
    pub closing: Vec<Usage>,
    /// The ledger could not be reached since this time (Unix ms), or answered since.
    pub unreachable_since: Option<u64>,
    /// Demand, for sizing the next request for a lease: the largest reservation seen, and the
    /// credit, requests and tokens used since the lease was last granted.
    pub largest_reservation: u64,
    pub since_grant: Allowance,
    /// Debt ids are `<debt_prefix>-<n>`: unique to the sidecar's pod and start.
    pub debt_prefix: String,
    pub debts: u64,
    /// Answers to lease requests that settled how the next request is served: a lease, or a
    /// mode without one (not the figures alone).
    pub grants: u64,
    /// The term of the leader that last answered, and the last change of it that its write
    /// holds.
    pub term: u64,
    pub durable: u64,
    /// A new leader answered: tell it what this sidecar holds ([`LeasedAccount::holdings`]).
    pub holdings_due: bool,
    /// Per-request reservations of the ledger in flight, by id.
    pub reservations: std::collections::BTreeMap<String, InFlight>,
}

/// A per-request reservation of the ledger that a request holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub amount: u64,
    /// Unix milliseconds.
    pub expires_at: u64,
    /// The minute it was granted in (its one request counts there).
    pub window: u64,
}

impl Book {
    /// The ledger answered: the debt stops growing and is reported like any closed usage.
    /// Every answer goes through here, whichever call it was.
    fn answered(&mut self) {
        self.unreachable_since = None;
        if let Some(debt) = self.debt.take() {
            self.closing.push(debt);
        }
    }

    /// An answer's figures: a new leader is told what is held; what a write holds is done with.
    fn heard(&mut self, figures: &BudgetFigures) {
        if figures.term != self.term {
            self.term = figures.term;
            self.durable = 0;
            self.holdings_due = true;
        }
        self.durable = self.durable.max(figures.durable);
        self.figures = Some(figures.clone());
        let (term, durable) = (self.term, self.durable);
        self.closing.retain(|u| !(u.holds == 0 && u.is_acked() && u.is_written(term, durable)));
    }

    pub fn new(debt_prefix: impl Into<String>) -> Book {
        Book { debt_prefix: debt_prefix.into(), ..Book::default() }
    }

    fn new_debt(&mut self, credit: u64, now_ms: u64) -> Usage {
        self.debts += 1;
        Usage {
            id: format!("{}-{}", self.debt_prefix, self.debts),
            kind: UsageKind::Debt,
            used: Allowance { credit, requests: 0, tokens: 0 },
            window: minute(now_ms),
            ..Usage::default()
        }
    }
}

/// One budget as a sidecar spends it in cluster mode.
#[derive(Debug)]
pub struct LeasedAccount {
    /// The ApiKeyBudget as `namespace/name`, as the ledger is told.
    pub name: String,
    book: Mutex<Book>,
}

impl LeasedAccount {
    pub fn new(name: impl Into<String>, book: Book) -> LeasedAccount {
        LeasedAccount { name: name.into(), book: Mutex::new(book) }
    }

    pub fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `amount` of credit for one request, from the live lease (or from the debt when the
    /// ledger is unreachable and `budget` fails open).
    pub fn reserve(&self, budget: &Budget, amount: u64, now_ms: u64) -> Result<LocalHold, Miss> {
        let mut book = self.lock();
        book.largest_reservation = book.largest_reservation.max(amount);
        match book.mode {
            Some(Mode::Exhausted) if book.unreachable_since.is_none() => {
                let (remaining, budget) = book.figures.as_ref().map_or((0, None), |f| {
                    let (remaining, above) = f.exhausted();
                    (remaining, above.map(str::to_string))
                });
                return Err(Miss::Exhausted { remaining, budget });
            }
            Some(Mode::PerRequest) if book.unreachable_since.is_none() => return Err(Miss::PerRequest),
            _ => {}
        }
        if let Some(lease) = book.lease.as_mut().filter(|l| l.live(now_ms) && l.usage.kind == UsageKind::Lease)
            && (budget.limit.is_none() || lease.credit_left() >= amount)
        {
            lease.usage.holds += 1;
            lease.usage.reserved = lease.usage.reserved.saturating_add(amount);
            return Ok(LocalHold { id: lease.usage.id.clone(), amount, on_debt: false });
        }
        if book.unreachable_since.is_none() {
            return Err(Miss::Lease);
        }
        if !budget.fail_open {
            return Err(Miss::Unavailable);
        }
        if book.debt.is_none() {
            book.debt = Some(book.new_debt(0, now_ms));
        }
        let Some(debt) = book.debt.as_mut() else { return Err(Miss::Unavailable) };
        let owed = debt.used.credit.saturating_add(debt.reserved);
        if budget.max_debt.is_some_and(|max| owed.saturating_add(amount) > max) {
            return Err(Miss::Unavailable);
        }
        debt.holds += 1;
        debt.reserved = owed.saturating_add(amount) - debt.used.credit;
        Ok(LocalHold { id: debt.id.clone(), amount, on_debt: true })
    }

    /// Holds `more` for a request that already holds `hold` (a stream that outgrew its
    /// reservation), from the same lease or debt.
    pub fn extend(&self, budget: &Budget, hold: &mut LocalHold, more: u64, now_ms: u64) -> Result<(), Miss> {
        let mut book = self.lock();
        let Book { lease, debt, .. } = &mut *book;
        if let Some(lease) = lease.as_mut().filter(|l| l.usage.id == hold.id) {
            if !lease.live(now_ms) {
                return Err(Miss::Lease);
            }
            if budget.limit.is_some() && lease.credit_left() < more {
                return Err(Miss::Lease);
            }
            lease.usage.reserved = lease.usage.reserved.saturating_add(more);
        } else if let Some(debt) = debt.as_mut().filter(|d| d.id == hold.id) {
            let owed = debt.used.credit.saturating_add(debt.reserved);
            if budget.max_debt.is_some_and(|max| owed.saturating_add(more) > max) {
                return Err(Miss::Unavailable);
            }
            debt.reserved = debt.reserved.saturating_add(more);
        } else {
            return Err(Miss::Lease);
        }
        hold.amount = hold.amount.saturating_add(more);
        Ok(())
    }

    /// Records what a held request cost (0 when it got no answer) and frees the rest.
    pub fn settle(&self, hold: LocalHold, cost: u64, tokens: u64, now_ms: u64) {
        let mut book = self.lock();
        book.since_grant.credit = book.since_grant.credit.saturating_add(cost);
        book.since_grant.tokens = book.since_grant.tokens.saturating_add(tokens);
        let Book { lease, debt, closing, .. } = &mut *book;
        let usage = lease
            .as_mut()
            .map(|l| &mut l.usage)
            .into_iter()
            .chain(debt.as_mut())
            .chain(closing.iter_mut())
            .find(|u| u.id == hold.id);
        match usage {
            Some(usage) => usage.settle(hold.amount, cost, tokens, now_ms),
            // Its lease is gone (the ledger forgot it): the spend is owed as a debt of its own.
            None if cost > 0 => {
                let debt = book.new_debt(cost, now_ms);
                book.closing.push(debt);
            }
            None => {}
        }
    }

    /// Counts a request against the rate limits from the lease: `Ok(None)` without limits,
    /// `Err(None)` when the lease has no allowance left (ask for more), `Err(Some)` when the
    /// ledger said the window is used up.
    pub fn admit_rate(&self, policy: RateLimitPolicy, now_ms: u64) -> Result<Option<RateStatus>, Miss> {
        let mut book = self.lock();
        if book.unreachable_since.is_some() {
            // Rate limits are the ledger's to hold; without it, the credit rules decide.
            return Ok(None);
        }
        match book.mode {
            // Each per-request reservation is also one request of the window, counted by the ledger.
            Some(Mode::PerRequest) => return Ok(None),
            // Refused for credit without asking the ledger, not held up by a lease call first.
            Some(Mode::Exhausted) => return Ok(None),
            _ => {}
        }
        let window = minute(now_ms);
        let reset = 60 - (now_ms / 1000) % 60;
        book.since_grant.requests = book.since_grant.requests.saturating_add(1);
        let Some(lease) = book.lease.as_mut().filter(|l| l.live(now_ms) && l.usage.window == window) else {
            return Err(Miss::Lease);
        };
        if policy.tokens_per_minute.is_some() && lease.usage.used.tokens >= lease.granted.tokens {
            return Err(Miss::Lease);
        }
        let Some(rpm) = policy.requests_per_minute.map(u64::from) else {
            return Ok(policy.tokens_per_minute.map(|tpm| RateStatus {
                limit: tpm,
                remaining: lease.granted.tokens.saturating_sub(lease.usage.used.tokens),
                reset,
            }));
        };
        if lease.usage.used.requests >= lease.granted.requests {
            return Err(Miss::Lease);
        }
        lease.usage.used.requests += 1;
        Ok(Some(RateStatus {
            limit: rpm,
            remaining: lease.granted.requests.saturating_sub(lease.usage.used.requests),
            reset,
        }))
    }

    /// Takes in the ledger's answer to a lease request: a new lease, more on the one held, or a
    /// mode without a grant.
    pub fn granted(&self, grant: &LeaseGrant, now_ms: u64) {
        let mut book = self.lock();
        book.answered();
        book.heard(&grant.budget);
        book.mode = Some(grant.mode);
        book.since_grant = Allowance::default();
        // An answer with no lease in state Active (the figures alone) grants nothing: a
        // request that waited on it still asks for its own.
        if !grant.lease_id.is_empty() || grant.mode != Mode::Lease {
            book.grants += 1;
        }
        if grant.lease_id.is_empty() {
            return;
        }
        let same = book.lease.as_ref().is_some_and(|l| l.usage.id == grant.lease_id);
        if !same && book.closing.iter().any(|u| u.id == grant.lease_id) {
            // Given back while this call was on its way: its report as done returns what the
            // ledger added to it. Spent from again, it would start over from nothing used.
            return;
        }
        if !same && let Some(old) = book.lease.take() {
            book.closing.push(old.usage);
        }
        let lease = book.lease.get_or_insert_with(|| Held {
            usage: Usage { id: grant.lease_id.clone(), window: grant.window, ..Usage::default() },
            ..Held::default()
        });
        if lease.usage.window != grant.window {
            // A new minute: the old window's requests and tokens are void on both sides.
            lease.usage.window = grant.window;
            lease.usage.used.requests = 0;
            lease.usage.used.tokens = 0;
            lease.usage.acked.requests = 0;
            lease.usage.acked.tokens = 0;
        }
        lease.granted = grant.granted;
        lease.expires_at = grant.expires_at;
        lease.granted_at = now_ms;
    }

    /// Takes in the fleet's figures from a per-request answer: they say the mode too.
    pub fn observed(&self, figures: BudgetFigures) {
        let mut book = self.lock();
        book.answered();
        book.mode = Some(match figures.state {
            BudgetState::Active => Mode::Lease,
            BudgetState::Low => Mode::PerRequest,
            BudgetState::Exhausted => Mode::Exhausted,
        });
        book.heard(&figures);
    }

    /// Records that the ledger acknowledged `used` for the lease, debt or reservation `id`.
    pub fn acked(&self, id: &str, used: Allowance, figures: Option<BudgetFigures>) {
        let mut book = self.lock();
        book.answered();
        let acked_at = figures.as_ref().map(|f| Acked { term: f.term, version: f.version });
        let Book { lease, debt, closing, .. } = &mut *book;
        for usage in lease.as_mut().map(|l| &mut l.usage).into_iter().chain(debt.as_mut()).chain(closing.iter_mut()) {
            if usage.id == id {
                usage.acked.raise_to(&used);
                if acked_at.is_some() {
                    usage.acked_at.clone_from(&acked_at);
                }
            }
        }
        // Done with what a write holds and has nothing in flight.
        if let Some(figures) = figures {
            book.heard(&figures);
        }
    }

    /// A closing usage's report (`usage` as it was sent) was taken in: done when nothing was in
    /// flight on it.
    pub fn closed_acked(&self, usage: &Usage, figures: BudgetFigures) {
        self.acked(&usage.id, usage.used, Some(figures));
        if usage.holds == 0 {
            let mut book = self.lock();
            if let Some(u) = book.closing.iter_mut().find(|u| u.id == usage.id && u.holds == 0) {
                u.done_acked = true;
            }
        }
    }

    /// What this sidecar holds, to tell a leader that has just taken over: its lease, its debt,
    /// its reservations in flight, and what it reported that no write is known to hold.
    pub fn holdings(&self) -> Holdings {
        let book = self.lock();
        let mut held: Vec<Holding> = Vec::new();
        if let Some(lease) = &book.lease {
            let mut holding = lease.usage.holding(lease.granted, lease.expires_at);
            holding.done = false;
            held.push(holding);
        }
        held.extend(book.debt.iter().map(|d| d.holding(Allowance::default(), 0)));
        for usage in &book.closing {
            let granted = Allowance { credit: usage.used.credit.saturating_add(usage.reserved), ..usage.used };
            held.push(usage.holding(granted, 0));
        }
        for (id, r) in &book.reservations {
            held.push(Holding {
                id: id.clone(),
                kind: HoldingKind::Reservation,
                granted: Allowance { credit: r.amount, requests: 1, tokens: 0 },
                used: Allowance { credit: 0, requests: 1, tokens: 0 },
                window: r.window,
                expires_at: r.expires_at,
                done: false,
                acked: None,
            });
        }
        Holdings { budget: self.name.clone(), held }
    }

    /// The new leader's answer to the holdings `told` ([`LeasedAccount::holdings`]): what its
    /// predecessor's write holds is done with, and what was used of it since it was told is owed
    /// as a debt; the rest is acknowledged as told and kept until a write of the new leader's
    /// holds it. What was used or settled since the holdings were taken is reported as usual.
    pub fn holdings_taken(&self, told: &Holdings, written: &[String], figures: BudgetFigures, now_ms: u64) {
        let mut book = self.lock();
        book.answered();
        let acked_at = Some(Acked { term: figures.term, version: figures.version });
        let told_used = |id: &str| told.held.iter().find(|h| h.id == id).map(|h| h.used);
        let is_written = |id: &str| written.iter().any(|w| w == id);
        let mut grown = 0;
        let mut since = |u: &Usage| {
            grown += u.used.credit.saturating_sub(told_used(&u.id).map_or(0, |t| t.credit));
        };
        if let Some(lease) = book.lease.take_if(|l| is_written(&l.usage.id)) {
            since(&lease.usage);
        }
        if let Some(debt) = book.debt.take_if(|d| is_written(&d.id)) {
            since(&debt);
        }
        book.closing.retain(|u| {
            let done = is_written(&u.id);
            if done {
                since(u);
            }
            !done
        });
        let Book { lease, debt, closing, .. } = &mut *book;
        for usage in lease.as_mut().map(|l| &mut l.usage).into_iter().chain(debt.as_mut()).chain(closing.iter_mut()) {
            let Some(used) = told_used(&usage.id) else { continue };
            usage.acked.raise_to(&used);
            usage.acked_at.clone_from(&acked_at);
        }
        if grown > 0 {
            let owed = book.new_debt(grown, now_ms);
            book.closing.push(owed);
        }
        book.heard(&figures);
        book.holdings_due = false;
    }

    /// The ledger is taking over and has not been told what this sidecar holds (it refused a
    /// report with [`super::protocol::Refused::TakingOver`]): tell it before reporting more.
    pub fn taking_over(&self) {
        self.lock().holdings_due = true;
    }

    /// A per-request reservation of the ledger, in flight until [`LeasedAccount::settled_remotely`].
    pub fn reserved_remotely(&self, id: &str, amount: u64, expires_at: u64, now_ms: u64) {
        let reservation = InFlight { amount, expires_at, window: minute(now_ms) };
        self.lock().reservations.insert(id.to_string(), reservation);
    }

    /// The ledger does not know lease `id`: what it had not acknowledged becomes a debt, and the
    /// lease is no longer spent from.
    pub fn forgotten(&self, id: &str, now_ms: u64) {
        let mut book = self.lock();
        let book = &mut *book;
        let (lease, closing) = (&mut book.lease, &mut book.closing);
        let mut owed = 0;
        if lease.as_ref().is_some_and(|l| l.usage.id == id)
            && let Some(old) = lease.take()
        {
            owed += old.usage.used.credit.saturating_sub(old.usage.acked.credit);
            if old.usage.holds > 0 {
                // Requests in flight settle onto it (and are owed as a debt of their own then).
                // Under the lease's id, which the ledger no longer has, from zero.
                closing.push(Usage {
                    kind: UsageKind::Debt,
                    used: Allowance::default(),
                    acked: Allowance::default(),
                    ..old.usage
                });
            }
        }
        closing.retain(|u| {
            if u.id == id && u.holds == 0 {
                owed += u.used.credit.saturating_sub(u.acked.credit);
                false
            } else {
                true
            }
        });
        if owed > 0 {
            let debt = book.new_debt(owed, now_ms);
            book.closing.push(debt);
        }
    }

    /// The ledger could not be reached.
    pub fn unreachable(&self, now_ms: u64) {
        let mut book = self.lock();
        book.unreachable_since.get_or_insert(now_ms);
    }

    /// The ledger is back: the debt stops growing and is reported like any closed usage.
    pub fn reachable(&self) {
        self.lock().answered();
    }

    /// Stops spending: the lease and the debt are closed, to be reported done once nothing is
    /// in flight on them.
    pub fn retire(&self) {
        let mut book = self.lock();
        if let Some(lease) = book.lease.take() {
            book.closing.push(lease.usage);
        }
        if let Some(debt) = book.debt.take() {
            book.closing.push(debt);
        }
    }

    /// Outside state Active the lease is not spent from, nor when it cannot hold a request of
    /// `amount` that the ledger is asked to reserve itself (its credit may be what is missing
    /// there): once nothing is in flight on it, it is given back.
    pub fn give_back_unspendable(&self, amount: u64) {
        let mut book = self.lock();
        let inactive = book.mode.is_some_and(|m| m != Mode::Lease);
        if book.lease.as_ref().is_some_and(|l| l.usage.holds == 0 && (inactive || l.credit_left() < amount))
            && let Some(old) = book.lease.take()
        {
            book.closing.push(old.usage);
        }
    }

    /// Gives the lease back: it is no longer spent from, and is reported done (returning what it
    /// did not use) once nothing is in flight on it.
    pub fn retire_lease(&self) {
        let mut book = self.lock();
        if let Some(lease) = book.lease.take() {
            book.closing.push(lease.usage);
        }
    }

    /// Nothing held, nothing in flight, nothing left to report.
    pub fn is_settled(&self) -> bool {
        let book = self.lock();
        book.lease.is_none() && book.debt.is_none() && book.closing.is_empty()
    }

    /// A settled per-request reservation, to report.
    pub fn settled_remotely(&self, id: String, cost: u64, tokens: u64, now_ms: u64) {
        let mut book = self.lock();
        book.reservations.remove(&id);
        book.since_grant.credit = book.since_grant.credit.saturating_add(cost);
        book.closing.push(Usage {
            id,
            kind: UsageKind::Reservation,
            used: Allowance { credit: cost, requests: 1, tokens },
            window: minute(now_ms),
            ..Usage::default()
        });
    }

    /// The room to ask the lease to have, from demand: twice the use since the last grant, and
    /// room for a few of the largest requests seen (`floor` before any), besides what requests in
    /// flight hold. The ledger tops a lease up to it, never past it.
    pub fn want(&self, floor: Allowance) -> Allowance {
        let book = self.lock();
        let twice = |used: u64| used.saturating_mul(2);
        let in_flight = book.lease.as_ref().map_or(0, |l| l.usage.reserved);
        Allowance {
            credit: twice(book.since_grant.credit)
                .max(book.largest_reservation.saturating_mul(4))
                .max(floor.credit)
                .saturating_add(in_flight),
            requests: twice(book.since_grant.requests).max(floor.requests),
            tokens: twice(book.since_grant.tokens).max(floor.tokens),
        }
    }

    /// The credit the lease must have for a request of `amount` besides those in flight.
    pub fn need_for(&self, amount: u64) -> u64 {
        self.lock().lease.as_ref().map_or(0, |l| l.usage.reserved).saturating_add(amount)
    }

    /// Whether the lease went unused since it was last granted, with nothing in flight: idle.
    pub fn is_idle(&self) -> bool {
        let book = self.lock();
        book.since_grant.is_zero() && book.lease.as_ref().is_none_or(|l| l.usage.holds == 0)
    }
}

/// Whether the held lease should be renewed now: a third of its life left, half of what was
/// wanted left, or a new rate window.
pub fn needs_renewal(
    lease: &Held,
    want: &Allowance,
    limited: bool,
    rate: Option<RateLimitPolicy>,
    now_ms: u64,
) -> bool {
    let life = lease.expires_at.saturating_sub(lease.granted_at);
    if lease.expires_at.saturating_sub(now_ms) <= life / 3 {
        return true;
    }
    if limited && lease.credit_left() < want.credit / 2 {
        return true;
    }
    let Some(rate) = rate else { return false };
    if lease.usage.window != minute(now_ms) {
        return true;
    }
    let short = |granted: u64, used: u64, want: u64| granted.saturating_sub(used) < want / 2;
    (rate.requests_per_minute.is_some() && short(lease.granted.requests, lease.usage.used.requests, want.requests))
        || (rate.tokens_per_minute.is_some() && short(lease.granted.tokens, lease.usage.used.tokens, want.tokens))
}

pub fn minute(now_ms: u64) -> u64 {
    now_ms / 60_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Period;

    // 2026-11-30 12:00:00 UTC, in milliseconds.
    const T: u64 = 1_796_040_000_000;

    fn budget(limit: Option<u64>, fail_open: bool, max_debt: Option<u64>) -> Budget {
        Budget {
            namespace: "ns".into(),
            name: "key".into(),
            key_hash: None,
            parent: None,
            top_up: None,
            limit,
            period: Period::Monthly,
            low_balance: None,
            fail_open,
            max_debt,
            allowed_models: None,
            rate_limit: None,
            workload_selector: None,
        }
    }

    fn figures(state: BudgetState) -> BudgetFigures {
        BudgetFigures {
            spent: 0,
            remaining: Some(5),
            outstanding: 0,
            period_start: 0,
            state,
            term: 0,
            version: 0,
            durable: 0,
            topped_up: 0,
            parents: Vec::new(),
        }
    }

    fn grant(id: &str, mode: Mode, credit: u64, requests: u64) -> LeaseGrant {
        LeaseGrant {
            lease_id: id.into(),
            mode,
            granted: Allowance { credit, requests, tokens: 0 },
            window: minute(T),
            expires_at: T + 30_000,
            budget: figures(BudgetState::Active),
        }
    }

    #[test]
    fn requests_spend_the_lease_locally_until_it_is_short() {
        let account = LeasedAccount::new("key", Book::new("pod-1"));
        let b = budget(Some(1000), false, None);
        assert_eq!(account.reserve(&b, 10, T), Err(Miss::Lease), "no lease yet");
        account.granted(&grant("l-1", Mode::Lease, 100, 0), T);
        let first = account.reserve(&b, 60, T).unwrap();
        assert_eq!(account.reserve(&b, 60, T), Err(Miss::Lease), "40 left of the lease");
        account.settle(first, 25, 7, T);
        let lease = account.lock().lease.clone().unwrap();
        assert_eq!((lease.usage.used.credit, lease.usage.reserved, lease.credit_left()), (25, 0, 75));
        assert!(account.reserve(&b, 60, T).is_ok());
        assert_eq!(account.reserve(&b, 10, T + 30_000), Err(Miss::Lease), "an expired lease is not spent");
    }

    #[test]
    fn the_ledgers_mode_decides_before_the_lease() {
        let account = LeasedAccount::new("key", Book::new("pod-1"));
        let b = budget(Some(1000), false, None);
        account.granted(&grant("l-1", Mode::Lease, 100, 0), T);
        let mut low = grant("l-1", Mode::PerRequest, 100, 0);
        low.budget = figures(BudgetState::Low);
        account.granted(&low, T);
        assert_eq!(account.reserve(&b, 10, T), Err(Miss::PerRequest));
        let mut out = grant("", Mode::Exhausted, 0, 0);
        out.budget = BudgetFigures { remaining: Some(0), ..figures(BudgetState::Exhausted) };
        account.granted(&out, T);
        assert_eq!(account.reserve(&b, 10, T), Err(Miss::Exhausted { remaining: 0, budget: None }));
        let policy = RateLimitPolicy { requests_per_minute: Some(10), tokens_per_minute: None };
        assert_eq!(account.admit_rate(policy, T), Ok(None), "refused for credit, not held up for a lease first");
    }

    #[test]
    fn an_unreachable_ledger_fails_closed_or_runs_a_bounded_debt() {
        let closed = LeasedAccount::new("key", Book::new("pod-1"));
        closed.unreachable(T);
        assert_eq!(closed.reserve(&budget(Some(1000), false, None), 10, T), Err(Miss::Unavailable));

        let open = LeasedAccount::new("key", Book::new("pod-1"));
        let b = budget(Some(1000), true, Some(50));
        open.granted(&grant("l-1", Mode::Lease, 20, 0), T);
        open.unreachable(T);
        let on_lease = open.reserve(&b, 20, T).unwrap();
        assert_eq!(on_lease.id, "l-1", "the live lease is spent first");
        let mut debt = open.reserve(&b, 30, T).unwrap();
        assert_eq!(debt.id, "pod-1-1", "then the debt");
        assert_eq!(open.reserve(&b, 30, T), Err(Miss::Unavailable), "maxDebt bounds it");
        assert_eq!(open.extend(&b, &mut debt, 20, T), Ok(()));
        assert_eq!(open.extend(&b, &mut debt, 1, T), Err(Miss::Unavailable));
        open.settle(debt, 45, 0, T);
        open.settle(on_lease, 20, 0, T);
        // Any answer of the ledger ends the debt, here the acknowledgement of a report.
        open.acked("l-1", Allowance { credit: 20, requests: 0, tokens: 0 }, None);
        let book = open.lock().clone();
        assert!(book.debt.is_none());
        assert_eq!(book.closing.len(), 1);
        assert_eq!((book.closing[0].kind, book.closing[0].used.credit), (UsageKind::Debt, 45));
        drop(book);
        let taken_in = BudgetFigures { term: 7, version: 3, durable: 2, ..figures(BudgetState::Active) };
        open.acked("pod-1-1", Allowance { credit: 45, requests: 0, tokens: 0 }, Some(taken_in.clone()));
        assert_eq!(open.lock().closing.len(), 1, "acknowledged, kept until a write holds it");
        open.observed(BudgetFigures { durable: 3, ..taken_in.clone() });
        assert!(open.lock().closing.is_empty(), "acknowledged and written: done");
    }

    #[test]
    fn rate_allowance_comes_from_the_lease_window() {
        let account = LeasedAccount::new("key", Book::new("pod-1"));
        let policy = RateLimitPolicy { requests_per_minute: Some(10), tokens_per_minute: None };
        assert_eq!(account.admit_rate(policy, T), Err(Miss::Lease));
        account.granted(&grant("l-1", Mode::Lease, 0, 2), T);
        assert_eq!(account.admit_rate(policy, T).unwrap(), Some(RateStatus { limit: 10, remaining: 1, reset: 60 }));
        assert!(account.admit_rate(policy, T + 1).is_ok());
        assert_eq!(account.admit_rate(policy, T + 2), Err(Miss::Lease), "the lease's two requests are used");
        assert_eq!(account.admit_rate(policy, T + 60_000), Err(Miss::Lease), "a new window needs a new grant");
    }

    #[test]
    fn a_forgotten_lease_becomes_a_debt_of_what_was_not_acknowledged() {
        let account = LeasedAccount::new("key", Book::new("pod-1"));
        let b = budget(Some(1000), false, None);
        account.granted(&grant("l-1", Mode::Lease, 100, 0), T);
        let hold = account.reserve(&b, 10, T).unwrap();
        account.settle(hold, 10, 0, T);
        account.acked("l-1", Allowance { credit: 4, requests: 0, tokens: 0 }, None);
        let in_flight = account.reserve(&b, 10, T).unwrap();
        account.forgotten("l-1", T);
        account.settle(in_flight, 3, 0, T);
        let book = account.lock().clone();
        assert!(book.lease.is_none());
        let owed: u64 = book.closing.iter().map(|u| u.used.credit - u.acked.credit).sum();
        assert_eq!(owed, 6 + 3, "the unacknowledged 6, and the 3 settled after");
        assert!(book.closing.iter().all(|u| u.kind == UsageKind::Debt));
    }

    #[test]
    fn a_new_leader_is_told_everything_held_and_what_its_predecessor_wrote_is_let_go() {
        let account = LeasedAccount::new("team-a/key", Book::new("pod-1"));
        let b = budget(Some(1000), false, None);
        let first = BudgetFigures { term: 1, version: 4, durable: 4, ..figures(BudgetState::Active) };
        account.granted(&LeaseGrant { budget: first.clone(), ..grant("l-1", Mode::Lease, 100, 0) }, T);
        assert!(account.lock().holdings_due, "the first leader heard from is told too (of nothing yet)");
        account.holdings_taken(&account.holdings(), &[], first.clone(), T);
        let hold = account.reserve(&b, 10, T).unwrap();
        account.settle(hold, 10, 0, T);
        account.retire_lease();
        let reported = account.lock().closing[0].clone();
        account.closed_acked(&reported, BudgetFigures { version: 5, ..first.clone() });
        account.granted(
            &LeaseGrant { budget: BudgetFigures { version: 6, ..first.clone() }, ..grant("l-2", Mode::Lease, 50, 0) },
            T,
        );
        account.reserved_remotely("r-1", 7, T + 60_000, T);
        assert!(!account.lock().holdings_due, "the same leader");

        // Another leader answers: it is told of the lease, the closed lease and the reservation.
        let next = BudgetFigures { term: 2, version: 1, durable: 0, ..first.clone() };
        account.observed(next.clone());
        assert!(account.lock().holdings_due);
        let holdings = account.holdings();
        let ids: Vec<(&str, HoldingKind, bool)> =
            holdings.held.iter().map(|h| (h.id.as_str(), h.kind, h.done)).collect();
        assert_eq!(
            ids,
            [
                ("l-2", HoldingKind::Lease, false),
                ("l-1", HoldingKind::Lease, true),
                ("r-1", HoldingKind::Reservation, false)
            ]
        );
        assert_eq!(holdings.held[1].acked, Some(Acked { term: 1, version: 5 }), "where it was taken in");
        assert_eq!(holdings.budget, "team-a/key");

        // l-1 was in the last leader's write: let go; the rest is kept for the new leader's.
        account.holdings_taken(&holdings, &["l-1".to_string()], BudgetFigures { version: 2, ..next.clone() }, T);
        let book = account.lock().clone();
        assert!(!book.holdings_due && book.closing.is_empty());
        assert_eq!(book.lease.as_ref().unwrap().usage.acked_at, Some(Acked { term: 2, version: 2 }));
    }

    #[test]
    fn a_lease_too_short_for_a_request_is_given_back_and_not_taken_again() {
        let account = LeasedAccount::new("key", Book::new("pod-1"));
        let b = budget(Some(1000), false, None);
        account.granted(&grant("l-1", Mode::Lease, 100, 0), T);
        let hold = account.reserve(&b, 93, T).unwrap();
        account.give_back_unspendable(10);
        assert!(account.lock().lease.is_some(), "a request is in flight on it");
        account.settle(hold, 93, 0, T);
        account.give_back_unspendable(7);
        assert!(account.lock().lease.is_some(), "7 left: it holds a request of 7");
        account.give_back_unspendable(10);
        let book = account.lock().clone();
        assert!(book.lease.is_none());
        assert_eq!((book.closing[0].id.as_str(), book.closing[0].used.credit), ("l-1", 93));
        // A renewal sent before it was given back is answered with more on it: not spent again.
        account.granted(&grant("l-1", Mode::Lease, 150, 0), T);
        assert!(account.lock().lease.is_none(), "its report as done returns the 50 added");
        assert_eq!(account.reserve(&b, 10, T), Err(Miss::Lease));
        account.granted(&grant("l-2", Mode::Lease, 20, 0), T);
        assert!(account.reserve(&b, 10, T).is_ok());
    }

    #[test]
    fn use_since_the_holdings_were_told_of_a_lease_the_last_write_holds_is_owed_as_a_debt() {
        let account = LeasedAccount::new("team-a/key", Book::new("pod-1"));
        let b = budget(Some(1000), false, None);
        account.granted(&grant("l-1", Mode::Lease, 100, 0), T);
        let hold = account.reserve(&b, 10, T).unwrap();
        account.settle(hold, 10, 0, T);
        let in_flight = account.reserve(&b, 10, T).unwrap();
        let told = account.holdings();
        // Used after the holdings were taken: 5 settled, and one still in flight.
        let hold = account.reserve(&b, 5, T).unwrap();
        account.settle(hold, 5, 0, T);
        let next = BudgetFigures { term: 2, version: 1, ..figures(BudgetState::Active) };
        account.holdings_taken(&told, &["l-1".to_string()], next, T);
        account.settle(in_flight, 7, 0, T);
        let book = account.lock().clone();
        assert!(book.lease.is_none(), "the last leader's lease is not spent from any more");
        let owed: Vec<(UsageKind, u64, u64)> =
            book.closing.iter().map(|u| (u.kind, u.used.credit, u.acked.credit)).collect();
        assert_eq!(owed, [(UsageKind::Debt, 5, 0), (UsageKind::Debt, 7, 0)], "what the write does not hold");
    }

    /// The sidecar's side of a takeover against two real ledgers: the keeper's calls, made by
    /// hand in the order a test picks.
    mod takeover {
        use super::*;
        use crate::budget::fleet::{FleetLedger, Terms};
        use crate::budget::protocol::{LeaseRequest, Refused, Report};

        const ID: &str = "ns/key";
        const COST: u64 = 15;

        fn low() -> Terms {
            Terms {
                limit: Some(600),
                period: Period::Monthly,
                low_balance: Some(600),
                rate: None,
                parent: None,
                top_up: None,
            }
        }

        /// One per-request answer: reserved, answered and settled locally, not yet reported.
        fn answer(ledger: &mut FleetLedger, account: &LeasedAccount, now: u64) -> String {
            let reserved = ledger.reserve(ID, "pod-1", COST, now).unwrap();
            account.reserved_remotely(&reserved.reservation_id, COST, reserved.expires_at, now);
            account.observed(reserved.budget);
            account.settled_remotely(reserved.reservation_id.clone(), COST, 0, now);
            reserved.reservation_id
        }

        /// The keeper's reports of what is closing, as `Fleet::keep_account` answers them.
        fn report(ledger: &mut FleetLedger, account: &LeasedAccount, now: u64) {
            let closing = account.lock().closing.clone();
            for usage in closing.iter().filter(|u| u.needs_report()) {
                let answer = match usage.kind {
                    UsageKind::Reservation => {
                        ledger.settle(ID, "pod-1", &usage.id, usage.used.credit, usage.used.tokens, now)
                    }
                    _ => ledger.report(ID, "pod-1", &Report { done: usage.holds == 0, ..used_of_usage(usage) }, now),
                };
                match answer {
                    Ok(figures) => account.closed_acked(usage, figures),
                    Err(Refused::UnknownLease) => account.forgotten(&usage.id, now),
                    Err(Refused::TakingOver) => account.taking_over(),
                    Err(e) => panic!("{e:?}"),
                }
            }
        }

        /// A lease call that asks for nothing: the figures, and the mode.
        fn figures_only() -> LeaseRequest {
            LeaseRequest {
                budget: ID.into(),
                lease_id: None,
                used: Allowance::default(),
                want: Allowance::default(),
                need: Allowance::default(),
            }
        }

        fn used_of_usage(usage: &Usage) -> Report {
            Report { budget: ID.into(), lease_id: usage.id.clone(), used: usage.used, done: false }
        }

        fn used_of(lease: &Held) -> Report {
            used_of_usage(&lease.usage)
        }

        fn tell_holdings(ledger: &mut FleetLedger, account: &LeasedAccount, now: u64) {
            let told = account.holdings();
            let taken = ledger.holdings(ID, "pod-1", &told, now).unwrap();
            account.holdings_taken(&told, &taken.written, taken.budget, now);
        }

        /// A leader that took two settles in and wrote only the first, then died; its successor,
        /// from that write.
        fn killed_after_one_write(account: &LeasedAccount) -> FleetLedger {
            let mut old = FleetLedger::new("old");
            old.set_budgets([(ID.to_string(), low(), None)], T);
            answer(&mut old, account, T);
            report(&mut old, account, T);
            let (_, written, _) = old.take_dirty(T).pop().unwrap();
            old.confirm(ID, &written);
            answer(&mut old, account, T + 1);
            report(&mut old, account, T + 1);
            assert!(account.lock().closing.iter().all(|u| u.done_acked), "both settles taken in");
            let mut next = FleetLedger::new("next");
            next.set_budgets([(ID.to_string(), low(), Some(written))], T + 2);
            next
        }

        #[test]
        fn use_a_dead_leader_took_in_and_never_wrote_is_told_as_held_not_dropped() {
            let account = LeasedAccount::new(ID, Book::new("pod-1"));
            let b = budget(Some(600), false, None);
            let active = Terms { low_balance: None, ..low() };
            let mut old = FleetLedger::new("old");
            old.set_budgets([(ID.to_string(), active.clone(), None)], T);
            account.granted(&old.lease(ID, "pod-1", &figures_only(), T).unwrap(), T);
            let (_, written, _) = old.take_dirty(T).pop().unwrap();
            assert_eq!(written.holders, ["pod-1"]);
            old.confirm(ID, &written);
            // A lease granted after the last write, within its pledge; 10 of it reported.
            let want = LeaseRequest { want: Allowance { credit: 100, ..Allowance::default() }, ..figures_only() };
            account.granted(&old.lease(ID, "pod-1", &want, T + 1).unwrap(), T + 1);
            let hold = account.reserve(&b, 10, T + 1).unwrap();
            account.settle(hold, 10, 0, T + 1);
            let lease = account.lock().lease.clone().unwrap();
            let figures = old.report(ID, "pod-1", &used_of(&lease), T + 1).unwrap();
            account.acked(&lease.usage.id, lease.usage.used, Some(figures));
            let hold = account.reserve(&b, 2, T + 1).unwrap();
            account.settle(hold, 2, 0, T + 1);

            // The next leader does not know the lease: it grants a new one, and the old one is
            // reported before the holdings are told (the keeper reports in the round that heard
            // of the new leader).
            let mut next = FleetLedger::new("next");
            next.set_budgets([(ID.to_string(), active, Some(written))], T + 2);
            let renew = LeaseRequest {
                lease_id: Some(lease.usage.id.clone()),
                used: Allowance { credit: 12, ..Allowance::default() },
                ..want
            };
            account.granted(&next.lease(ID, "pod-1", &renew, T + 3).unwrap(), T + 3);
            report(&mut next, &account, T + 3);
            assert!(account.lock().holdings_due, "the new leader is still to be told");
            tell_holdings(&mut next, &account, T + 4);
            report(&mut next, &account, T + 4);
            assert_eq!(next.figures(ID, T + 4).unwrap().spent, 12, "what the dead leader took in counts, once");
        }

        #[test]
        fn what_settles_while_the_holdings_are_on_their_way_is_still_reported() {
            let account = LeasedAccount::new(ID, Book::new("pod-1"));
            let mut next = killed_after_one_write(&account);
            let grant = next.lease(ID, "pod-1", &figures_only(), T + 3).unwrap();
            account.granted(&grant, T + 3);
            tell_holdings(&mut next, &account, T + 4);
            // Held, told as in flight; settled after the holdings were taken and before they
            // were answered.
            let reserved = next.reserve(ID, "pod-1", COST, T + 5).unwrap();
            account.reserved_remotely(&reserved.reservation_id, COST, reserved.expires_at, T + 5);
            let told = account.holdings();
            let taken = next.holdings(ID, "pod-1", &told, T + 5).unwrap();
            account.settled_remotely(reserved.reservation_id.clone(), COST, 0, T + 5);
            account.holdings_taken(&told, &taken.written, taken.budget.clone(), T + 5);
            // A write, and an answer that says so, before the keeper reports.
            for (id, persisted, _) in next.take_dirty(T + 6) {
                next.confirm(&id, &persisted);
            }
            account.observed(next.figures(ID, T + 6).unwrap());
            report(&mut next, &account, T + 6);
            assert_eq!(next.figures(ID, T + 6).unwrap().spent, 3 * COST);
        }
    }

    #[test]
    fn renewal_comes_ahead_of_expiry_and_of_running_short() {
        let account = LeasedAccount::new("key", Book::new("pod-1"));
        account.granted(&grant("l-1", Mode::Lease, 100, 0), T);
        let lease = account.lock().lease.clone().unwrap();
        let want = Allowance { credit: 100, requests: 0, tokens: 0 };
        assert!(!needs_renewal(&lease, &want, true, None, T));
        assert!(needs_renewal(&lease, &want, true, None, T + 20_000), "a third of its life left");
        let want = Allowance { credit: 300, requests: 0, tokens: 0 };
        assert!(needs_renewal(&lease, &want, true, None, T), "demand grew past twice what is left");
        assert!(!needs_renewal(&lease, &want, false, None, T), "credit is not limited");
    }
}
