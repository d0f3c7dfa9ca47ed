//! The fleet's ledger: one book per budget, from which sidecars lease credit and rate allowance,
//! and to which they report what they used. It lives in the operator's leader; this module is
//! its pure core (time is passed in, persisting and serving are the caller's), so that its
//! invariants are tested without a network:
//!
//! - A grant never exceeds the unleased remainder, `limit - spent - outstanding`: spend across
//!   the fleet passes the limit only by what answers cost beyond their reservations, as in
//!   standalone mode, never by lease sizes or by the number of sidecars.
//! - Reports are cumulative per lease, so a repeated or late report counts once.
//! - A lease's unreported credit stays outstanding until it is reported, or until
//!   [`REPORT_GRACE_MS`] after it expired (a sidecar stops spending a lease when it expires and
//!   reports what it used).
//! - Requests and tokens per minute are leased the same way from the current minute's allowance.
//!
//! Grants are answered from memory, not after a status write, so that no request waits on the
//! API server. What a new leader must not grant twice is bounded by a *pledge* that the written
//! status holds: the credit the leader may have out beyond the spend it wrote (granted and not
//! reported, or reported and not written). A grant that would take the leader past the written
//! pledge, or the first one to a sidecar the written status does not name, is answered only once
//! a write holds it. A new leader grants only what the written status proves free (the limit, less
//! the written spend and pledge) until every sidecar it names has told it what it holds
//! ([`Holdings`]) or could no longer hold anything; then it knows the books exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::period::period_start;
use super::protocol::{
    Allowance, BudgetFigures, Debt, Holding, HoldingKind, Holdings, HoldingsTaken, LeaseGrant, LeaseRequest, Mode,
    ParentFigures, Refused, Report, Reserved,
};
use crate::api::{BudgetState, Period};
use crate::config::{Budget, MAX_BUDGET_CHAIN, RateLimitPolicy, TopUpPolicy, status_owner};

/// How long a lease lasts when the budget has plenty left; it shrinks with the balance.
pub const LEASE_LIFETIME_MS: u64 = 30_000;
/// The shortest lease, near the limit.
pub const MIN_LEASE_LIFETIME_MS: u64 = 5_000;
/// How long a per-request reservation may stay open: the longest answer a route allows.
pub const RESERVATION_LIFETIME_MS: u64 = 15 * 60_000;
/// After a lease expires, how long its unreported credit still counts as outstanding, and how
/// long a late report is still accepted.
pub const REPORT_GRACE_MS: u64 = 60_000;

/// Whether a call's answer must wait for the budget's book to be persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persist {
    /// What changed must survive a new leader before the caller relies on it.
    BeforeAnswer,
    /// The same, for a sidecar the written status does not name yet: its first calls, at its
    /// start, written at once rather than at the next interval.
    NewHolder,
    /// The caller will say it again if it is lost: the next write takes it.
    Eventually,
}

impl Persist {
    pub fn waits(self) -> bool {
        self != Persist::Eventually
    }
}

/// What a budget's spec limits, as the ledger needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terms {
    pub limit: Option<u64>,
    pub period: Period,
    pub low_balance: Option<u64>,
    pub rate: Option<RateLimitPolicy>,
    /// The budget above it, `namespace/name`, whose limit its spend also counts against.
    pub parent: Option<String>,
    pub top_up: Option<TopUpPolicy>,
}

impl From<&Budget> for Terms {
    fn from(b: &Budget) -> Terms {
        Terms {
            limit: b.limit,
            period: b.period,
            low_balance: b.low_balance,
            rate: b.rate_limit,
            parent: b.parent.as_ref().map(|p| format!("{}/{p}", b.namespace)),
            top_up: b.top_up,
        }
    }
}

/// A budget's spend in the period of a budget above it, when that differs from its own: an
/// ancestor's spend is its own and its descendants' in its period, each as its book holds it,
/// so that what a new leader reads back always adds up, whichever book was written last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeriodSpend {
    pub period: Period,
    /// Unix seconds.
    pub start: u64,
    pub spent: u64,
}

/// A raise of a key's limit from its parent's credit, for the operator to tell as an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopUp {
    /// `namespace/name`.
    pub budget: String,
    pub added: u64,
    /// All top-ups of the budget's current period, this one included.
    pub this_period: u64,
}

/// One lease (or per-request reservation) as the ledger keeps it, and as it is persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    /// The sidecar that holds it (its pod), the only one that may report on it.
    pub holder: String,
    /// Credit for the lease's life; requests and tokens for `window`.
    pub granted: Allowance,
    /// What the holder reported using, cumulative.
    pub used: Allowance,
    /// The minute of the rate grants.
    pub window: u64,
    /// Unix milliseconds.
    pub expires_at: u64,
    /// Reported done: nothing more will be used.
    pub done: bool,
}

impl Lease {
    fn live(&self, now_ms: u64) -> bool {
        !self.done && now_ms < self.expires_at
    }

    /// Credit that may still be spent on it, or reported late.
    fn unreported_credit(&self, now_ms: u64) -> u64 {
        if self.done || now_ms >= self.expires_at.saturating_add(REPORT_GRACE_MS) {
            return 0;
        }
        self.granted.credit.saturating_sub(self.used.credit)
    }

    /// Requests or tokens it holds of `window`'s allowance: what it may still use while live,
    /// what it used once done.
    fn committed(&self, window: u64, now_ms: u64, pick: fn(&Allowance) -> u64) -> u64 {
        if self.window != window {
            return 0;
        }
        let used = pick(&self.used);
        if self.live(now_ms) { used.max(pick(&self.granted)) } else { used }
    }
}

/// A budget's book: its period's spend and every open lease on it.
#[derive(Clone, Debug)]
struct Book {
    terms: Terms,
    period_start: u64,
    /// Its own spend: what its leases, reservations and debts reported this period.
    spent: u64,
    /// Its own spend in the periods of the budgets above it (see [`PeriodSpend`]).
    spent_in: Vec<PeriodSpend>,
    /// What top-ups added to its limit this period.
    topped_up: u64,
    /// Leases not reported done (live, or expired and still to be reported on).
    leases: BTreeMap<String, Lease>,
    /// Leases reported done, and debts, kept for [`REPORT_GRACE_MS`] so that a repeated report
    /// counts once. Not persisted: per-request reservations close at request rates, and the
    /// status must stay small.
    closed: HashMap<String, Closed>,
    /// What closed leases used of a minute's requests and tokens: (minute, used).
    window_used: (u64, Allowance),
    /// Changed since it was last persisted.
    dirty: bool,
    /// Changes so far in this term; each answer names the change it made.
    version: u64,
    /// What the last successful write holds, and what the write under way will.
    durable: Durable,
    writing: Option<Durable>,
    /// The largest exposure since the last write: the next pledge is sized from it.
    peak: u64,
    /// The sidecars that may hold credit of this budget, and when each last called (Unix ms).
    holders: BTreeMap<String, u64>,
    /// After a takeover: what the last leader may still have out, until every sidecar it named
    /// has said what it holds.
    recovery: Option<Recovery>,
    /// For each earlier leader's term, the last change its write holds, and until when a
    /// sidecar may still tell of a report that term took in (Unix ms): a report taken in up to
    /// that change is in the written spend already.
    inherited: BTreeMap<u64, (u64, u64)>,
}

/// What the last successful write of a book holds.
#[derive(Clone, Debug, Default)]
struct Durable {
    version: u64,
    spent: u64,
    spent_in: Vec<PeriodSpend>,
    pledged: u64,
    holders: BTreeSet<String>,
}

impl Durable {
    fn of(persisted: &Persisted, term: u64) -> Durable {
        Durable {
            version: persisted.writes.iter().find(|(t, _)| *t == term).map_or(0, |(_, v)| *v),
            spent: persisted.spent,
            spent_in: persisted.spent_in.clone(),
            pledged: persisted.pledged,
            holders: persisted.holders.iter().cloned().collect(),
        }
    }
}

/// A book taken over from another leader.
#[derive(Clone, Debug)]
struct Recovery {
    /// The last leader's written pledge: credit it may have had out beyond its written spend.
    pledged: u64,
    /// Its holders not heard from yet, and until when each may still hold what it granted.
    awaiting: BTreeMap<String, u64>,
}

/// A lease reported done, as far as a repeated report needs it.
#[derive(Clone, Debug)]
struct Closed {
    holder: String,
    used: Allowance,
    closed_at: u64,
}

/// A removed budget's spend, kept by `heir` (see [`FleetLedger::remove`]): in the heir's period
/// and each period it keeps for the budgets above it.
#[derive(Clone, Debug)]
struct Left {
    heir: String,
    spend: Vec<PeriodSpend>,
}

/// What persisting a budget's book keeps: enough for a new leader to go on where this one
/// stopped, without losing reported spend or granting credit twice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Persisted {
    /// The budget's own spend in its period (its descendants' is in theirs).
    pub spent: u64,
    /// Unix seconds.
    pub period_start: u64,
    /// Its own spend in the periods of the budgets above it.
    pub spent_in: Vec<PeriodSpend>,
    /// What top-ups added to its limit in the period.
    pub topped_up: u64,
    pub leases: Vec<Lease>,
    /// Credit the leader may have out beyond `spent`: granted and not reported, or reported and
    /// not written.
    pub pledged: u64,
    /// The sidecars that may hold credit.
    pub holders: Vec<String>,
    /// For each leader term whose reports the written figures hold: the last change they hold
    /// (this leader's, and those of a takeover not yet over).
    pub writes: Vec<(u64, u64)>,
}

/// A book taken to be written: its budget's id, what to persist and its figures.
pub type Taken = (String, Persisted, BudgetFigures);

/// The books of every budget the ledger serves, by `namespace/name`.
#[derive(Debug, Default)]
pub struct FleetLedger {
    books: HashMap<String, Book>,
    /// The budgets right below each budget that has any, by id.
    children: HashMap<String, Vec<String>>,
    /// What each removed budget spent this period, left with the nearest budget above it that
    /// stayed, by the removed budget's id: given back if it returns with its stored spend.
    left: HashMap<String, Left>,
    /// Top-ups since they were last taken.
    top_ups: Vec<TopUp>,
    /// Makes lease ids unique across leaders: the leader's identity and start.
    id_prefix: String,
    /// The leader's term, named in every answer: a hash of `id_prefix`.
    term: u64,
    next_id: u64,
}

impl FleetLedger {
    pub fn new(id_prefix: impl Into<String>) -> Self {
        let id_prefix = id_prefix.into();
        // FNV-1a: stable across builds, as the number goes into statuses; 63 bits of it, as the
        // API server stores integers as int64 and refuses a status with a larger one.
        let term =
            id_prefix.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
                >> 1;
        FleetLedger {
            books: HashMap::new(),
            children: HashMap::new(),
            left: HashMap::new(),
            top_ups: Vec::new(),
            id_prefix,
            term,
            next_id: 0,
        }
    }

    /// The leader's term, as its answers name it.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Brings the served budgets in line with the configurations: new budgets start from what
    /// was persisted for them (`restore`), changed terms apply at once, removed budgets go.
    pub fn set_budgets(&mut self, budgets: impl IntoIterator<Item = (String, Terms, Option<Persisted>)>, now_ms: u64) {
        let mut seen = BTreeSet::new();
        for (id, terms, persisted) in budgets {
            seen.insert(id.clone());
            self.upsert(id, terms, persisted, now_ms);
        }
        self.remove(|id| seen.contains(id), now_ms);
        self.relink(now_ms);
    }

    /// Like [`FleetLedger::set_budgets`], for the budgets of one namespace (ids `namespace/…`);
    /// those of other namespaces are left as they are. Returns the ids it no longer keeps.
    pub fn set_namespace(
        &mut self,
        namespace: &str,
        budgets: impl IntoIterator<Item = (String, Terms, Option<Persisted>)>,
        now_ms: u64,
    ) -> Vec<String> {
        let prefix = format!("{namespace}/");
        let mut seen = BTreeSet::new();
        for (id, terms, persisted) in budgets {
            seen.insert(id.clone());
            self.upsert(id, terms, persisted, now_ms);
        }
        let dropped = self.remove(|id| !id.starts_with(&prefix) || seen.contains(id), now_ms);
        self.relink(now_ms);
        dropped
    }

