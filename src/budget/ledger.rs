//! The embedded ledger of standalone mode: what each budget has spent and has reserved.
//!
//! Reservations live in memory only: a crash forgets them, so none can stay stuck. Settled spend
//! is appended to a journal file ([`super::journal`]) by one writer thread in group commits: a
//! settle wakes it, it gathers what is settled within [`GROUP_COMMIT_WINDOW`], and commits (with
//! fsync) all of it at once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::journal::{Damage, Journal};
use super::spend::Spend;
use crate::api::Period;
use crate::config::{RateLimitPolicy, TopUpPolicy};
use crate::metrics::Counter;

/// Unix seconds, injectable so tests can cross period boundaries.
pub trait Clock: Send + Sync {
    fn unix_seconds(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_seconds(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }
}

/// The requests and tokens of the current minute, for rate limits.
#[derive(Debug, Default)]
struct RateWindow {
    minute: u64,
    requests: u64,
    tokens: u64,
}

/// Where a key stands against one rate limit, for the `X-RateLimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the current minute's window ends.
    pub reset: u64,
}

/// Why a reservation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not enough credit left at `level` of the budget's chain (0: the key's own budget, then
    /// its parent, ...): what remains there, after the reservations in flight.
    Insufficient { remaining: u64, level: usize },
    /// The ledger cannot record spend and the budget fails closed.
    Unavailable,
}

/// What a budget's requests met, for its metrics (in standalone and in cluster mode).
#[derive(Debug, Default)]
pub struct BudgetCounters {
    /// Reservations in flight.
    pub in_flight: AtomicU64,
    /// Requests refused for want of credit (402).
    pub refused: Counter,
    /// Requests refused by a rate limit (429).
    pub rate_limited: Counter,
    /// Settled costs that were estimated because the provider reported no usage.
    pub estimated: Counter,
}

/// One budget's account.
#[derive(Debug)]
pub struct Account {
    id: String,
    spend: Mutex<Spend>,
    rate: Mutex<RateWindow>,
    dirty: AtomicBool,
    pub counters: BudgetCounters,
}