    /// Removes the books `keep` refuses, and returns their ids. What each spent this period
    /// stays with the nearest budget above it that is kept (in its own spend), so that deleting
    /// a key, or revoking one a template issued, never gives its team credit back.
    fn remove(&mut self, keep: impl Fn(&str) -> bool, now_ms: u64) -> Vec<String> {
        // Heirs first: a removed parent's chain is needed to find its child's.
        let gone: Vec<(String, Option<String>)> = self
            .books
            .keys()
            .filter(|id| !keep(id))
            .map(|id| (id.clone(), self.chain(id).into_iter().skip(1).find(|a| keep(a)).map(str::to_string)))
            .collect();
        let mut removed = Vec::with_capacity(gone.len());
        for (id, heir) in gone {
            let Some(book) = self.books.remove(&id) else { continue };
            if let Some(heir) = heir
                && let Some(heir_book) = self.books.get_mut(&heir)
            {
                let spend = heir_book.absorb(&book, now_ms);
                if spend.iter().any(|s| s.spent > 0) {
                    self.left.insert(id.clone(), Left { heir, spend });
                }
            }
            removed.push(id);
        }
        self.left.retain(|_, left| left.spend.iter().any(|s| s.start == period_start(s.period, now_ms / 1000)));
        removed
    }

    /// Indexes each budget's children, and has each book keep its spend in the periods of the
    /// budgets above it.
    fn relink(&mut self, now_ms: u64) {
        self.children.clear();
        for (id, book) in &self.books {
            if let Some(parent) = book.terms.parent.as_ref().filter(|p| self.books.contains_key(*p)) {
                self.children.entry(parent.clone()).or_default().push(id.clone());
            }
        }
        for children in self.children.values_mut() {
            children.sort();
        }
        let periods: Vec<(String, Vec<Period>)> = self
            .books
            .keys()
            .map(|id| {
                let above = self.chain(id).into_iter().skip(1).filter_map(|a| self.books.get(a));
                (id.clone(), above.map(|b| b.terms.period).collect())
            })
            .collect();
        for (id, periods) in periods {
            if let Some(book) = self.books.get_mut(&id) {
                book.track(&periods, now_ms);
            }
        }
    }

    /// The budget and those above it, nearest first: at most [`MAX_BUDGET_CHAIN`], as
    /// compiled configurations hold no longer chains (nor cycles).
    fn chain<'a>(&'a self, id: &'a str) -> Vec<&'a str> {
        let mut chain: Vec<&str> = Vec::with_capacity(MAX_BUDGET_CHAIN);
        let mut at = Some(id);
        while let Some(id) = at
            && chain.len() < MAX_BUDGET_CHAIN
            && !chain.contains(&id)
        {
            let Some((id, book)) = self.books.get_key_value(id) else { break };
            chain.push(id);
            at = book.terms.parent.as_deref();
        }
        chain
    }

    /// The budget's book and those of every budget below it.
    fn subtree<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Book> + 'a {
        let mut stack = vec![(id, 1)];
        std::iter::from_fn(move || {
            loop {
                let (id, depth) = stack.pop()?;
                if depth < MAX_BUDGET_CHAIN
                    && let Some(children) = self.children.get(id)
                {
                    stack.extend(children.iter().map(|c| (c.as_str(), depth + 1)));
                }
                if let Some(book) = self.books.get(id) {
                    return Some(book);
                }
            }
        })
    }

    /// Where a budget stands with everything below it.
    fn standing(&self, id: &str, now_ms: u64) -> Option<Tally> {
        let book = self.books.get(id)?;
        let period = book.terms.period;
        let mut standing = Tally {
            limit: book.terms.limit.map(|l| l.saturating_add(book.topped_up)),
            low_balance: book.terms.low_balance,
            period_start: period_start(period, now_ms / 1000),
            spent: 0,
            outstanding: 0,
            held_back: 0,
        };
        for b in self.subtree(id) {
            standing.spent = standing.spent.saturating_add(b.spent_for(period, now_ms));
            standing.outstanding = standing.outstanding.saturating_add(b.outstanding_credit(now_ms));
            standing.held_back = standing.held_back.saturating_add(b.held_back());
        }
        Some(standing)
    }

    /// Where each level of a budget's chain stands, the budget's own first.
    fn levels<'a>(&'a self, id: &'a str, now_ms: u64) -> Vec<(&'a str, Tally)> {
        self.chain(id).into_iter().filter_map(|level| Some((level, self.standing(level, now_ms)?))).collect()
    }

    /// Budgets whose figures count a change of `id`'s: those above it, to be written again.
    fn touch_above(&mut self, id: &str) {
        let above: Vec<String> = self.chain(id).into_iter().skip(1).map(str::to_string).collect();
        for id in above {
            if let Some(book) = self.books.get_mut(&id) {
                book.dirty = true;
            }
        }
    }

    /// Before a request of `amount` on `budget`: when its spend and the request would leave less
    /// than its top-up threshold of its limit, raises its limit for the period by whole top-up
    /// amounts, as many as bring it back to the threshold, as the period's maximum allows and as
    /// the budgets above have unleased credit for. Spend still counts above, so a team's total
    /// never grows.
    fn top_up(&mut self, budget: &str, amount: u64, now_ms: u64) {
        let Some(book) = self.books.get(budget) else { return };
        let (Some(policy), Some(limit)) = (book.terms.top_up, book.terms.limit) else { return };
        let levels = self.levels(budget, now_ms);
        let [(_, own), above @ ..] = levels.as_slice() else { return };
        if above.is_empty() || policy.amount == 0 {
            return;
        }
        // Its credit is what it has not spent: leases out are room to spend it, not spend.
        let committed = own.spent.saturating_add(amount);
        let floor = committed.saturating_add(policy.threshold);
        let effective = limit.saturating_add(book.topped_up);
        if effective >= floor {
            return;
        }
        let wanted = (floor - effective).div_ceil(policy.amount);
        let allowed = policy.max_per_period.saturating_sub(book.topped_up) / policy.amount;
        let afforded = unleased(above).map_or(u64::MAX, |left| left / policy.amount);
        let added = wanted.min(allowed).min(afforded).saturating_mul(policy.amount);
        if added == 0 {
            return;
        }
        let Some(book) = self.books.get_mut(budget) else { return };
        book.topped_up = book.topped_up.saturating_add(added);
        book.version += 1;
        book.dirty = true;
        let this_period = book.topped_up;
        self.top_ups.push(TopUp { budget: budget.to_string(), added, this_period });
    }

    /// The top-ups made since the last call, for their Events.
    pub fn take_top_ups(&mut self) -> Vec<TopUp> {
        std::mem::take(&mut self.top_ups)
    }

    /// A budget's figures, with those of the budgets above it.
    fn figures_of(&self, id: &str, now_ms: u64) -> Option<BudgetFigures> {
        let book = self.books.get(id)?;
        let levels = self.levels(id, now_ms);
        let (_, own) = levels.first()?;
        Some(BudgetFigures {
            spent: own.spent,
            remaining: own.remaining(),
            outstanding: own.outstanding,
            topped_up: book.topped_up,
            period_start: own.period_start,
            state: own.state(),
            term: self.term,
            version: book.version,
            durable: book.durable.version,
            parents: levels[1..]
                .iter()
                .map(|(id, s)| ParentFigures {
                    budget: (*id).to_string(),
                    spent: s.spent,
                    remaining: s.remaining(),
                    period_start: s.period_start,
                    state: s.state(),
                })
                .collect(),
        })
    }

    /// Marks a budget to be persisted again (its last write failed).
    pub fn mark_dirty(&mut self, budget: &str) {
        if let Some(book) = self.books.get_mut(budget) {
            book.dirty = true;
            book.writing = None;
        }
    }

    fn upsert(&mut self, id: String, terms: Terms, persisted: Option<Persisted>, now_ms: u64) {
        match self.books.get_mut(&id) {
            Some(book) => book.terms = terms,
            None => {
                let persisted = persisted.unwrap_or_default();
                // Every sidecar the last leader named may hold what it granted for as long as a
                // reservation lasts, unless it says otherwise.
                let until = now_ms.saturating_add(RESERVATION_LIFETIME_MS + REPORT_GRACE_MS);
                let recovery = (persisted.pledged > 0 || !persisted.holders.is_empty()).then(|| Recovery {
                    pledged: persisted.pledged,
                    awaiting: persisted.holders.iter().map(|h| (h.clone(), until)).collect(),
                });
                let inherited = persisted.writes.iter().map(|&(term, version)| (term, (version, until))).collect();
                let mut book = Book {
                    terms,
                    period_start: persisted.period_start,
                    spent: persisted.spent,
                    spent_in: persisted.spent_in.clone(),
                    topped_up: persisted.topped_up,
                    leases: BTreeMap::new(),
                    closed: HashMap::new(),
                    window_used: (0, Allowance::default()),
                    // Written once soon, so that its status says which ledger keeps it now.
                    dirty: true,
                    version: 0,
                    durable: Durable {
                        version: 0,
                        spent: persisted.spent,
                        spent_in: persisted.spent_in.clone(),
                        pledged: persisted.pledged,
                        holders: persisted.holders.iter().cloned().collect(),
                    },
                    writing: None,
                    peak: 0,
                    holders: persisted.holders.iter().map(|h| (h.clone(), now_ms)).collect(),
                    recovery,
                    inherited,
                };
                for lease in persisted.leases {
                    let id = lease.id.clone();
                    let done = lease.done;
                    book.leases.insert(id.clone(), lease);
                    if done {
                        book.close(&id, now_ms);
                    }
                }
                book.roll(now_ms);
                // Back with its stored spend: what its heir kept of it is counted here again.
                if let Some(left) = self.left.remove(&id)
                    && let Some(heir) = self.books.get_mut(&left.heir)
                {
                    heir.give_back(&left.spend, &book, now_ms);
                }
                self.books.insert(id, book);
            }
        }
    }

    /// Grants a lease on `budget`, or more on the caller's lease, after applying what it used.
    /// Outside state Active nothing more is granted: a Low budget is spent per request, an
    /// Exhausted one not at all, and the answer's `mode` says which.
    pub fn lease(
        &mut self,
        budget: &str,
        holder: &str,
        request: &LeaseRequest,
        now_ms: u64,
    ) -> Result<LeaseGrant, Refused> {
        self.lease_persisting(budget, holder, request, now_ms).map(|(grant, _)| grant)
    }

    /// [`FleetLedger::lease`], and whether its answer must wait until the book is persisted: only
    /// a grant past the written pledge, or the first to a holder the written status does not
    /// name (see the module's documentation). Anything else, a grant within the pledge, an answer
    /// that grants nothing more (as to a sidecar whose rate window is used up) or use reported,
    /// is answered at once.
    pub fn lease_persisting(
        &mut self,
        budget: &str,
        holder: &str,
        request: &LeaseRequest,
        now_ms: u64,
    ) -> Result<(LeaseGrant, Persist), Refused> {
        let held = request.lease_id.as_ref().filter(|id| {
            self.books.get(budget).and_then(|b| b.leases.get(*id)).is_some_and(|l| l.holder == holder && !l.done)
        });
        let id = match held {
            Some(id) => id.clone(),
            None => self.fresh_id(),
        };
        let book = self.books.get_mut(budget).ok_or(Refused::UnknownBudget)?;
        book.roll(now_ms);
        book.recover(now_ms);
        if let Some(lease) = book.leases.get_mut(&id) {
            let added = apply_use(lease, &request.used);
            book.add_spend(added);
        }
        book.changed(holder, now_ms);
        self.touch_above(budget);
        self.top_up(budget, request.need.credit, now_ms);
        let levels = self.levels(budget, now_ms);
        let mode = match worst(&levels) {
            BudgetState::Exhausted => Mode::Exhausted,
            BudgetState::Low => Mode::PerRequest,
            BudgetState::Active => Mode::Lease,
        };
        let (bound, capped, lifetime) = (unleased(&levels), capped(&levels), lifetime(&levels));
        let window = minute(now_ms);
        let book = self.books.get_mut(budget).ok_or(Refused::UnknownBudget)?;
        let (lease_id, granted, window, expires_at, persist) = 'grant: {
            if mode != Mode::Lease {
                let lease = book.leases.get(&id);
                break 'grant (
                    lease.map_or_else(String::new, |l| l.id.clone()),
                    lease.map_or_else(Allowance::default, |l| l.granted),
                    window,
                    lease.map_or(now_ms, |l| l.expires_at),
                    Persist::Eventually,
                );
            }
            let holders = book.holders(holder, now_ms);
            let rate =
                book.terms.rate.unwrap_or(RateLimitPolicy { requests_per_minute: None, tokens_per_minute: None });
            // The room the caller's lease has now; its requests and tokens only in the current window.
            let room = book.leases.get(&id).map_or_else(Allowance::default, |l| Allowance {
                credit: l.granted.credit.saturating_sub(l.used.credit),
                requests: if l.window == window { l.granted.requests.saturating_sub(l.used.requests) } else { 0 },
                tokens: if l.window == window { l.granted.tokens.saturating_sub(l.used.tokens) } else { 0 },
            });
            let (want, need) = (&request.want, &request.need);
            let add = Allowance {
                credit: more_for(want.credit, need.credit, room.credit, bound, holders),
                requests: more_for(
                    want.requests,
                    need.requests,
                    room.requests,
                    rate.requests_per_minute
                        .map(|limit| book.unleased(u64::from(limit), window, now_ms, |a| a.requests)),
                    holders,
                ),
                tokens: more_for(
                    want.tokens,
                    need.tokens,
                    room.tokens,
                    rate.tokens_per_minute.map(|limit| book.unleased(limit, window, now_ms, |a| a.tokens)),
                    holders,
                ),
            };
            let expires_at = now_ms.saturating_add(lifetime);
            if !book.leases.contains_key(&id) && add.is_zero() {
                // Nothing wanted, or nothing to give: the fleet's figures, without a lease.
                break 'grant (String::new(), Allowance::default(), window, now_ms, Persist::Eventually);
            }
            let lease = book.leases.entry(id.clone()).or_insert_with(|| Lease {
                id: id.clone(),
                holder: holder.to_string(),
                granted: Allowance::default(),
                used: Allowance::default(),
                window,
                expires_at,
                done: false,
            });
            if lease.window != window {
                // A new minute: the old window's request and token grants are void on both sides.
                lease.window = window;
                lease.used.requests = 0;
                lease.used.tokens = 0;
                lease.granted.requests = 0;
                lease.granted.tokens = 0;
            }
            lease.granted.credit = lease.granted.credit.saturating_add(add.credit);
            lease.granted.requests = lease.granted.requests.saturating_add(add.requests);
            lease.granted.tokens = lease.granted.tokens.saturating_add(add.tokens);
            lease.expires_at = expires_at;
            let granted = lease.granted;
            (id, granted, window, expires_at, book.persist_for(holder, capped, now_ms))
        };
        let budget = self.figures_of(budget, now_ms).ok_or(Refused::UnknownBudget)?;
        Ok((LeaseGrant { lease_id, mode, granted, window, expires_at, budget }, persist))
    }

    /// Applies a report of what a lease used; `done` closes it.
    pub fn report(
        &mut self,
        budget: &str,
        holder: &str,
        report: &Report,
        now_ms: u64,
    ) -> Result<BudgetFigures, Refused> {
        let book = self.books.get_mut(budget).ok_or(Refused::UnknownBudget)?;
        book.roll(now_ms);
        book.recover(now_ms);
        let added = match book.leases.get_mut(&report.lease_id).filter(|l| l.holder == holder) {
            Some(lease) => {
                let added = apply_use(lease, &report.used);
                if report.done {
                    book.close(&report.lease_id, now_ms);
                }
                added
            }
            None => match book.closed_use(&report.lease_id, holder, &report.used) {
                Some(added) => added,
                // A holder the last leader named, not heard from yet: what it reports may be what
                // that leader took in and never wrote, which only its holdings tell.
                None if book.recovery.as_ref().is_some_and(|r| r.awaiting.contains_key(holder)) => {
                    return Err(Refused::TakingOver);
                }
                None => return Err(Refused::UnknownLease),
            },
        };
        book.add_spend(added);
        book.changed(holder, now_ms);
        self.touch_above(budget);
        self.figures_of(budget, now_ms).ok_or(Refused::UnknownBudget)
    }

    /// In per-request mode: holds `amount` of credit and one request for one answer, if the
    /// unleased remainder and the minute's allowance have them.
    pub fn reserve(&mut self, budget: &str, holder: &str, amount: u64, now_ms: u64) -> Result<Reserved, Refused> {
        self.reserve_persisting(budget, holder, amount, now_ms).map(|(reserved, _)| reserved)
    }

    /// [`FleetLedger::reserve`], and whether its answer must wait for a write (as for a lease).
    pub fn reserve_persisting(
        &mut self,
        budget: &str,
        holder: &str,
        amount: u64,
        now_ms: u64,
    ) -> Result<(Reserved, Persist), Refused> {
        let id = self.fresh_id();
        let book = self.books.get_mut(budget).ok_or(Refused::UnknownBudget)?;
        book.roll(now_ms);
        book.recover(now_ms);
        let window = minute(now_ms);
        if let Some(rate) = book.terms.rate {
            let reset = 60 - (now_ms / 1000) % 60;
            if let Some(limit) = rate.requests_per_minute.map(u64::from)
                && book.unleased(limit, window, now_ms, |a| a.requests) == 0
            {
                return Err(Refused::RateLimited { limit, reset });
            }
            if let Some(limit) = rate.tokens_per_minute
                && book.unleased(limit, window, now_ms, |a| a.tokens) == 0
            {
                return Err(Refused::RateLimited { limit, reset });
            }
        }
        self.top_up(budget, amount, now_ms);
        let levels = self.levels(budget, now_ms);
        // The first level that cannot hold it, nearest first.
        let short = levels.iter().enumerate().find_map(|(i, (id, level))| {
            let remaining = level.unleased()?;
            (level.state() == BudgetState::Exhausted || amount > remaining).then_some((i, *id, *level, remaining))
        });
        if let Some((i, id, level, remaining)) = short {
            let budget = (i > 0).then(|| id.to_string());
            return Err(
                if level.state() != BudgetState::Exhausted && amount <= remaining.saturating_add(level.held_back) {
                    Refused::TakingOver
                } else {
                    Refused::InsufficientCredits { remaining, budget }
                },
            );
        }
        let capped = capped(&levels);
        let book = self.books.get_mut(budget).ok_or(Refused::UnknownBudget)?;
        let expires_at = now_ms.saturating_add(RESERVATION_LIFETIME_MS);
        let granted = Allowance { credit: amount, requests: 1, tokens: 0 };
        let lease = Lease {
            id: id.clone(),
            holder: holder.to_string(),
            granted,
            used: Allowance { requests: 1, ..Allowance::default() },
            window,
            expires_at,
            done: false,
        };
        book.leases.insert(id.clone(), lease);
        book.changed(holder, now_ms);
        let persist = book.persist_for(holder, capped, now_ms);
        self.touch_above(budget);
        let figures = self.figures_of(budget, now_ms).ok_or(Refused::UnknownBudget)?;
        Ok((Reserved { reservation_id: id, expires_at, budget: figures }, persist))
    }

    /// Settles a per-request reservation at its answer's cost.
    pub fn settle(
        &mut self,
        budget: &str,
        holder: &str,
        id: &str,
        cost: u64,
        tokens: u64,
        now_ms: u64,
    ) -> Result<BudgetFigures, Refused> {
        let used = Allowance { credit: cost, requests: 1, tokens };
        self.report(
            budget,
            holder,
            &Report { budget: String::new(), lease_id: id.to_string(), used, done: true },
            now_ms,
        )
    }

    /// Books spend made without a grant, under the sidecar's own id (cumulative, so a repeated
    /// report counts once). It is recorded as a closed lease that was granted nothing.
    pub fn debt(&mut self, budget: &str, holder: &str, debt: &Debt, now_ms: u64) -> Result<BudgetFigures, Refused> {
        let book = self.books.get_mut(budget).ok_or(Refused::UnknownBudget)?;
        book.roll(now_ms);
        book.recover(now_ms);
        if book.leases.contains_key(&debt.debt_id) {
            // An id of a lease the ledger granted is no debt id.
            return Err(Refused::UnknownLease);
        }
        let closed = book.closed.entry(debt.debt_id.clone()).or_insert_with(|| Closed {
            holder: holder.to_string(),
            used: Allowance::default(),
            closed_at: now_ms,
        });
        if closed.holder != holder {
            return Err(Refused::UnknownLease);
        }
        let added = book.closed_use(&debt.debt_id, holder, &debt.used).unwrap_or(0);
        book.add_spend(added);
        book.changed(holder, now_ms);
        self.touch_above(budget);
        self.figures_of(budget, now_ms).ok_or(Refused::UnknownBudget)
    }

    /// Takes in what a sidecar holds after a takeover: each lease, reservation and debt it names
    /// is added to the book (or brought up to what it says), except what the last leader's write
    /// already holds; then the sidecar is no longer awaited.
    pub fn holdings(
        &mut self,
        budget: &str,
        holder: &str,
        holdings: &Holdings,
        now_ms: u64,
    ) -> Result<HoldingsTaken, Refused> {
        let book = self.books.get_mut(budget).ok_or(Refused::UnknownBudget)?;
        book.roll(now_ms);
        let mut written = Vec::new();
        for held in &holdings.held {
            if book.take_in(holder, held, now_ms) {
                written.push(held.id.clone());
            }
        }
        if let Some(recovery) = &mut book.recovery {
            recovery.awaiting.remove(holder);
        }
        book.recover(now_ms);
        book.changed(holder, now_ms);
        self.touch_above(budget);
        Ok(HoldingsTaken { budget: self.figures_of(budget, now_ms).ok_or(Refused::UnknownBudget)?, written })
    }

    /// Forgets leases that can no longer be reported on.
    pub fn sweep(&mut self, now_ms: u64) {
        for book in self.books.values_mut() {
            let before = book.leases.len();
            // After a takeover, a lease of a holder not heard from yet stays: what it tells is
            // measured against what was written of it.
            let awaited = book.recovery.as_ref().map(|r| &r.awaiting);
            book.leases.retain(|_, l| {
                let window_over = l.window < minute(now_ms);
                let closed = l.done || now_ms >= l.expires_at.saturating_add(REPORT_GRACE_MS);
                !(closed && window_over) || awaited.is_some_and(|a| a.contains_key(&l.holder))
            });
            book.dirty |= book.leases.len() != before;
            book.closed.retain(|_, c| now_ms < c.closed_at.saturating_add(REPORT_GRACE_MS));
            // A sidecar with nothing open that has not called for two lease lifetimes holds
            // nothing: a new leader need not wait for it.
            let holding: BTreeSet<&str> = book.leases.values().map(|l| l.holder.as_str()).collect();
            let holders = book.holders.len();
            book.holders
                .retain(|h, last| holding.contains(h.as_str()) || now_ms < last.saturating_add(2 * LEASE_LIFETIME_MS));
            book.dirty |= book.holders.len() != holders;
        }
    }

    pub fn figures(&self, budget: &str, now_ms: u64) -> Option<BudgetFigures> {
        self.figures_of(budget, now_ms)
    }

    /// The budgets changed since they were last taken, with what to persist of each: the pledge
    /// covers what is out now, and room for it to double before the next write, so that grants
    /// seldom wait for one.
    pub fn take_dirty(&mut self, now_ms: u64) -> Vec<Taken> {
        // Keys issued by one template are written together, in its status: all of them when
        // any changed.
        let groups: BTreeSet<&str> =
            self.books.iter().filter(|(_, b)| b.dirty).map(|(id, _)| written_with(id)).collect();
        let mut ids: Vec<String> = self.books.keys().filter(|id| groups.contains(written_with(id))).cloned().collect();
        ids.sort_by(|a, b| (written_with(a), a).cmp(&(written_with(b), b)));
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(book) = self.books.get_mut(&id) {
                book.roll(now_ms);
                book.dirty = false;
                book.recover(now_ms);
            }
            let levels = self.levels(&id, now_ms);
            // What the tightest level has left.
            let remaining = levels.iter().filter_map(|(_, l)| l.remaining()).min();
            let Some(figures) = self.figures_of(&id, now_ms) else { continue };
            let term = self.term;
            let Some(book) = self.books.get_mut(&id) else { continue };
            let recovering = book.recovery.as_ref();
            let awaited = recovering.map_or(0, |r| r.pledged);
            // Out after this write: what is granted and not reported, and what the last leader
            // may still have out.
            let out_now = book.outstanding_credit(now_ms).saturating_add(awaited);
            // The most that was out since the last write, reports not yet written included (they
            // grow it without a grant): the next interval's is likely the same, so twice it.
            let peak = book.peak.max(book.exposure(&book.durable, now_ms)).max(out_now);
            // At least half of what remains, all of it once Low: a lease takes at most half of the
            // remainder and per-request mode reserves from all of it, so grants never wait for a
            // write; the rest stays grantable at once by a next leader.
            let pledged = match remaining {
                None => 0,
                Some(remaining) => {
                    let floor = (remaining / 2).max(book.terms.low_balance.unwrap_or(0));
                    let room = remaining.saturating_add(awaited);
                    out_now.max(room.min(peak.saturating_mul(2).max(floor.saturating_add(awaited))))
                }
            };
            book.peak = out_now;
            let mut holders: BTreeSet<String> = book.holders.keys().cloned().collect();
            holders.extend(recovering.into_iter().flat_map(|r| r.awaiting.keys().cloned()));
            book.inherited.retain(|_, (_, until)| now_ms < *until);
            let mut writes: BTreeMap<u64, u64> = book.inherited.iter().map(|(&t, &(v, _))| (t, v)).collect();
            writes.insert(term, book.version);
            let persisted = Persisted {
                spent: book.spent,
                period_start: book.period_start,
                spent_in: book.spent_in.clone(),
                topped_up: book.topped_up,
                leases: book.leases.values().cloned().collect(),
                pledged,
                holders: holders.into_iter().collect(),
                writes: writes.into_iter().collect(),
            };
            book.writing = Some(Durable::of(&persisted, term));
            out.push((id, persisted, figures));
        }
        out
    }

    /// Records that `persisted`, taken from `budget`'s book, is written: grants within its
    /// pledge, and to its holders, are answered at once from now on.
    pub fn confirm(&mut self, budget: &str, persisted: &Persisted) {
        if let Some(book) = self.books.get_mut(budget) {
            book.durable = Durable::of(persisted, self.term);
            book.writing = None;
        }
    }

    /// A lease id no book holds, even one an earlier leader issued.
    fn fresh_id(&mut self) -> String {
        loop {
            self.next_id += 1;
            let id = format!("{}-{}", self.id_prefix, self.next_id);
            if !self.books.values().any(|b| b.leases.contains_key(&id) || b.closed.contains_key(&id)) {
                return id;
            }
        }
    }
}