impl Account {
    fn new(id: String, spend: Spend) -> Account {
        Account {
            id,
            spend: Mutex::new(spend),
            rate: Mutex::default(),
            dirty: AtomicBool::new(false),
            counters: BudgetCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Spend> {
        self.spend.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spend as of `now`, with the period rolled over if it ended.
    pub fn view(&self, period: Period, now: u64) -> Spend {
        let mut spend = self.lock();
        spend.roll(period, now);
        *spend
    }

    /// Holds `amount` within `limit` (and what top-ups added to it this period), or says what
    /// remains.
    fn try_reserve(&self, limit: Option<u64>, period: Period, amount: u64, now: u64) -> Result<(), u64> {
        let mut spend = self.lock();
        spend.roll(period, now);
        if let Some(limit) = limit.map(|l| l.saturating_add(spend.topped_up)) {
            let committed = spend.spent.saturating_add(spend.reserved);
            if committed.saturating_add(amount) > limit {
                return Err(limit.saturating_sub(committed));
            }
        }
        spend.reserved += amount;
        Ok(())
    }

    fn settle(&self, period: Period, reserved: u64, actual: u64, now: u64) {
        let mut spend = self.lock();
        spend.reserved = spend.reserved.saturating_sub(reserved);
        spend.roll(period, now);
        spend.spent = spend.spent.saturating_add(actual);
        spend.total = spend.total.saturating_add(actual);
        spend.day = spend.day.saturating_add(actual);
        spend.week = spend.week.saturating_add(actual);
        spend.month = spend.month.saturating_add(actual);
        drop(spend);
        self.dirty.store(true, Relaxed);
    }

    fn release(&self, reserved: u64) {
        let mut spend = self.lock();
        spend.reserved = spend.reserved.saturating_sub(reserved);
    }

    /// Counts a request against the rate limits, or says when it may try again.
    pub fn admit_rate(&self, policy: RateLimitPolicy, now: u64) -> Result<Option<RateStatus>, RateStatus> {
        let mut window = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let minute = now / 60;
        if window.minute != minute {
            *window = RateWindow { minute, requests: 0, tokens: 0 };
        }
        let reset = 60 - now % 60;
        if let Some(tpm) = policy.tokens_per_minute
            && window.tokens >= tpm
        {
            return Err(RateStatus { limit: tpm, remaining: 0, reset });
        }
        if let Some(rpm) = policy.requests_per_minute.map(u64::from) {
            if window.requests >= rpm {
                return Err(RateStatus { limit: rpm, remaining: 0, reset });
            }
            window.requests += 1;
            return Ok(Some(RateStatus { limit: rpm, remaining: rpm - window.requests, reset }));
        }
        window.requests += 1;
        Ok(policy.tokens_per_minute.map(|tpm| RateStatus { limit: tpm, remaining: tpm - window.tokens, reset }))
    }

    /// Counts an answer's tokens against the tokens-per-minute limit.
    pub fn add_tokens(&self, tokens: u64, now: u64) {
        let mut window = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        if window.minute == now / 60 {
            window.tokens = window.tokens.saturating_add(tokens);
        } else {
            *window = RateWindow { minute: now / 60, requests: 0, tokens };
        }
    }
}

/// One level of a budget's chain: the key's own budget, its parent, and so on. Each level has
/// its own account, limit and period, and a request holds credit at every level.
#[derive(Clone, Debug)]
pub struct Level {
    pub account: Arc<Account>,
    pub limit: Option<u64>,
    pub period: Period,
    /// Raising `limit` from the next level's credit (the key's own level only).
    pub top_up: Option<TopUpPolicy>,
}

/// Before a reservation of `amount` at the key's level: when it would leave less than the
/// top-up threshold there, raises the level's limit for the period by whole top-up amounts, as
/// many as bring it back to the threshold, as the period's maximum allows and as the parent has
/// credit left for (its spend and reservations). Spend still counts at the parent, so the
/// team's total never grows. What was added.
#[inline]
fn top_up(levels: &[Level], amount: u64, now: u64) -> u64 {
    let [own, parent, ..] = levels else { return 0 };
    let (Some(policy), Some(limit)) = (own.top_up, own.limit) else { return 0 };
    top_up_from(own, parent, policy, limit, amount, now)
}

/// [`top_up`] for a level that has a policy, a limit and a parent: kept out of line, off the
/// path of every request without one.
#[inline(never)]
fn top_up_from(own: &Level, parent: &Level, policy: TopUpPolicy, limit: u64, amount: u64, now: u64) -> u64 {
    let mut spend = own.account.lock();
    spend.roll(own.period, now);
    let committed = spend.spent.saturating_add(spend.reserved).saturating_add(amount);
    let floor = committed.saturating_add(policy.threshold);
    let effective = limit.saturating_add(spend.topped_up);
    if effective >= floor || policy.amount == 0 {
        return 0;
    }
    let wanted = (floor - effective).div_ceil(policy.amount);
    let allowed = policy.max_per_period.saturating_sub(spend.topped_up) / policy.amount;
    let afforded = parent.limit.map_or(u64::MAX, |parent_limit| {
        let mut parent_spend = parent.account.lock();
        parent_spend.roll(parent.period, now);
        parent_limit.saturating_sub(parent_spend.spent.saturating_add(parent_spend.reserved)) / policy.amount
    });
    let added = wanted.min(allowed).min(afforded).saturating_mul(policy.amount);
    if added > 0 {
        spend.topped_up = spend.topped_up.saturating_add(added);
        let topped_up = spend.topped_up;
        drop(spend);
        own.account.dirty.store(true, Relaxed);
        tracing::info!(
            budget = %own.account.id,
            added = %crate::api::units::format_micros(added),
            this_period = %crate::api::units::format_micros(topped_up),
            "budget topped up from its parent"
        );
    }
    added
}

/// Holds `amount` at every level, or at none: the first level that cannot hold it, and what
/// remains there.
#[inline]
fn reserve_all(levels: &[Level], amount: u64, now: u64) -> Result<(), Refusal> {
    for (i, level) in levels.iter().enumerate() {
        if let Err(remaining) = level.account.try_reserve(level.limit, level.period, amount, now) {
            for held in &levels[..i] {
                held.account.release(amount);
            }
            return Err(Refusal::Insufficient { remaining, level: i });
        }
    }
    Ok(())
}

struct LedgerCore {
    accounts: Mutex<HashMap<String, Arc<Account>>>,
    /// Spend read from the file at start, for accounts not created yet.
    stored: Mutex<HashMap<String, Spend>>,
    clock: Arc<dyn Clock>,
    /// False after a failed commit, until one succeeds.
    available: AtomicBool,
    /// Wakes the writer; `true` also tells it to stop after writing.
    wake: Option<SyncSender<bool>>,
    /// What the journal had damaged when it was opened.
    damage: Damage,
    /// Settled reservations so far, and how many of them the journal holds.
    settled: AtomicU64,
    durable: AtomicU64,
}

impl LedgerCore {
    fn wake_writer(&self) {
        if let Some(wake) = &self.wake {
            // A full channel means a wake-up is already pending: this settle rides along.
            if let Err(TrySendError::Disconnected(_)) = wake.try_send(false) {
                self.available.store(false, Relaxed);
            }
        }
    }
}

/// The ledger: accounts by budget id, and their persistence.
#[derive(Clone)]
pub struct Ledger {
    shared: Arc<LedgerCore>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Ledger {
    /// A ledger kept only in memory.
    pub fn in_memory(clock: Arc<dyn Clock>) -> Ledger {
        Ledger {
            shared: Arc::new(LedgerCore {
                accounts: Mutex::default(),
                stored: Mutex::default(),
                clock,
                available: AtomicBool::new(true),
                wake: None,
                damage: Damage::default(),
                settled: AtomicU64::new(0),
                durable: AtomicU64::new(0),
            }),
            writer: Arc::default(),
        }
    }

    /// A ledger persisted in `dir/ledger.journal`, created if missing.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Ledger, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (mut journal, stored, damage) = Journal::open(dir)?;
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let shared = Arc::new(LedgerCore {
            accounts: Mutex::default(),
            stored: Mutex::new(stored),
            clock,
            available: AtomicBool::new(true),
            wake: Some(wake),
            damage,
            settled: AtomicU64::new(0),
            durable: AtomicU64::new(0),
        });
        let writer = {
            let shared = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("ledger-writer".into())
                .spawn(move || write_loop(&mut journal, &shared, &woken))
                .map_err(|e| format!("cannot start the ledger writer: {e}"))?
        };
        Ok(Ledger { shared, writer: Arc::new(Mutex::new(Some(writer))) })
    }

    pub fn now(&self) -> u64 {
        self.shared.clock.unix_seconds()
    }

    /// What the journal had damaged (and this process skipped) when the ledger was opened.
    pub fn damage(&self) -> &Damage {
        &self.shared.damage
    }

    /// Settled answers whose spend is not on disk yet: a group commit's worth at most while the
    /// disk keeps up. Always 0 for a ledger in memory.
    pub fn unsaved(&self) -> u64 {
        if self.shared.wake.is_none() {
            return 0;
        }
        let durable = self.shared.durable.load(SeqCst);
        self.shared.settled.load(SeqCst).saturating_sub(durable)
    }

    /// Whether spend can be recorded durably now.
    pub fn is_available(&self) -> bool {
        self.shared.available.load(Relaxed)
    }

    /// The account of a budget, the same for the budget's whole life.
    pub fn account(&self, id: &str) -> Arc<Account> {
        let mut accounts = self.shared.accounts.lock().unwrap_or_else(|e| e.into_inner());
        accounts
            .entry(id.to_string())
            .or_insert_with(|| {
                let stored = self.shared.stored.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                Arc::new(Account::new(id.to_string(), stored.unwrap_or_default()))
            })
            .clone()
    }

    /// Reserves `amount` at every level of a budget's chain (`levels[0]` is the key's own budget,
    /// whose counters count the request); the reservation is released when dropped unless
    /// settled.
    pub fn reserve(&self, levels: &Arc<[Level]>, fail_open: bool, amount: u64) -> Result<Reservation, Refusal> {
        let Some(own) = levels.first() else { return Err(Refusal::Unavailable) };
        if !fail_open && !self.is_available() {
            return Err(Refusal::Unavailable);
        }
        let now = self.now();
        top_up(levels, amount, now);
        reserve_all(levels, amount, now)?;
        own.account.counters.in_flight.fetch_add(1, Relaxed);
        Ok(Reservation { ledger: self.shared.clone(), levels: levels.clone(), amount, open: true })
    }

    /// Writes what is pending and stops the writer (at shutdown).
    pub fn close(&self) {
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(handle), Some(wake)) = (handle, &self.shared.wake) {
            let _ = wake.send(true);
            let _ = handle.join();
        }
    }
}

/// Credit held for one request, at every level of its budget's chain.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<LedgerCore>,
    /// Never empty: [`Ledger::reserve`] refuses an empty chain.
    levels: Arc<[Level]>,
    amount: u64,
    open: bool,
}

impl std::fmt::Debug for LedgerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

impl Reservation {
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// The key's own budget's account.
    pub fn account(&self) -> &Arc<Account> {
        &self.levels[0].account
    }