/// Applies a cumulative report to a lease; returns the credit newly reported.
fn apply_use(lease: &mut Lease, used: &Allowance) -> u64 {
    let added = used.credit.saturating_sub(lease.used.credit);
    lease.used.raise_to(used);
    added
}

/// What a lease with `room` is given to reach the `want`ed room, of `unleased` (`None`: no
/// limit): what requests waiting now `need` first and in full, then a [`share`] of the rest.
fn more_for(want: u64, need: u64, room: u64, unleased: Option<u64>, holders: u64) -> u64 {
    let missing = want.max(need).saturating_sub(room);
    let Some(left) = unleased else { return missing };
    let urgent = need.saturating_sub(room).min(left);
    urgent.saturating_add(share(missing.saturating_sub(urgent), left - urgent, holders))
}

/// A share of what is left for one of `holders` sidecars: half of it divided among them (so
/// that one more sidecar still finds some), at least one unit while anything is left, never
/// more than wanted.
fn share(want: u64, left: u64, holders: u64) -> u64 {
    let fair = left / holders.saturating_mul(2).max(1);
    want.min(fair.max(left.min(1)))
}

fn minute(now_ms: u64) -> u64 {
    now_ms / 60_000
}

/// The `namespace/name` of the status a budget's book is written in ([`status_owner`]): a key
/// issued by a template in the template's, with its siblings; any other budget in its own.
pub fn written_with(id: &str) -> &str {
    let name = id.split_once('/').map_or(id, |(_, name)| name);
    // The owner's name is a prefix of the budget's.
    &id[..id.len() - name.len() + status_owner(name).len()]
}

/// Where one level of a budget's chain stands: its own book and every book below it.
#[derive(Clone, Copy, Debug)]
struct Tally {
    /// With this period's top-ups.
    limit: Option<u64>,
    low_balance: Option<u64>,
    /// Unix seconds.
    period_start: u64,
    spent: u64,
    outstanding: u64,
    /// What the last leader may still have out, until its holders say.
    held_back: u64,
}

impl Tally {
    fn remaining(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.spent))
    }

    /// Credit that is neither spent nor granted: what a new grant may come from.
    fn unleased(&self) -> Option<u64> {
        self.remaining().map(|r| r.saturating_sub(self.outstanding).saturating_sub(self.held_back))
    }

    fn state(&self) -> BudgetState {
        match self.remaining() {
            Some(0) => BudgetState::Exhausted,
            Some(left) if self.low_balance.is_some_and(|low| left < low) => BudgetState::Low,
            _ => BudgetState::Active,
        }
    }
}

/// What every level of a chain can still grant; `None`: no level has a limit.
fn unleased(levels: &[(&str, Tally)]) -> Option<u64> {
    levels.iter().filter_map(|(_, l)| l.unleased()).min()
}

/// Whether any level of a chain has a limit.
fn capped(levels: &[(&str, Tally)]) -> bool {
    levels.iter().any(|(_, l)| l.limit.is_some())
}

/// The state of the chain's worst level: a key spends per request when any level is Low.
fn worst(levels: &[(&str, Tally)]) -> BudgetState {
    let rank = |s: BudgetState| match s {
        BudgetState::Active => 0,
        BudgetState::Low => 1,
        BudgetState::Exhausted => 2,
    };
    levels.iter().map(|(_, l)| l.state()).max_by_key(|&s| rank(s)).unwrap_or(BudgetState::Active)
}

/// Leases shorten as the balance of the tightest level falls, so that credit held by idle
/// sidecars comes back soon.
fn lifetime(levels: &[(&str, Tally)]) -> u64 {
    levels
        .iter()
        .filter_map(|(_, l)| match (l.limit, l.remaining()) {
            (Some(limit), Some(left)) if limit > 0 => {
                let scaled = u128::from(LEASE_LIFETIME_MS) * u128::from(left) / u128::from(limit);
                Some(u64::try_from(scaled).unwrap_or(LEASE_LIFETIME_MS))
            }
            _ => None,
        })
        .min()
        .unwrap_or(LEASE_LIFETIME_MS)
        .clamp(MIN_LEASE_LIFETIME_MS, LEASE_LIFETIME_MS)
}

impl Book {
    /// Starts a new period at its UTC boundary; outstanding leases go on counting.
    fn roll(&mut self, now_ms: u64) {
        let start = period_start(self.terms.period, now_ms / 1000);
        if start != self.period_start {
            self.period_start = start;
            self.spent = 0;
            self.topped_up = 0;
            self.dirty = true;
        }
        for spend in &mut self.spent_in {
            let start = period_start(spend.period, now_ms / 1000);
            if start != spend.start {
                *spend = PeriodSpend { period: spend.period, start, spent: 0 };
                self.dirty = true;
            }
        }
    }

    /// Keeps its spend in exactly these periods of the budgets above it, besides its own.
    fn track(&mut self, periods: &[Period], now_ms: u64) {
        let own = self.terms.period;
        let before = self.spent_in.len();
        self.spent_in.retain(|s| s.period != own && periods.contains(&s.period));
        for &period in periods {
            if period != own && !self.spent_in.iter().any(|s| s.period == period) {
                let start = period_start(period, now_ms / 1000);
                self.spent_in.push(PeriodSpend { period, start, spent: 0 });
            }
        }
        self.dirty |= self.spent_in.len() != before;
    }

    fn add_spend(&mut self, added: u64) {
        self.spent = self.spent.saturating_add(added);
        for spend in &mut self.spent_in {
            spend.spent = spend.spent.saturating_add(added);
        }
    }

    /// Takes `gone`'s spend as its own, in its period and in each it keeps for the budgets
    /// above it: what it took, in each.
    fn absorb(&mut self, gone: &Book, now_ms: u64) -> Vec<PeriodSpend> {
        self.roll(now_ms);
        let own = gone.spent_for(self.terms.period, now_ms);
        self.spent = self.spent.saturating_add(own);
        let mut taken = Vec::with_capacity(self.spent_in.len() + 1);
        taken.push(PeriodSpend { period: self.terms.period, start: self.period_start, spent: own });
        for spend in &mut self.spent_in {
            let added = gone.spent_for(spend.period, now_ms);
            spend.spent = spend.spent.saturating_add(added);
            taken.push(PeriodSpend { spent: added, ..*spend });
        }
        self.dirty = true;
        taken
    }

    /// Gives back what it took of `back`'s spend ([`Book::absorb`]), as far as `back` holds it
    /// again (a budget that returns with no stored spend leaves it here).
    fn give_back(&mut self, taken: &[PeriodSpend], back: &Book, now_ms: u64) {
        self.roll(now_ms);
        for took in taken {
            let given = took.spent.min(back.spent_for(took.period, now_ms));
            if took.period == self.terms.period && took.start == self.period_start {
                self.spent = self.spent.saturating_sub(given);
            } else if let Some(spend) =
                self.spent_in.iter_mut().find(|s| s.period == took.period && s.start == took.start)
            {
                spend.spent = spend.spent.saturating_sub(given);
            }
        }
        self.dirty = true;
    }

    /// Its own spend in the current `period` (its own, or that of a budget above it).
    fn spent_for(&self, period: Period, now_ms: u64) -> u64 {
        let start = period_start(period, now_ms / 1000);
        if period == self.terms.period {
            return if self.period_start == start { self.spent } else { 0 };
        }
        self.spent_in.iter().find(|s| s.period == period && s.start == start).map_or(0, |s| s.spent)
    }

    /// What the last leader may still have out of it, until its holders say.
    fn held_back(&self) -> u64 {
        self.recovery.as_ref().map_or(0, |r| r.pledged)
    }

    fn outstanding_credit(&self, now_ms: u64) -> u64 {
        self.leases.values().map(|l| l.unreported_credit(now_ms)).fold(0, u64::saturating_add)
    }

    /// Credit out beyond the written spend (granted and not reported, or reported and not
    /// written, in any period it keeps), and what a last leader may still have out: what a
    /// write must pledge.
    fn exposure(&self, written: &Durable, now_ms: u64) -> u64 {
        let unwritten = self.spent_in.iter().fold(self.spent.saturating_sub(written.spent), |most, s| {
            let was =
                written.spent_in.iter().find(|w| w.period == s.period && w.start == s.start).map_or(0, |w| w.spent);
            most.max(s.spent.saturating_sub(was))
        });
        unwritten.saturating_add(self.outstanding_credit(now_ms)).saturating_add(self.held_back())
    }

    /// A change by `holder`: counted, and to be written.
    fn changed(&mut self, holder: &str, now_ms: u64) {
        self.version += 1;
        self.dirty = true;
        self.holders.insert(holder.to_string(), now_ms);
    }