    /// Holds `more` credit as well, at every level, for a stream that outgrew its reservation.
    pub fn extend(&mut self, more: u64) -> Result<(), Refusal> {
        let now = self.ledger.clock.unix_seconds();
        top_up(&self.levels, more, now);
        reserve_all(&self.levels, more, now)?;
        self.amount += more;
        Ok(())
    }

    /// Records the real cost at every level and frees the rest of the reservation; `tokens`
    /// count against the key's tokens-per-minute limit.
    pub fn settle(mut self, cost: u64, tokens: u64) {
        self.open = false;
        let now = self.ledger.clock.unix_seconds();
        for level in self.levels.iter() {
            level.account.settle(level.period, self.amount, cost, now);
        }
        if tokens > 0 {
            self.account().add_tokens(tokens, now);
        }
        // After the accounts are marked dirty: a commit that counts this settle also writes it.
        self.ledger.settled.fetch_add(1, SeqCst);
        self.account().counters.in_flight.fetch_sub(1, Relaxed);
        self.ledger.wake_writer();
    }
}

impl Drop for Reservation {
    /// A request that ends without an answer (the caller left, every attempt failed) frees its
    /// credit at once.
    fn drop(&mut self) {
        if self.open {
            for level in self.levels.iter() {
                level.account.release(self.amount);
            }
            self.account().counters.in_flight.fetch_sub(1, Relaxed);
        }
    }
}

/// How long the writer gathers settles before committing them together. Spend is durable at most
/// this plus one commit after it was settled; every settle in the window shares one commit (and
/// one fsync), which keeps the ledger's cost per request low at any request rate.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(9);

fn write_loop(journal: &mut Journal, shared: &std::sync::Weak<LedgerCore>, woken: &Receiver<bool>) {
    loop {
        let mut closing = woken.recv().unwrap_or(true);
        if !closing {
            std::thread::sleep(GROUP_COMMIT_WINDOW);
            while let Ok(close) = woken.try_recv() {
                closing |= close;
            }
        }
        let Some(shared) = shared.upgrade() else { return };
        // Read before the dirty flags: every settle counted here has set its account's flag.
        let settled = shared.settled.load(SeqCst);
        let dirty: Vec<(String, Spend)> = {
            let accounts = shared.accounts.lock().unwrap_or_else(|e| e.into_inner());
            accounts.values().filter(|a| a.dirty.swap(false, Relaxed)).map(|a| (a.id.clone(), *a.lock())).collect()
        };
        if dirty.is_empty() {
            // Every settle counted was written by an earlier commit.
            shared.durable.fetch_max(settled, SeqCst);
        } else {
            match journal.append(&dirty) {
                Ok(()) => {
                    shared.available.store(true, Relaxed);
                    shared.durable.fetch_max(settled, SeqCst);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the ledger; spend is kept in memory and retried");
                    shared.available.store(false, Relaxed);
                    let accounts = shared.accounts.lock().unwrap_or_else(|e| e.into_inner());
                    for (id, _) in &dirty {
                        if let Some(a) = accounts.get(id) {
                            a.dirty.store(true, Relaxed);
                        }
                    }
                    drop(accounts);
                    std::thread::sleep(Duration::from_millis(100));
                    shared.wake_writer();
                }
            }
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::period::week_start;
    use std::sync::atomic::AtomicU64;

    struct FakeClock(AtomicU64);

    impl Clock for FakeClock {
        fn unix_seconds(&self) -> u64 {
            self.0.load(Relaxed)
        }
    }

    // 2026-11-25 13:45:10 UTC, a Wednesday.
    const T: u64 = 1_795_614_310;
    const DAY: u64 = 86_400;

    /// A chain of one: the budget's own level.
    fn own(account: &Arc<Account>, limit: Option<u64>, period: Period) -> Arc<[Level]> {
        Arc::from([Level { account: account.clone(), limit, period, top_up: None }])
    }

    fn ledger_at(t: u64) -> (Ledger, Arc<FakeClock>) {
        let clock = Arc::new(FakeClock(AtomicU64::new(t)));
        (Ledger::in_memory(clock.clone()), clock)
    }

    #[test]
    fn reservations_never_let_spend_pass_the_limit() {
        let (ledger, _) = ledger_at(T);
        let account = ledger.account("ns/key");
        let first = ledger.reserve(&own(&account, Some(100), Period::Monthly), false, 60).unwrap();
        assert_eq!(
            ledger.reserve(&own(&account, Some(100), Period::Monthly), false, 50).unwrap_err(),
            Refusal::Insufficient { remaining: 40, level: 0 }
        );
        first.settle(30, 0);
        let second = ledger.reserve(&own(&account, Some(100), Period::Monthly), false, 50).unwrap();
        assert_eq!(account.counters.in_flight.load(Relaxed), 1);
        drop(second);
        assert_eq!(account.counters.in_flight.load(Relaxed), 0, "a dropped reservation is released");
        let spend = account.view(Period::Monthly, T);
        assert_eq!((spend.spent, spend.reserved, spend.total), (30, 0, 30));
    }

    #[test]
    fn extending_a_reservation_checks_the_limit() {
        let (ledger, _) = ledger_at(T);
        let account = ledger.account("ns/key");
        let mut r = ledger.reserve(&own(&account, Some(100), Period::Never), false, 40).unwrap();
        r.extend(40).unwrap();
        assert_eq!(r.extend(40), Err(Refusal::Insufficient { remaining: 20, level: 0 }));
        assert_eq!(r.amount(), 80);
        r.settle(90, 0);
        assert_eq!(account.view(Period::Never, T).spent, 90, "a stream may settle past its reservation");
    }

    #[test]
    fn periods_roll_over_at_utc_boundaries() {
        let (ledger, clock) = ledger_at(T);
        let account = ledger.account("ns/key");
        ledger.reserve(&own(&account, Some(1000), Period::Daily), false, 10).unwrap().settle(10, 0);
        assert_eq!(account.view(Period::Daily, T).spent, 10);
        // The next day: the daily spend starts over, the weekly and monthly windows go on.
        clock.0.store(T + DAY, Relaxed);
        let view = account.view(Period::Daily, T + DAY);
        assert_eq!((view.spent, view.day, view.week, view.month, view.total), (0, 0, 10, 10, 10));
        assert!(
            ledger.reserve(&own(&account, Some(1000), Period::Daily), false, 1000).is_ok(),
            "a new day's whole limit"
        );
    }

    #[test]
    fn weekly_periods_start_on_monday() {
        let (ledger, _) = ledger_at(T);
        let account = ledger.account("ns/key");
        ledger.reserve(&own(&account, None, Period::Weekly), false, 5).unwrap().settle(5, 0);
        // Sunday 23:59:59 is still this week; Monday 00:00:00 is the next.
        let monday = week_start(T) + 7 * DAY;
        assert_eq!(account.view(Period::Weekly, monday - 1).spent, 5);
        assert_eq!(account.view(Period::Weekly, monday).spent, 0);
    }

    #[test]
    fn settled_spend_survives_reopening_the_file() {
        let dir = std::env::temp_dir().join(format!("sideyard-ledger-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let clock: Arc<dyn Clock> = Arc::new(FakeClock(AtomicU64::new(T)));
        {
            let ledger = Ledger::open(&dir, clock.clone()).unwrap();
            let account = ledger.account("ns/key");
            ledger.reserve(&own(&account, Some(100), Period::Monthly), false, 50).unwrap().settle(42, 0);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while ledger.unsaved() > 0 {
                assert!(std::time::Instant::now() < deadline, "the settle never reached the disk");
                std::thread::yield_now();
            }
            let _pending = ledger.reserve(&own(&account, Some(100), Period::Monthly), false, 50).unwrap();
            ledger.close();
        }
        let ledger = Ledger::open(&dir, clock).unwrap();
        let spend = ledger.account("ns/key").view(Period::Monthly, T);
        assert_eq!((spend.spent, spend.reserved), (42, 0), "spend kept, the unsettled reservation gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rate_limits_count_requests_and_tokens_per_minute() {
        let (ledger, _) = ledger_at(T);
        let account = ledger.account("ns/key");
        let policy = RateLimitPolicy { requests_per_minute: Some(2), tokens_per_minute: Some(100) };
        let minute = T - T % 60;
        assert_eq!(account.admit_rate(policy, minute).unwrap(), Some(RateStatus { limit: 2, remaining: 1, reset: 60 }));
        assert!(account.admit_rate(policy, minute + 1).is_ok());
        assert_eq!(
            account.admit_rate(policy, minute + 50).unwrap_err(),
            RateStatus { limit: 2, remaining: 0, reset: 10 }
        );
        assert!(account.admit_rate(policy, minute + 60).is_ok(), "a new minute");
        account.add_tokens(100, minute + 61);
        assert_eq!(account.admit_rate(policy, minute + 62).unwrap_err().limit, 100, "tokens ran out");
    }

    #[test]
    fn a_request_holds_credit_at_every_level_and_the_refusal_says_which_ran_out() {
        let (ledger, clock) = ledger_at(T);
        let team = ledger.account("ns/team");
        let level = |account: &Arc<Account>, limit, period| Level {
            account: account.clone(),
            limit: Some(limit),
            period,
            top_up: None,
        };
        // Two keys of 100 a day under a team of 150 a month.
        let keys: Vec<Arc<[Level]>> = ["ns/a", "ns/b"]
            .iter()
            .map(|id| Arc::from([level(&ledger.account(id), 100, Period::Daily), level(&team, 150, Period::Monthly)]))
            .collect();
        ledger.reserve(&keys[0], false, 90).unwrap().settle(90, 0);
        // Key b has its 100, the team only 60 of them.
        assert_eq!(ledger.reserve(&keys[1], false, 70).unwrap_err(), Refusal::Insufficient { remaining: 60, level: 1 });
        assert_eq!(keys[1][0].account.view(Period::Daily, ledger.now()).reserved, 0, "nothing stays held below");
        let held = ledger.reserve(&keys[1], false, 60).unwrap();
        assert_eq!(team.view(Period::Monthly, ledger.now()).reserved, 60);
        drop(held);
        assert_eq!(team.view(Period::Monthly, ledger.now()).reserved, 0, "a dropped request frees every level");
        let mut held = ledger.reserve(&keys[1], false, 20).unwrap();
        assert_eq!(held.extend(50), Err(Refusal::Insufficient { remaining: 40, level: 1 }));
        held.settle(30, 0);
        assert_eq!(team.view(Period::Monthly, ledger.now()).spent, 120, "spend counts at every level");
        assert_eq!(keys[0][0].account.view(Period::Daily, ledger.now()).spent, 90);
        // A new day gives the keys their limits back; the team's month goes on.
        clock.0.store(T + DAY, Relaxed);
        assert_eq!(ledger.reserve(&keys[0], false, 40).unwrap_err(), Refusal::Insufficient { remaining: 30, level: 1 });
        assert!(ledger.reserve(&keys[0], false, 30).is_ok());
    }
}