    /// Whether an answer that gave `holder` credit must wait for a write (`capped`: a level of
    /// its chain has a limit): it takes the exposure
    /// past the written pledge, or the written status does not name the holder (a new leader
    /// would not know to ask it what it holds).
    fn persist_for(&mut self, holder: &str, capped: bool, now_ms: u64) -> Persist {
        if !capped {
            return Persist::Eventually;
        }
        let exposure = self.exposure(&self.durable, now_ms);
        self.peak = self.peak.max(exposure);
        // A write under way may be the last one: what is answered must be within its pledge too.
        let past_pending = self.writing.as_ref().is_some_and(|w| self.exposure(w, now_ms) > w.pledged);
        if !self.durable.holders.contains(holder) {
            Persist::NewHolder
        } else if exposure > self.durable.pledged || past_pending {
            Persist::BeforeAnswer
        } else {
            Persist::Eventually
        }
    }

    /// Ends the recovery once every holder the last leader named has said what it holds, or
    /// can no longer hold anything it granted.
    fn recover(&mut self, now_ms: u64) {
        if let Some(recovery) = &mut self.recovery {
            recovery.awaiting.retain(|_, until| now_ms < *until);
            if recovery.awaiting.is_empty() {
                self.recovery = None;
                self.dirty = true;
            }
        }
    }

    /// Of a per-minute `limit`, what no lease holds in `window`.
    fn unleased(&self, limit: u64, window: u64, now_ms: u64, pick: fn(&Allowance) -> u64) -> u64 {
        let closed = if self.window_used.0 == window { pick(&self.window_used.1) } else { 0 };
        let committed =
            self.leases.values().map(|l| l.committed(window, now_ms, pick)).fold(closed, u64::saturating_add);
        limit.saturating_sub(committed)
    }

    /// Moves a lease reported done to `closed`, its requests and tokens of the current minute
    /// into `window_used`.
    fn close(&mut self, id: &str, now_ms: u64) {
        let Some(lease) = self.leases.remove(id) else { return };
        let window = minute(now_ms);
        if lease.window == window {
            if self.window_used.0 != window {
                self.window_used = (window, Allowance::default());
            }
            let used = &mut self.window_used.1;
            used.requests = used.requests.saturating_add(lease.used.requests);
            used.tokens = used.tokens.saturating_add(lease.used.tokens);
        }
        self.closed.insert(id.to_string(), Closed { holder: lease.holder, used: lease.used, closed_at: now_ms });
    }

    /// One thing a sidecar holds, told to a new leader ([`FleetLedger::holdings`]); `true` when
    /// the last write holds it already, so that the sidecar has nothing more to keep of it.
    fn take_in(&mut self, holder: &str, held: &Holding, now_ms: u64) -> bool {
        // Reported to the last leader up to a change its write holds: in the written spend.
        let written =
            held.acked.as_ref().is_some_and(|a| self.inherited.get(&a.term).is_some_and(|(v, _)| a.version <= *v));
        if let Some(lease) = self.leases.get_mut(&held.id) {
            if lease.holder != holder {
                return false;
            }
            // Granted more than the written status says: the last leader's grants since.
            lease.granted.credit = lease.granted.credit.max(held.granted.credit);
            lease.expires_at = lease.expires_at.max(held.expires_at);
            let added = apply_use(lease, &held.used);
            self.add_spend(added);
            if held.done {
                self.close(&held.id, now_ms);
            }
            return false;
        }
        if let Some(added) = self.closed_use(&held.id, holder, &held.used) {
            self.add_spend(added);
            return false;
        }
        if written {
            return true;
        }
        // Granted or spent since the last leader's write: taken in as it is.
        let lease = Lease {
            id: held.id.clone(),
            holder: holder.to_string(),
            granted: if held.kind == HoldingKind::Debt { Allowance::default() } else { held.granted },
            used: Allowance::default(),
            window: held.window,
            expires_at: held.expires_at,
            done: false,
        };
        self.leases.insert(held.id.clone(), lease);
        if let Some(lease) = self.leases.get_mut(&held.id) {
            let added = apply_use(lease, &held.used);
            self.add_spend(added);
        }
        if held.done || held.kind == HoldingKind::Debt {
            self.close(&held.id, now_ms);
        }
        false
    }

    /// Applies a (repeated or late) report to a closed lease or debt of `holder`: the credit
    /// newly reported, `None` if there is no such one.
    fn closed_use(&mut self, id: &str, holder: &str, used: &Allowance) -> Option<u64> {
        let closed = self.closed.get_mut(id).filter(|c| c.holder == holder)?;
        let added = used.credit.saturating_sub(closed.used.credit);
        closed.used.raise_to(used);
        Some(added)
    }

    /// Sidecars holding live leases, counting `holder` whether or not it holds one yet.
    fn holders(&self, holder: &str, now_ms: u64) -> u64 {
        let mut holders: BTreeSet<&str> =
            self.leases.values().filter(|l| l.live(now_ms)).map(|l| l.holder.as_str()).collect();
        holders.insert(holder);
        holders.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: &str = "ns/key";
    // 2026-11-30 12:00:00 UTC, in milliseconds.
    const T: u64 = 1_796_040_000_000;

    fn terms(limit: Option<u64>, low: Option<u64>, rate: Option<RateLimitPolicy>) -> Terms {
        Terms { limit, period: Period::Monthly, low_balance: low, rate, parent: None, top_up: None }
    }

    fn ledger(terms: Terms) -> FleetLedger {
        let mut ledger = FleetLedger::new("test");
        ledger.set_budgets([(BUDGET.to_string(), terms, None)], T);
        ledger
    }

    fn want(credit: u64) -> LeaseRequest {
        LeaseRequest {
            budget: "key".into(),
            lease_id: None,
            used: Allowance::default(),
            want: Allowance { credit, requests: 0, tokens: 0 },
            need: Allowance::default(),
        }
    }

    /// A report of `credit` used on `grant`'s lease.
    fn used(grant: &LeaseGrant, credit: u64, done: bool) -> Report {
        Report {
            budget: "key".into(),
            lease_id: grant.lease_id.clone(),
            used: Allowance { credit, ..Allowance::default() },
            done,
        }
    }

    fn renew(grant: &LeaseGrant, used: u64, more: u64) -> LeaseRequest {
        LeaseRequest {
            lease_id: Some(grant.lease_id.clone()),
            used: Allowance { credit: used, ..Allowance::default() },
            ..want(more)
        }
    }

    #[test]
    fn grants_are_shares_of_the_unleased_remainder() {
        let mut l = ledger(terms(Some(1000), None, None));
        let a = l.lease(BUDGET, "a", &want(1000), T).unwrap();
        assert_eq!((a.mode, a.granted.credit), (Mode::Lease, 500), "alone: half of what is left");
        let b = l.lease(BUDGET, "b", &want(1000), T).unwrap();
        assert_eq!(b.granted.credit, 125, "500 left, two holders: a quarter of it");
        assert_eq!(b.budget.outstanding, 625);
        let a = l.lease(BUDGET, "a", &renew(&a, 500, 1000), T).unwrap();
        assert_eq!(a.budget.spent, 500);
        assert_eq!(a.granted.credit, 500 + 93, "375 unleased, two holders");
        assert_eq!(a.budget.outstanding, 125 + 93);
    }

    #[test]
    fn a_lease_is_topped_up_to_the_room_wanted_and_requests_waiting_now_come_first() {
        let mut l = ledger(terms(Some(1000), None, None));
        let g = l.lease(BUDGET, "a", &want(100), T).unwrap();
        assert_eq!(g.granted.credit, 100);
        for _ in 0..5 {
            let again = l.lease(BUDGET, "a", &renew(&g, 0, 100), T).unwrap();
            assert_eq!(again.granted.credit, 100, "an idle lease renewed gains nothing");
        }
        let g = l.lease(BUDGET, "a", &renew(&g, 30, 100), T).unwrap();
        assert_eq!((g.granted.credit, g.budget.outstanding), (130, 100), "30 used: back to 100 of room");

        let rate = RateLimitPolicy { requests_per_minute: Some(100), tokens_per_minute: None };
        let mut l = ledger(terms(None, None, Some(rate)));
        let ask = |need| LeaseRequest {
            want: Allowance { credit: 0, requests: 8, tokens: 0 },
            need: Allowance { credit: 0, requests: need, tokens: 0 },
            ..want(0)
        };
        assert_eq!(l.lease(BUDGET, "a", &ask(60), T).unwrap().granted.requests, 60, "in full, not halved");
        assert_eq!(l.lease(BUDGET, "b", &ask(60), T).unwrap().granted.requests, 40, "what is left");
        assert_eq!(l.lease(BUDGET, "c", &ask(1), T).unwrap().granted.requests, 0);
    }

    #[test]
    fn nothing_is_granted_beyond_the_limit_however_many_ask() {
        let mut l = ledger(terms(Some(100), None, None));
        let mut granted = 0;
        for i in 0..500 {
            let g = l.lease(BUDGET, &format!("pod-{}", i % 7), &want(1_000_000), T).unwrap();
            granted += g.granted.credit;
            // Each holder keeps asking on a new lease; nothing is reported.
        }
        assert_eq!(granted, 100, "exactly the limit, in ever smaller shares");
        assert_eq!(l.figures(BUDGET, T).unwrap().outstanding, 100);
    }

    #[test]
    fn reports_are_cumulative_so_repeats_and_late_ones_count_once() {
        let mut l = ledger(terms(Some(1000), None, None));
        let g = l.lease(BUDGET, "a", &want(400), T).unwrap();
        let report = used(&g, 120, false);
        assert_eq!(l.report(BUDGET, "a", &report, T).unwrap().spent, 120);
        assert_eq!(l.report(BUDGET, "a", &report, T).unwrap().spent, 120, "the same report again");
        let older = Report { used: Allowance { credit: 80, ..Allowance::default() }, ..report.clone() };
        assert_eq!(l.report(BUDGET, "a", &older, T).unwrap().spent, 120, "an older report, late");
        assert_eq!(l.report(BUDGET, "b", &report, T), Err(Refused::UnknownLease), "another sidecar's lease");
        let done = Report { used: Allowance { credit: 150, ..Allowance::default() }, done: true, ..report };
        let figures = l.report(BUDGET, "a", &done, T).unwrap();
        assert_eq!((figures.spent, figures.outstanding), (150, 0), "done: the rest comes back");
    }

    #[test]
    fn an_expired_lease_stays_outstanding_through_the_grace_for_late_reports() {
        let mut l = ledger(terms(Some(1000), None, None));
        let g = l.lease(BUDGET, "a", &want(400), T).unwrap();
        assert_eq!(g.granted.credit, 400);
        let after = g.expires_at + 1;
        assert_eq!(l.figures(BUDGET, after).unwrap().outstanding, 400, "it may have been spent before expiry");
        let late = used(&g, 300, false);
        assert_eq!(l.report(BUDGET, "a", &late, after).unwrap().spent, 300);
        let gone = g.expires_at + REPORT_GRACE_MS;
        assert_eq!(l.figures(BUDGET, gone).unwrap().outstanding, 0, "after the grace, the rest is released");
        l.sweep(gone + 60_000);
        assert_eq!(l.report(BUDGET, "a", &late, gone + 60_000), Err(Refused::UnknownLease));
        assert_eq!(l.figures(BUDGET, gone).unwrap().spent, 300);
    }

    #[test]
    fn a_low_budget_is_spent_per_request_and_an_exhausted_one_not_at_all() {
        let mut l = ledger(terms(Some(1000), Some(200), None));
        let g = l.lease(BUDGET, "a", &want(900), T).unwrap();
        assert_eq!(g.granted.credit, 500);
        let done = used(&g, 850, true);
        assert_eq!(l.report(BUDGET, "a", &done, T).unwrap().state, BudgetState::Low, "overspent its lease: 150 left");
        let low = l.lease(BUDGET, "a", &want(100), T).unwrap();
        assert_eq!((low.mode, low.granted.credit), (Mode::PerRequest, 0));
        let r = l.reserve(BUDGET, "a", 100, T).unwrap();
        assert_eq!(r.budget.outstanding, 100);
        assert_eq!(l.reserve(BUDGET, "b", 60, T), Err(Refused::InsufficientCredits { remaining: 50, budget: None }));
        let figures = l.settle(BUDGET, "a", &r.reservation_id, 150, 10, T).unwrap();
        assert_eq!((figures.spent, figures.remaining, figures.state), (1000, Some(0), BudgetState::Exhausted));
        assert_eq!(l.lease(BUDGET, "b", &want(1), T).unwrap().mode, Mode::Exhausted);
        assert_eq!(l.reserve(BUDGET, "b", 0, T), Err(Refused::InsufficientCredits { remaining: 0, budget: None }));
    }

    #[test]
    fn rate_limits_are_leased_from_the_minute_across_the_fleet() {
        let rate = RateLimitPolicy { requests_per_minute: Some(100), tokens_per_minute: None };
        let mut l = ledger(terms(None, None, Some(rate)));
        let ask = LeaseRequest { want: Allowance { credit: 0, requests: 1000, tokens: 0 }, ..want(0) };
        let mut leases: Vec<(&str, LeaseGrant)> =
            ["a", "b", "c"].into_iter().map(|pod| (pod, l.lease(BUDGET, pod, &ask, T).unwrap())).collect();
        for _ in 0..50 {
            for (pod, g) in &mut leases {
                let more = LeaseRequest { lease_id: Some(g.lease_id.clone()), ..ask.clone() };
                *g = l.lease(BUDGET, pod, &more, T).unwrap();
            }
        }
        let granted: u64 = leases.iter().map(|(_, g)| g.granted.requests).sum();
        assert_eq!(granted, 100, "three pods share one minute's 100 requests");
        // The first to ask, alone, holds half; the others share the rest as they come.
        assert!(leases.iter().all(|(_, g)| g.granted.requests > 0 && g.granted.requests <= 63), "{leases:?}");
        let next = l.lease(BUDGET, "a", &ask, T + 60_000).unwrap();
        assert_eq!(next.granted.requests, 50, "a new minute, a new allowance");
        assert_eq!(l.reserve(BUDGET, "a", 0, T), Err(Refused::RateLimited { limit: 100, reset: 60 }));
    }

    #[test]
    fn a_new_leader_grants_what_the_written_status_proves_free_until_the_holders_say_what_they_hold() {
        let mut l = ledger(terms(Some(1000), None, None));
        let g = l.lease(BUDGET, "a", &want(1000), T).unwrap();
        l.report(BUDGET, "a", &used(&g, 100, false), T).unwrap();
        let persisted = l.take_dirty(T).pop().unwrap().1;
        assert!(l.take_dirty(T).is_empty(), "taken once");
        l.confirm(BUDGET, &persisted);
        assert_eq!((persisted.spent, persisted.holders.as_slice()), (100, &["a".to_string()][..]));
        assert!(persisted.pledged >= 400, "it covers what a holds: {persisted:?}");
        // After the write, within the pledge: answered at once, written never (the leader dies).
        let (more, persist) = l.lease_persisting(BUDGET, "a", &renew(&g, 300, 500), T).unwrap();
        assert_eq!((more.granted.credit, persist), (750, Persist::Eventually));

        // A new leader, with another id prefix, from the last write only.
        let mut next = FleetLedger::new("next");
        next.set_budgets([(BUDGET.to_string(), terms(Some(1000), None, None), Some(persisted.clone()))], T + 1);
        let figures = next.figures(BUDGET, T + 1).unwrap();
        assert_eq!((figures.spent, figures.outstanding), (100, 400), "the written lease still counts");
        let b = next.lease(BUDGET, "b", &want(1000), T + 1).unwrap();
        let free = 1000 - 100 - 400 - persisted.pledged.min(500);
        assert!(b.granted.credit <= free, "nothing past what the write proves free: {b:?}");
        assert_eq!(
            next.reserve(BUDGET, "b", 10, T + 1),
            Err(Refused::TakingOver),
            "not a 402: the credit is only held back until a says what it holds"
        );

        // a says what it holds: its lease as the last leader left it, 750 granted and 300 used.
        let held = Holding {
            id: g.lease_id.clone(),
            kind: HoldingKind::Lease,
            granted: Allowance { credit: 750, ..Allowance::default() },
            used: Allowance { credit: 300, ..Allowance::default() },
            window: g.window,
            expires_at: g.expires_at,
            done: false,
            acked: None,
        };
        let taken = next.holdings(BUDGET, "a", &Holdings { budget: "key".into(), held: vec![held] }, T + 2).unwrap();
        let figures = taken.budget;
        assert_eq!(
            (figures.spent, figures.outstanding),
            (300, 450 + b.granted.credit),
            "exact again: a's lease as it is, b's grant"
        );
        let c = next.lease(BUDGET, "c", &want(1000), T + 2).unwrap();
        assert!(c.granted.credit > 0, "the rest is free again");
        let late = used(&g, 350, true);
        let figures = next.report(BUDGET, "a", &late, T + 3).unwrap();
        assert_eq!(figures.spent, 350, "the old leader's lease, reported once");
        assert!(c.lease_id.starts_with("next-") && g.lease_id.starts_with("test-"));
        assert_ne!(figures.term, l.term(), "answers name the new term");
    }

    #[test]
    fn closed_leases_leave_the_status_but_still_count_once_and_in_their_minute() {
        let rate = RateLimitPolicy { requests_per_minute: Some(10), tokens_per_minute: None };
        let mut l = ledger(terms(Some(1000), None, Some(rate)));
        let mut ids = Vec::new();
        for _ in 0..4 {
            let r = l.reserve(BUDGET, "a", 10, T).unwrap();
            l.settle(BUDGET, "a", &r.reservation_id, 7, 0, T).unwrap();
            ids.push(r.reservation_id);
        }
        let again = l.settle(BUDGET, "a", &ids[0], 7, 0, T + 1).unwrap();
        assert_eq!(again.spent, 28, "a repeated settle counts once");
        assert_eq!(l.settle(BUDGET, "b", &ids[1], 7, 0, T + 1), Err(Refused::UnknownLease), "only its holder's");
        let debt = Debt {
            budget: "key".into(),
            debt_id: "pod-a-1".into(),
            used: Allowance { credit: 5, ..Allowance::default() },
        };
        l.debt(BUDGET, "a", &debt, T).unwrap();
        assert_eq!(l.debt(BUDGET, "a", &debt, T + 1).unwrap().spent, 33, "a repeated debt counts once");
        let (_, persisted, _) = l.take_dirty(T + 1).pop().unwrap();
        assert!(persisted.leases.is_empty(), "closed leases are not persisted: {persisted:?}");
        // The four requests still hold their minute: six are left of ten.
        let ask = LeaseRequest { want: Allowance { credit: 0, requests: 100, tokens: 0 }, ..want(0) };
        assert_eq!(l.lease(BUDGET, "b", &ask, T + 2).unwrap().granted.requests, 3, "half of the six left");
        l.sweep(T + REPORT_GRACE_MS + 1);
        assert_eq!(l.settle(BUDGET, "a", &ids[0], 7, 0, T + REPORT_GRACE_MS + 2), Err(Refused::UnknownLease));
    }

    #[test]
    fn terms_fit_the_api_servers_integers() {
        for prefix in (0..1000).map(|i| format!("op-{i}-1765000000000")) {
            assert!(i64::try_from(FleetLedger::new(prefix.as_str()).term()).is_ok(), "{prefix}");
        }
    }

    #[test]
    fn a_namespace_update_leaves_the_other_namespaces_alone() {
        let mut l = FleetLedger::new("test");
        let t = terms(Some(100), None, None);
        l.set_budgets([("a/x".into(), t.clone(), None), ("a/y".into(), t.clone(), None), ("b/x".into(), t, None)], T);
        let dropped = l.set_namespace("a", [("a/x".to_string(), terms(Some(500), None, None), None)], T);
        assert_eq!(dropped, ["a/y"], "what the ledger no longer keeps, for its status to say so");
        assert_eq!(l.figures("a/x", T).unwrap().remaining, Some(500), "new terms apply");
        assert!(l.figures("a/y", T).is_none(), "gone from its namespace");
        assert!(l.figures("b/x", T).is_some(), "another namespace's budget stays");
        assert_eq!(l.set_namespace("a", [], T), ["a/x"]);
        assert!(l.figures("a/x", T).is_none());
    }

    #[test]
    fn spend_starts_over_at_the_period_boundary() {
        let mut l = ledger(Terms { period: Period::Daily, ..terms(Some(1000), None, None) });
        let g = l.lease(BUDGET, "a", &want(1000), T).unwrap();
        l.report(
            BUDGET,
            "a",
            &Report {
                budget: "key".into(),
                lease_id: g.lease_id,
                used: Allowance { credit: 500, ..Allowance::default() },
                done: true,
            },
            T,
        )
        .unwrap();
        let tomorrow = T + 12 * 3_600_000;
        let figures = l.figures(BUDGET, tomorrow).unwrap();
        let day = tomorrow / 1000 - (tomorrow / 1000) % 86_400;
        assert_eq!((figures.spent, figures.period_start), (0, day), "figures read the current period");
        assert_eq!(l.figures(BUDGET, T).unwrap().spent, 500, "reading them changed nothing");
        let g = l.lease(BUDGET, "a", &want(1000), tomorrow).unwrap();
        assert_eq!((g.budget.spent, g.budget.period_start), (0, tomorrow / 1000 - (tomorrow / 1000) % 86_400));
    }

    /// A team (no key of its own) and two keys below it.
    fn team(team_limit: u64, team_low: Option<u64>, key: Terms) -> FleetLedger {
        let mut l = FleetLedger::new("test");
        let key = Terms { parent: Some("ns/team".into()), ..key };
        l.set_budgets(
            [
                ("ns/team".to_string(), terms(Some(team_limit), team_low, None), None),
                ("ns/a".to_string(), key.clone(), None),
                ("ns/b".to_string(), key, None),
            ],
            T,
        );
        l
    }

    #[test]
    fn a_team_limit_holds_across_its_keys_and_the_refusal_names_the_team() {
        let mut l = team(100, None, terms(Some(80), None, None));
        let a = l.lease("ns/a", "pod-a", &want(80), T).unwrap();
        let b = l.lease("ns/b", "pod-b", &want(80), T).unwrap();
        assert!(a.granted.credit + b.granted.credit <= 100, "{a:?} {b:?}");
        l.report("ns/a", "pod-a", &used(&a, a.granted.credit, true), T).unwrap();
        l.report("ns/b", "pod-b", &used(&b, 0, true), T).unwrap();
        let spent = a.granted.credit;
        let team = l.figures("ns/team", T).unwrap();
        assert_eq!((team.spent, team.remaining), (spent, Some(100 - spent)), "the team counts its keys' spend");
        let b = l.figures("ns/b", T).unwrap();
        assert_eq!((b.spent, b.remaining), (0, Some(80)), "a key counts its own");
        assert_eq!(b.parents[0].budget, "ns/team");
        assert_eq!(b.parents[0].remaining, Some(100 - spent));
        assert_eq!(
            l.reserve("ns/b", "pod-b", 70, T),
            Err(Refused::InsufficientCredits { remaining: 100 - spent, budget: Some("ns/team".into()) }),
            "b's own 80 would cover it; the team's {} does not",
            100 - spent
        );
    }

    #[test]
    fn a_key_spends_per_request_when_its_team_is_low_and_not_at_all_when_it_is_exhausted() {
        let mut l = team(100, Some(30), terms(Some(80), None, None));
        let r = l.reserve("ns/a", "pod-a", 75, T).unwrap();
        l.settle("ns/a", "pod-a", &r.reservation_id, 75, 0, T).unwrap();
        let b = l.lease("ns/b", "pod-b", &want(10), T).unwrap();
        assert_eq!((b.mode, b.budget.state), (Mode::PerRequest, BudgetState::Active), "b is Active, its team Low");
        let r = l.reserve("ns/b", "pod-b", 25, T).unwrap();
        l.settle("ns/b", "pod-b", &r.reservation_id, 25, 0, T).unwrap();
        let b = l.lease("ns/b", "pod-b", &want(10), T).unwrap();
        assert_eq!(b.mode, Mode::Exhausted);
        assert_eq!(b.budget.exhausted(), (0, Some("ns/team")));
    }

    #[test]
    fn a_key_removed_from_below_a_team_leaves_its_spend_with_the_team() {
        let weekly = Terms { period: Period::Weekly, ..terms(Some(100), None, None) };
        let key = Terms { period: Period::Daily, parent: Some("ns/team".into()), ..terms(Some(80), None, None) };
        let budgets = |ids: &[&str], written: &HashMap<String, Persisted>| -> Vec<(String, Terms, Option<Persisted>)> {
            ids.iter()
                .map(|&id| {
                    (
                        id.to_string(),
                        if id == "ns/team" { weekly.clone() } else { key.clone() },
                        written.get(id).cloned(),
                    )
                })
                .collect()
        };
        let none = HashMap::new();
        let mut l = FleetLedger::new("test");
        l.set_budgets(budgets(&["ns/team", "ns/a", "ns/b"], &none), T);
        let r = l.reserve("ns/a", "pod-a", 50, T).unwrap();
        l.settle("ns/a", "pod-a", &r.reservation_id, 50, 0, T).unwrap();
        let a_written: HashMap<String, Persisted> = l.take_dirty(T).into_iter().map(|(id, p, _)| (id, p)).collect();

        // Revoked: the team keeps what it spent this week, as its own.
        assert_eq!(l.set_namespace("ns", budgets(&["ns/team", "ns/b"], &none), T), vec!["ns/a".to_string()]);
        let tomorrow = T + 24 * 3_600_000;
        assert_eq!(l.figures("ns/team", tomorrow).unwrap().spent, 50, "a's day is over, the team's week is not");
        assert_eq!(
            l.reserve("ns/b", "pod-b", 60, T),
            Err(Refused::InsufficientCredits { remaining: 50, budget: Some("ns/team".into()) }),
            "a key issued in a's place has no more of the team's credit than a left"
        );
        let written: HashMap<String, Persisted> = l.take_dirty(T).into_iter().map(|(id, p, _)| (id, p)).collect();
        assert_eq!(written["ns/team"].spent, 50, "written as the team's own spend");
        let mut next = FleetLedger::new("next");
        next.set_budgets(budgets(&["ns/team", "ns/b"], &written), T);
        assert_eq!(next.figures("ns/team", T).unwrap().spent, 50, "a new leader reads it back");

        // Back with its stored spend, it is counted once; back with none, the team keeps it.
        l.set_namespace("ns", budgets(&["ns/team", "ns/a", "ns/b"], &a_written), T);
        assert_eq!((l.figures("ns/team", T).unwrap().spent, l.figures("ns/a", T).unwrap().spent), (50, 50));
        l.set_namespace("ns", budgets(&["ns/team", "ns/b"], &none), T);
        l.set_namespace("ns", budgets(&["ns/team", "ns/a", "ns/b"], &none), T);
        assert_eq!((l.figures("ns/team", T).unwrap().spent, l.figures("ns/a", T).unwrap().spent), (50, 0));
        assert_eq!(l.figures("ns/team", T + 7 * 24 * 3_600_000).unwrap().spent, 0, "until the team's week is over");
    }

    #[test]
    fn a_team_counts_its_keys_spend_in_its_own_period() {
        // T is a Monday: the team's week goes on when the key's day starts over.
        let weekly = Terms { period: Period::Weekly, ..terms(Some(100), None, None) };
        let key = Terms { period: Period::Daily, parent: Some("ns/team".into()), ..terms(Some(80), None, None) };
        let budgets = |written: &HashMap<String, Persisted>| {
            [("ns/team", weekly.clone()), ("ns/a", key.clone())]
                .map(|(id, t)| (id.to_string(), t, written.get(id).cloned()))
        };
        let mut l = FleetLedger::new("test");
        l.set_budgets(budgets(&HashMap::new()), T);
        let r = l.reserve("ns/a", "pod-a", 50, T).unwrap();
        l.settle("ns/a", "pod-a", &r.reservation_id, 50, 0, T).unwrap();
        let tomorrow = T + 24 * 3_600_000;
        let a = l.figures("ns/a", tomorrow).unwrap();
        assert_eq!((a.spent, a.parents[0].spent), (0, 50), "the key's day starts over, the team's week does not");
        // What a new leader reads back adds up the same.
        let written: HashMap<String, Persisted> = l.take_dirty(T).into_iter().map(|(id, p, _)| (id, p)).collect();
        let mut next = FleetLedger::new("next");
        next.set_budgets(budgets(&written), tomorrow);
        assert_eq!(next.figures("ns/team", tomorrow).unwrap().spent, 50);
        assert_eq!(next.figures("ns/a", tomorrow).unwrap().spent, 0);
    }

    #[test]
    fn top_ups_raise_a_key_from_its_team_up_to_the_period_maximum_and_the_team_credit() {
        let policy = TopUpPolicy { threshold: 5, amount: 10, max_per_period: 20 };
        let mut l = team(100, None, Terms { top_up: Some(policy), ..terms(Some(10), Some(5), None) });
        // 8 of 10 would leave 2, under the threshold: one top-up of 10 first.
        let r = l.reserve("ns/a", "pod-a", 8, T).unwrap();
        assert_eq!((r.budget.topped_up, r.budget.remaining, r.budget.state), (10, Some(20), BudgetState::Active));
        l.settle("ns/a", "pod-a", &r.reservation_id, 8, 0, T).unwrap();
        let r = l.reserve("ns/a", "pod-a", 10, T).unwrap();
        assert_eq!(r.budget.topped_up, 20, "the second, the period's last");
        l.settle("ns/a", "pod-a", &r.reservation_id, 10, 0, T).unwrap();
        assert_eq!(
            l.reserve("ns/a", "pod-a", 20, T),
            Err(Refused::InsufficientCredits { remaining: 12, budget: None }),
            "no more than maxPerPeriod"
        );
        let told = l.take_top_ups();
        assert_eq!(told.iter().map(|t| (t.added, t.this_period)).collect::<Vec<_>>(), [(10, 10), (10, 20)]);
        // Leases are room to spend, not spend: idle ones take nothing from the team.
        let mut l = team(100, None, Terms { top_up: Some(policy), ..terms(Some(10), Some(5), None) });
        for pod in ["pod-a", "pod-b", "pod-c"] {
            let g = l.lease("ns/a", pod, &want(10), T).unwrap();
            let g = l.lease("ns/a", pod, &renew(&g, 0, 10), T).unwrap();
            assert_eq!(g.budget.topped_up, 0, "{g:?}");
        }
        assert!(l.take_top_ups().is_empty());
        // A team of 15: b's top-up takes it to 20 and spends 10 of it; 5 left is no whole amount
        // for a's, and not enough for its request.
        let mut l = team(15, None, Terms { top_up: Some(policy), ..terms(Some(10), Some(5), None) });
        let r = l.reserve("ns/b", "pod-b", 10, T).unwrap();
        assert_eq!(r.budget.topped_up, 10);
        l.settle("ns/b", "pod-b", &r.reservation_id, 10, 0, T).unwrap();
        assert_eq!(
            l.reserve("ns/a", "pod-a", 8, T),
            Err(Refused::InsufficientCredits { remaining: 5, budget: Some("ns/team".into()) })
        );
        assert_eq!(l.take_top_ups().len(), 1, "b's only: the team had no whole amount for a");
    }

    #[test]
    fn keys_a_template_issued_are_written_together() {
        let mut l = FleetLedger::new("test");
        let t = terms(Some(100), None, None);
        l.set_budgets(
            [
                ("ns/tpl:one".to_string(), t.clone(), None),
                ("ns/tpl:two".to_string(), t.clone(), None),
                ("ns/other".to_string(), t, None),
            ],
            T,
        );
        l.take_dirty(T);
        l.reserve("ns/tpl:two", "pod", 5, T).unwrap();
        let written: Vec<String> = l.take_dirty(T).into_iter().map(|(id, _, _)| id).collect();
        assert_eq!(written, ["ns/tpl:one", "ns/tpl:two"]);
        assert_eq!(written_with("ns/tpl:two"), "ns/tpl");
        assert_eq!(written_with("ns/other"), "ns/other", "any other budget in its own");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::budget::protocol::Acked;

        #[derive(Clone, Debug)]
        enum Step {
            /// A pod leases (or tops up) and spends up to `spend` of what it may, honestly.
            Lease { pod: usize, want: u64, spend: u64 },
            /// A pod reports (`done` or not), possibly twice.
            Report { pod: usize, done: bool, twice: bool },
            /// A pod in per-request mode reserves and settles at `cost` (may exceed the amount).
            Request { pod: usize, amount: u64, cost: u64 },
            /// Time passes.
            Wait { ms: u64 },
            /// The ledger writes its books.
            Write,
            /// It takes its books to write them; the write lands later.
            Snapshot,
            /// The write under way lands.
            Land,
            /// The leader is killed (`kill -9`): the next one knows only the last write, which
            /// may be one under way that landed.
            Kill { landed: bool },
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (0usize..4, 1u64..400, 0u64..400).prop_map(|(pod, want, spend)| Step::Lease { pod, want, spend }),
                2 => (0usize..4, any::<bool>(), any::<bool>()).prop_map(|(pod, done, twice)| Step::Report { pod, done, twice }),
                1 => (0usize..4, 1u64..50, 0u64..60).prop_map(|(pod, amount, cost)| Step::Request { pod, amount, cost }),
                1 => (0u64..40_000).prop_map(|ms| Step::Wait { ms }),
                1 => Just(Step::Write),
                1 => Just(Step::Snapshot),
                1 => Just(Step::Land),
                1 => any::<bool>().prop_map(|landed| Step::Kill { landed }),
            ]
        }

        /// Something a pod reported and keeps until an answer says a write holds it.
        #[derive(Clone, Debug)]
        struct Kept {
            holding: Holding,
        }

        impl Kept {
            /// A lease reported done with `used`, as the answer `f` took it in.
            fn closed(grant: LeaseGrant, used: Allowance, f: &BudgetFigures) -> Kept {
                let acked = Some(Acked { term: f.term, version: f.version });
                let (id, granted, window, expires_at) = (grant.lease_id, grant.granted, grant.window, grant.expires_at);
                Kept {
                    holding: Holding {
                        id,
                        kind: HoldingKind::Lease,
                        granted,
                        used,
                        window,
                        expires_at,
                        done: true,
                        acked,
                    },
                }
            }
        }

        /// A pod: its lease and what it spent on it, what it keeps for a new leader, and the
        /// last term it heard.
        #[derive(Clone, Default)]
        struct Pod {
            grant: Option<LeaseGrant>,
            spent: u64,
            /// The largest room asked for on this lease.
            asked: u64,
            kept: Vec<Kept>,
            term: u64,
        }

        impl Pod {
            fn name(i: usize) -> String {
                format!("pod-{i}")
            }

            /// What it holds, as a new leader is told.
            fn holdings(&self) -> Holdings {
                let mut held: Vec<Holding> = self.kept.iter().map(|k| k.holding.clone()).collect();
                if let Some(g) = &self.grant {
                    held.push(Holding {
                        id: g.lease_id.clone(),
                        kind: HoldingKind::Lease,
                        granted: g.granted,
                        used: Allowance { credit: self.spent, ..Allowance::default() },
                        window: g.window,
                        expires_at: g.expires_at,
                        done: false,
                        acked: None,
                    });
                }
                Holdings { budget: "key".into(), held }
            }

            /// An answer came: what a write holds is no longer kept.
            fn heard(&mut self, figures: &BudgetFigures) {
                self.term = figures.term;
                self.kept.retain(|k| {
                    k.holding.acked.as_ref().is_none_or(|a| a.term != figures.term || a.version > figures.durable)
                });
            }
        }

        /// The ledger as the service drives it: answers that must wait for a write get one first.
        struct Leader {
            l: FleetLedger,
            /// What the last landed write of each book holds.
            written: HashMap<String, Persisted>,
            /// A write under way.
            writing: Option<Vec<(String, Persisted)>>,
        }

        impl Leader {
            fn snapshot(&mut self, now: u64) {
                if self.writing.is_none() {
                    self.writing = Some(self.l.take_dirty(now).into_iter().map(|(id, p, _)| (id, p)).collect());
                }
            }

            /// The write under way lands, if there is one; `on` decides which of its books it
            /// holds (a kill may come between two budgets' writes).
            fn land_some(&mut self, on: impl Fn(&str) -> bool) {
                for (id, p) in self.writing.take().unwrap_or_default() {
                    if on(&id) {
                        self.l.confirm(&id, &p);
                        self.written.insert(id, p);
                    }
                }
            }

            fn land(&mut self) {
                self.land_some(|_| true);
            }

            fn write(&mut self, now: u64) {
                self.land();
                self.snapshot(now);
                self.land();
            }

            /// An answer that must wait for a write waits for one taken after its change.
            fn after(&mut self, persist: Persist, now: u64) {
                if persist.waits() {
                    self.write(now);
                }
            }

            /// A pod that has not heard the current term tells it what it holds first.
            fn sync(&mut self, pods: &mut [Pod], pod: usize, budget: &str, now: u64) {
                if pods[pod].term != self.l.term() {
                    let holdings = pods[pod].holdings();
                    let taken = self.l.holdings(budget, &Pod::name(pod), &holdings, now).unwrap();
                    // What the last write holds is done with; the rest the new leader took in,
                    // and it is kept until a write of the new leader's holds that change.
                    let figures = taken.budget;
                    pods[pod].kept.retain(|k| !taken.written.contains(&k.holding.id));
                    for kept in &mut pods[pod].kept {
                        kept.holding.acked = Some(Acked { term: figures.term, version: figures.version });
                    }
                    pods[pod].heard(&figures);
                }
            }
        }

        /// The books a scenario keeps, and each pod's budget.
        struct Books {
            budgets: Vec<(String, Terms)>,
            of_pod: fn(usize) -> &'static str,
        }

        /// Pods that spend only what they were granted, before it expires, never make any
        /// budget overspend, through writes that may come late and leaders killed between them;
        /// a lease's room never grows past what its pod asked for; the ledger never counts spend
        /// twice, and once every pod has told the last leader what it holds and reported its
        /// leases done, every budget holds exactly what was spent on it and below it.
        fn honest_pods(books: &Books, steps: Vec<Step>) -> Result<(), TestCaseError> {
            let mut ledger = FleetLedger::new("test");
            ledger.set_budgets(books.budgets.iter().map(|(id, t)| (id.clone(), t.clone(), None)), T);
            let mut leader = Leader { l: ledger, written: HashMap::new(), writing: None };
            let mut now = T;
            let mut pods = vec![Pod::default(); 4];
            // By budget: spent within grants, and settles above their reservation (the stated
            // bound), each counted at the pod's budget and every budget above it.
            let mut true_spend: HashMap<String, u64> = HashMap::new();
            let mut per_request_over: HashMap<String, u64> = HashMap::new();
            let above = |budget: &str| -> Vec<String> {
                let mut chain = vec![budget.to_string()];
                while let Some(parent) =
                    books.budgets.iter().find(|(id, _)| Some(id) == chain.last()).and_then(|(_, t)| t.parent.clone())
                {
                    chain.push(parent);
                }
                chain
            };
            let count = |map: &mut HashMap<String, u64>, budget: &str, amount: u64| {
                for id in above(budget) {
                    *map.entry(id).or_default() += amount;
                }
            };
            let mut kills = 0;
            for step in steps {
                match step {
                    Step::Lease { pod, want: w, spend } => {
                        let budget = (books.of_pod)(pod);
                        leader.sync(&mut pods, pod, budget, now);
                        let held = &mut pods[pod];
                        let request = match &held.grant {
                            Some(g) if now < g.expires_at => LeaseRequest {
                                lease_id: Some(g.lease_id.clone()),
                                used: Allowance { credit: held.spent, ..Allowance::default() },
                                ..want(w)
                            },
                            _ => want(w),
                        };
                        let (g, persist) = leader.l.lease_persisting(budget, &Pod::name(pod), &request, now).unwrap();
                        leader.after(persist, now);
                        let held = &mut pods[pod];
                        held.heard(&g.budget);
                        if g.mode == Mode::Lease && !g.lease_id.is_empty() {
                            if held.grant.as_ref().is_none_or(|old| old.lease_id != g.lease_id) {
                                // A new lease: the old one's use is reported with it, done.
                                if let Some(old) = held.grant.take() {
                                    let used = Allowance { credit: held.spent, ..Allowance::default() };
                                    let report = Report {
                                        budget: "key".into(),
                                        lease_id: old.lease_id.clone(),
                                        used,
                                        done: true,
                                    };
                                    if let Ok(f) = leader.l.report(budget, &Pod::name(pod), &report, now) {
                                        held.kept.push(Kept::closed(old, used, &f));
                                    }
                                }
                                held.spent = 0;
                                held.asked = 0;
                            }
                            held.asked = held.asked.max(w);
                            let room = g.granted.credit.saturating_sub(held.spent);
                            prop_assert!(room <= held.asked || kills > 0, "room {room} past the {} asked", held.asked);
                            let spend = spend.min(room);
                            held.spent += spend;
                            count(&mut true_spend, budget, spend);
                            held.grant = Some(g);
                        }
                    }
                    Step::Report { pod, done, twice } => {
                        let budget = (books.of_pod)(pod);
                        leader.sync(&mut pods, pod, budget, now);
                        let held = &mut pods[pod];
                        if let Some(g) = held.grant.clone() {
                            let used = Allowance { credit: held.spent, ..Allowance::default() };
                            let report = Report { budget: "key".into(), lease_id: g.lease_id.clone(), used, done };
                            let mut answer = None;
                            for _ in 0..if twice { 2 } else { 1 } {
                                answer = leader.l.report(budget, &Pod::name(pod), &report, now).ok();
                            }
                            if let Some(f) = &answer {
                                held.heard(f);
                            }
                            if done {
                                if let Some(f) = answer {
                                    held.kept.push(Kept::closed(g, used, &f));
                                }
                                held.grant = None;
                                held.spent = 0;
                            }
                        }
                    }
                    Step::Request { pod, amount, cost } => {
                        let budget = (books.of_pod)(pod);
                        leader.sync(&mut pods, pod, budget, now);
                        if let Ok((r, persist)) = leader.l.reserve_persisting(budget, &Pod::name(pod), amount, now) {
                            leader.after(persist, now);
                            let f = leader.l.settle(budget, &Pod::name(pod), &r.reservation_id, cost, 0, now).unwrap();
                            let held = &mut pods[pod];
                            held.heard(&f);
                            let used = Allowance { credit: cost, requests: 1, tokens: 0 };
                            held.kept.push(Kept {
                                holding: Holding {
                                    id: r.reservation_id,
                                    kind: HoldingKind::Reservation,
                                    granted: Allowance { credit: amount, requests: 1, tokens: 0 },
                                    used,
                                    window: minute(now),
                                    expires_at: r.expires_at,
                                    done: true,
                                    acked: Some(Acked { term: f.term, version: f.version }),
                                },
                            });
                            count(&mut true_spend, budget, cost.min(amount));
                            count(&mut per_request_over, budget, cost.saturating_sub(amount));
                        }
                    }
                    Step::Wait { ms } => {
                        // Honest sidecars stop spending a lease when it expires and report it.
                        let until = now + ms;
                        while let Some(pod) = (0..pods.len())
                            .filter(|&p| pods[p].grant.as_ref().is_some_and(|g| g.expires_at <= until))
                            .min_by_key(|&p| pods[p].grant.as_ref().map(|g| g.expires_at))
                        {
                            let budget = (books.of_pod)(pod);
                            now = now.max(pods[pod].grant.as_ref().map_or(now, |g| g.expires_at));
                            leader.sync(&mut pods, pod, budget, now);
                            let held = &mut pods[pod];
                            let Some(g) = held.grant.take() else { continue };
                            let used = Allowance { credit: held.spent, ..Allowance::default() };
                            let report =
                                Report { budget: "key".into(), lease_id: g.lease_id.clone(), used, done: true };
                            if let Ok(f) = leader.l.report(budget, &Pod::name(pod), &report, now) {
                                held.heard(&f);
                                held.kept.push(Kept::closed(g, used, &f));
                            }
                            held.spent = 0;
                        }
                        now = until;
                        leader.l.sweep(now);
                    }
                    Step::Write => leader.write(now),
                    Step::Snapshot => leader.snapshot(now),
                    Step::Land => leader.land(),
                    Step::Kill { landed } => {
                        if landed {
                            // Books are written one by one: a kill may land some of them.
                            let first = leader.writing.as_ref().and_then(|w| w.first()).map(|(id, _)| id.clone());
                            leader.land_some(|id| kills % 2 == 0 || Some(id) == first.as_deref());
                        }
                        // Another prefix: ids must not collide anyway.
                        kills += 1;
                        let mut next = FleetLedger::new(format!("leader-{kills}"));
                        next.set_budgets(
                            books
                                .budgets
                                .iter()
                                .map(|(id, t)| (id.clone(), t.clone(), leader.written.get(id).cloned())),
                            now,
                        );
                        leader = Leader { l: next, written: leader.written.clone(), writing: None };
                    }
                }
                for (id, terms) in &books.budgets {
                    let figures = leader.l.figures(id, now).unwrap();
                    let (spent, over) =
                        (true_spend.get(id).copied().unwrap_or(0), per_request_over.get(id).copied().unwrap_or(0));
                    prop_assert!(
                        terms.limit.is_none_or(|limit| spent <= limit),
                        "{id}: true spend {spent} over the limit"
                    );
                    prop_assert!(figures.spent <= spent + over, "{id} counted twice: {figures:?}, {spent}");
                }
            }
            // Everyone tells the last leader what it holds and reports its lease done.
            for pod in 0..pods.len() {
                let budget = (books.of_pod)(pod);
                leader.sync(&mut pods, pod, budget, now);
                if let Some(g) = pods[pod].grant.take() {
                    let used = Allowance { credit: pods[pod].spent, ..Allowance::default() };
                    let report = Report { budget: "key".into(), lease_id: g.lease_id, used, done: true };
                    let _ = leader.l.report(budget, &Pod::name(pod), &report, now);
                }
            }
            // Within one period (the steps stay in one day).
            for (id, _) in &books.budgets {
                let spent = leader.l.figures(id, now).unwrap().spent;
                let expected =
                    true_spend.get(id).copied().unwrap_or(0) + per_request_over.get(id).copied().unwrap_or(0);
                prop_assert_eq!(spent, expected, "{}: nothing lost, nothing counted twice", id);
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn honest_pods_never_overspend_and_no_spend_is_lost_or_counted_twice(steps in prop::collection::vec(step(), 1..80)) {
                let books = Books { budgets: vec![(BUDGET.to_string(), terms(Some(1000), Some(100), None))], of_pod: |_| BUDGET };
                honest_pods(&books, steps)?;
            }

            /// The same for two keys under a team whose limit is below the sum of theirs, with
            /// periods that differ: a key is Low when the team is, and the team's figures always
            /// add up to what its keys' books hold.
            #[test]
            fn honest_pods_never_overspend_a_team_and_no_spend_is_lost_or_counted_twice(steps in prop::collection::vec(step(), 1..80)) {
                let key = |limit| Terms {
                    period: Period::Daily,
                    parent: Some("ns/team".into()),
                    ..terms(Some(limit), Some(50), None)
                };
                let books = Books {
                    budgets: vec![
                        ("ns/team".to_string(), terms(Some(1000), Some(100), None)),
                        ("ns/a".to_string(), key(700)),
                        ("ns/b".to_string(), key(600)),
                    ],
                    of_pod: |pod| if pod < 2 { "ns/a" } else { "ns/b" },
                };
                honest_pods(&books, steps)?;
            }
        }
    }
}
