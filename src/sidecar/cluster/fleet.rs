//! Cluster mode's budgets: every budget is spent from a lease of the operator's ledger
//! ([`crate::budget::lease`]), kept topped up ahead of need by [`Fleet::keep`], so that the
//! request path calls the ledger only when a lease runs short, in state Low (a reservation per
//! request) and when the ledger is unreachable.
//!
//! What the sidecar used and has not had acknowledged is kept in `ledger-leases.json` in the
//! state directory (the pod's emptyDir), so a restarted container reports it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::ledger_client::{CallError, CallMetrics, LedgerClient};
use crate::budget::lease::{Book, Held, LeasedAccount, LocalHold, Miss, Usage, UsageKind, needs_renewal};
use crate::budget::protocol::{
    Allowance, BudgetFigures, Debt, HoldingsTaken, LeaseGrant, LeaseRequest, Mode, Refused, Report, ReserveRequest,
    Reserved, Settle,
};
use crate::budget::{BudgetCounters, RateStatus};
use crate::config::{Budget, LedgerEndpoint};
use crate::metrics::Counter;

const LEASE: usize = 0;
const REPORT: usize = 1;
const RESERVE: usize = 2;
const SETTLE: usize = 3;
const DEBT: usize = 4;
const HOLDINGS: usize = 5;

/// How often the keeper looks at every lease.
const KEEP_INTERVAL: Duration = Duration::from_millis(200);
/// Spend on a lease is reported at least this often, so the fleet's figures stay live.
const REPORT_INTERVAL_MS: u64 = 1_000;
/// Outside state Active, how often the ledger is asked whether the state changed.
const REFRESH_INTERVAL_MS: u64 = 2_000;
/// Without a lease (given back when idle), how often the fleet's figures are asked for.
const IDLE_REFRESH_MS: u64 = 5_000;
/// While the ledger is unreachable, how often the keeper tries it again.
const RETRY_INTERVAL_MS: u64 = 500;
/// How long a request that needs credit a new leader holds back waits for its takeover to end.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// What a lease asks for before any request has been seen: one unit of credit, a few requests.
const FLOOR: Allowance = Allowance { credit: 1_000_000, requests: 8, tokens: 4_096 };
const STATE_FILE: &str = "ledger-leases.json";

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A budget as this sidecar spends it in cluster mode. The same for the budget's life in the
/// process, across configurations.
pub struct FleetAccount {
    pub leased: LeasedAccount,
    /// The budget's current terms.
    budget: ArcSwap<Budget>,
    /// One lease call at a time per budget; requests that miss wait for it.
    renewing: tokio::sync::Mutex<()>,
    pub counters: BudgetCounters,
    /// Requests by how they were billed: from the lease, per request with the ledger, on debt.
    pub billed: [Counter; 3],
    /// Ledger calls made for requests waiting on them: top-ups and per-request reservations.
    pub waits: Counter,
    /// The last lease call gave the lease nothing more: the keeper does not ask again for more
    /// before [`REFRESH_INTERVAL_MS`], unless the lease expires or a new rate window starts.
    starved: AtomicBool,
    /// Requests waiting for a top-up of the rate allowance.
    rate_waiting: AtomicU64,
    last_report: AtomicU64,
    last_attempt: AtomicU64,
    /// Why the last call failed, for the 503 of a key that fails closed.
    last_error: Mutex<String>,
    /// The current configuration has this budget; otherwise its use is reported and it goes.
    in_config: AtomicBool,
}

pub const BILLED: [&str; 3] = ["lease", "per_request", "debt"];

impl FleetAccount {
    pub fn budget(&self) -> Arc<Budget> {
        self.budget.load_full()
    }
}

/// Lease events, for metrics.
#[derive(Default)]
pub struct FleetMetrics {
    pub calls: Arc<CallMetrics>,
    pub leases_granted: Counter,
    pub leases_renewed: Counter,
    pub leases_expired: Counter,
    /// Credit granted to this sidecar's leases, in micro-units.
    pub granted_credit: Counter,
    pub state_file_errors: Counter,
}

pub struct Fleet {
    client: ArcSwapOption<LedgerClient>,
    overrides: EndpointOverrides,
    token_file: PathBuf,
    accounts: Mutex<HashMap<String, Arc<FleetAccount>>>,
    /// Debt ids: the pod and this process's start.
    debt_prefix: String,
    state_file: PathBuf,
    saved: Mutex<String>,
    pub metrics: FleetMetrics,
    /// Held by the keeper's rounds and by [`Fleet::close`], which ends them.
    keeping: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

/// Flags that point the sidecar at a ledger.
#[derive(Clone, Debug, Default)]
pub struct FleetOptions {
    pub url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub token_file: PathBuf,
}

/// The flags' overrides of the ledger endpoint a configuration names, read once.
#[derive(Clone, Debug, Default)]
pub struct EndpointOverrides {
    url: Option<String>,
    ca: Option<String>,
}

impl EndpointOverrides {
    pub fn read(options: &FleetOptions) -> Result<Self, String> {
        let ca = match &options.ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --ledger-ca-file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        Ok(EndpointOverrides { url: options.url.clone(), ca })
    }

    /// The ledger to use with a configuration that names `configured`: `None` when neither it
    /// nor the flags give both a URL and a CA bundle.
    pub fn endpoint(&self, configured: Option<&LedgerEndpoint>) -> Option<LedgerEndpoint> {
        let url = self.url.clone().or_else(|| configured.map(|e| e.url.clone()))?;
        let ca_bundle = self.ca.clone().or_else(|| configured.map(|e| e.ca_bundle.clone()))?;
        Some(LedgerEndpoint { url, ca_bundle })
    }
}

impl Fleet {
    pub fn new(options: &FleetOptions, state_dir: &std::path::Path) -> Result<Fleet, String> {
        let pod = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "sidecar".into());
        let fleet = Fleet {
            client: ArcSwapOption::empty(),
            overrides: EndpointOverrides::read(options)?,
            token_file: options.token_file.clone(),
            accounts: Mutex::default(),
            debt_prefix: format!("{pod}-{}", now_ms()),
            state_file: state_dir.join(STATE_FILE),
            saved: Mutex::default(),
            metrics: FleetMetrics::default(),
            keeping: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
        };
        fleet.restore()?;
        Ok(fleet)
    }

    /// Whether a configuration is served in cluster mode: it names a ledger, or the flags do.
    pub fn wanted(config: &crate::config::Config, options: &FleetOptions) -> bool {
        config.ledger.is_some() || options.url.is_some()
    }

    /// Points the client at the configuration's ledger (or the flags'), keeping the connection
    /// when nothing changed.
    pub fn set_endpoint(&self, configured: Option<&LedgerEndpoint>) -> Result<(), String> {
        let Some(endpoint) = self.overrides.endpoint(configured) else {
            return Err(
                "the ledger's URL or CA bundle is missing: the configuration names none; set --ledger-url and --ledger-ca-file"
                    .into(),
            );
        };
        if self.client.load().as_ref().is_some_and(|c| c.endpoint == endpoint) {
            return Ok(());
        }
        let client = LedgerClient::new(endpoint, self.token_file.clone(), self.metrics.calls.clone())?;
        tracing::info!(url = %client.endpoint.url, "budget ledger client configured");
        self.client.store(Some(Arc::new(client)));
        Ok(())
    }

    /// The account of a budget, with its terms brought up to date.
    pub fn account(&self, budget: &Budget) -> Arc<FleetAccount> {
        let account = self.account_by_id(&budget.id());
        account.budget.store(Arc::new(budget.clone()));
        account.in_config.store(true, Relaxed);
        account
    }

    /// After a new configuration: budgets it no longer has stop leasing; what they used is
    /// reported, and then they are forgotten.
    pub fn retain(&self, budgets: &[Budget]) {
        let ids: std::collections::HashSet<String> = budgets.iter().map(Budget::id).collect();
        for (id, account) in self.accounts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            account.in_config.store(ids.contains(id), Relaxed);
        }
    }

    /// The account of budget `namespace/name`, the name the ledger is told too.
    fn account_by_id(&self, id: &str) -> Arc<FleetAccount> {
        let name = id.split_once('/').map_or(id, |(_, name)| name);
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        accounts
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(FleetAccount {
                    leased: LeasedAccount::new(id, Book::new(format!("{}-{name}", self.debt_prefix))),
                    budget: ArcSwap::from_pointee(Budget {
                        namespace: id.split('/').next().unwrap_or_default().to_string(),
                        name: name.to_string(),
                        key_hash: None,
                        parent: None,
                        top_up: None,
                        limit: None,
                        period: crate::api::Period::Never,
                        low_balance: None,
                        fail_open: false,
                        max_debt: None,
                        allowed_models: None,
                        rate_limit: None,
                        workload_selector: None,
                    }),
                    renewing: tokio::sync::Mutex::new(()),
                    counters: BudgetCounters::default(),
                    billed: Default::default(),
                    waits: Counter::default(),
                    rate_waiting: AtomicU64::new(0),
                    starved: AtomicBool::new(false),
                    last_report: AtomicU64::new(0),
                    last_attempt: AtomicU64::new(0),
                    last_error: Mutex::default(),
                    in_config: AtomicBool::new(false),
                })
            })
            .clone()
    }

    fn accounts(&self) -> Vec<Arc<FleetAccount>> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    fn client(&self) -> Result<Arc<LedgerClient>, CallError> {
        self.client.load_full().ok_or_else(|| CallError::Unreachable("no ledger is configured".into()))
    }

    /// Counts a request against the key's rate limits from the lease, without a network call;
    /// `Err` sends it to [`Fleet::admit_rate_slow`].
    pub fn admit_rate_local(&self, account: &FleetAccount, budget: &Budget) -> Result<Option<RateStatus>, Miss> {
        let Some(policy) = budget.rate_limit else { return Ok(None) };
        account.leased.admit_rate(policy, now_ms())
    }

    /// Tops the lease up once for a request whose allowance ran out: a caller over the key's rate
    /// limit gets its 429 after one ledger round trip (the ledger answers a call that grants
    /// nothing at once), and an admitted request waits for one top-up at most. `Err` carries the
    /// status for the 429, its reset the window's end. Boxed: the request's own future stays as
    /// small as standalone mode's.
    pub fn admit_rate_slow<'a>(
        &'a self,
        account: &'a FleetAccount,
        budget: &'a Budget,
    ) -> BoxFuture<'a, Result<Option<RateStatus>, RateStatus>> {
        Box::pin(async move {
            let Some(policy) = budget.rate_limit else { return Ok(None) };
            if account.in_config.load(Relaxed) {
                // Requests waiting together are asked for in one call, and granted first.
                account.rate_waiting.fetch_add(1, Relaxed);
                let called = self.renew(account, Need::Requests).await;
                let mut admitted = account.leased.admit_rate(policy, now_ms());
                if admitted.is_err() && !called {
                    // Another request's call answered meanwhile, not for this one: its own call.
                    self.renew(account, Need::Requests).await;
                    admitted = account.leased.admit_rate(policy, now_ms());
                }
                account.rate_waiting.fetch_sub(1, Relaxed);
                if let Ok(status) = admitted {
                    return Ok(status);
                }
            }
            let limit = policy.requests_per_minute.map(u64::from).or(policy.tokens_per_minute).unwrap_or(0);
            Err(RateStatus { limit, remaining: 0, reset: 60 - (now_ms() / 1000) % 60 })
        })
    }

    /// Holds `amount` of the budget's credit from the lease (or the debt), without a network
    /// call; `Err` sends the request to [`Fleet::reserve_slow`].
    pub fn reserve_local(&self, account: &Arc<FleetAccount>, budget: &Budget, amount: u64) -> Result<Hold, Miss> {
        let hold = account.leased.reserve(budget, amount, now_ms())?;
        account.billed[if hold.on_debt { 2 } else { 0 }].inc();
        Ok(Hold::Local { account: account.clone(), hold: Some(hold) })
    }

    /// A request the lease could not cover: a top-up, then a reservation with the ledger itself.
    /// Boxed, like [`Fleet::admit_rate_slow`].
    pub fn reserve_slow<'a>(
        &'a self,
        account: &'a Arc<FleetAccount>,
        budget: &'a Budget,
        amount: u64,
        miss: Miss,
    ) -> BoxFuture<'a, Result<Hold, Refusal>> {
        Box::pin(async move {
            if !account.in_config.load(Relaxed) {
                return Err(Refusal::Unavailable("this key's budget was just removed from the configuration".into()));
            }
            // A short lease asks for more; a key failing closed tries the ledger again when a
            // retry is due, so that it is served as soon as the ledger is back.
            let retry_due = now_ms().saturating_sub(account.last_attempt.load(Relaxed)) >= RETRY_INTERVAL_MS;
            let ask = match miss {
                Miss::Lease => true,
                Miss::Unavailable => retry_due,
                _ => false,
            };
            let miss = if ask {
                let mut asked = self.renew(account, Need::Credit(amount)).await;
                loop {
                    match self.reserve_local(account, budget, amount) {
                        Ok(hold) => return Ok(hold),
                        // Another call's answer came first and did not cover this request (the
                        // keeper's renewal near the limit): once more, for this request's need.
                        Err(Miss::Lease) if !asked => {
                            self.renew(account, Need::Credit(amount)).await;
                            asked = true;
                        }
                        Err(miss) => break miss,
                    }
                }
            } else {
                miss
            };
            match miss {
                // The lease could not cover it: the ledger may still, from what no lease holds.
                Miss::Lease | Miss::PerRequest => self.reserve_remotely(account, budget, amount).await,
                Miss::Exhausted { remaining, budget } => Err(Refusal::Insufficient { remaining, budget }),
                Miss::Unavailable => Err(Refusal::Unavailable(self.unavailable_reason(account))),
            }
        })
    }

    async fn reserve_remotely(
        &self,
        account: &Arc<FleetAccount>,
        budget: &Budget,
        amount: u64,
    ) -> Result<Hold, Refusal> {
        account.waits.inc();
        let request = ReserveRequest { budget: account.leased.name.clone(), amount };
        let mut answer = self.call::<Reserved>(RESERVE, &request).await;
        // Near the limit, what this sidecar's settled requests hold until their settles are
        // sent, or its lease too short for this request, may be all that is missing: sent and
        // given back now, and asked once more.
        if let Err(CallError::Refused(Refused::InsufficientCredits { .. })) = &answer
            && self.settle_now(account, amount).await
        {
            account.waits.inc();
            answer = self.call::<Reserved>(RESERVE, &request).await;
        }
        // A takeover ends once every pod has said what it holds, each within a keeper round of
        // hearing from the new leader: the request waits a little for it rather than fail.
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        let mut pause = Duration::from_millis(50);
        while let Err(CallError::Refused(Refused::TakingOver)) = &answer
            && tokio::time::Instant::now() + pause < deadline
        {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
            account.waits.inc();
            answer = self.call::<Reserved>(RESERVE, &request).await;
        }
        match answer {
            Ok(reserved) => {
                account.leased.reserved_remotely(&reserved.reservation_id, amount, reserved.expires_at, now_ms());
                account.leased.observed(reserved.budget);
                account.billed[1].inc();
                Ok(Hold::Remote { account: account.clone(), id: Some(reserved.reservation_id) })
            }
            Err(CallError::Refused(Refused::InsufficientCredits { remaining, budget })) => {
                Err(Refusal::Insufficient { remaining, budget })
            }
            Err(CallError::Refused(Refused::RateLimited { limit, reset })) => {
                Err(Refusal::RateLimited(RateStatus { limit, remaining: 0, reset }))
            }
            Err(CallError::Refused(Refused::TakingOver)) => Err(Refusal::Unavailable(format!(
                "the budget ledger has just taken over from another replica and counts this key's credit again once every pod has said what it holds, which has not happened within {}s; try again in a few seconds",
                TAKEOVER_WAIT.as_secs()
            ))),
            Err(e) => {
                self.note_failure(account, &e);
                // Unreachable now: the debt, if the budget fails open.
                match account.leased.reserve(budget, amount, now_ms()) {
                    Ok(hold) => {
                        account.billed[2].inc();
                        Ok(Hold::Local { account: account.clone(), hold: Some(hold) })
                    }
                    Err(_) => Err(Refusal::Unavailable(e.to_string())),
                }
            }
        }
    }

    fn unavailable_reason(&self, account: &FleetAccount) -> String {
        let (since, granted) = {
            let book = account.leased.lock();
            (book.unreachable_since.unwrap_or(0), book.grants > 0)
        };
        let secs = now_ms().saturating_sub(since) / 1000;
        let url = self.client.load().as_ref().map_or_else(|| "(none configured)".into(), |c| c.endpoint.url.clone());
        let error = account.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lease = if granted {
            "this key's lease has run out"
        } else {
            "the ledger has not yet granted this sidecar a lease for this key"
        };
        format!(
            "the budget ledger at {url} has been unusable for {secs}s ({error}) and {lease}; the key fails closed (onLedgerUnavailable: failClosed)"
        )
    }

    fn note_failure(&self, account: &FleetAccount, error: &CallError) {
        match error {
            CallError::Refused(_) => {}
            CallError::Unreachable(_) | CallError::Rejected { .. } => {
                *account.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error.to_string();
                let newly = account.leased.lock().unreachable_since.is_none();
                account.leased.unreachable(now_ms());
                if newly {
                    tracing::warn!(budget = %account.leased.name, error = %error, "the budget ledger cannot be reached");
                }
            }
        }
    }

    /// Asks the ledger for a new lease, or more on the one held, unless another caller's call
    /// answered meanwhile; whether this one called.
    async fn renew(&self, account: &FleetAccount, need: Need) -> bool {
        let grants = account.leased.lock().grants;
        let _one = account.renewing.lock().await;
        if account.leased.lock().grants != grants {
            return false;
        }
        account.waits.inc();
        self.lease_call(account, need).await;
        true
    }

    async fn lease_call(&self, account: &FleetAccount, need: Need) {
        let now = now_ms();
        account.last_attempt.store(now, Relaxed);
        let (lease_id, used, expired) = {
            let book = account.leased.lock();
            match &book.lease {
                Some(l) => (Some(l.usage.id.clone()), l.usage.used, now >= l.expires_at),
                None => (None, Allowance::default(), false),
            }
        };
        let want = match need {
            Need::Figures => Allowance::default(),
            _ => account.leased.want(FLOOR),
        };
        let need = match need {
            Need::Nothing | Need::Figures => Allowance::default(),
            Need::Credit(amount) => Allowance { credit: account.leased.need_for(amount), ..Allowance::default() },
            Need::Requests => Allowance { requests: account.rate_waiting.load(Relaxed), ..Allowance::default() },
        };
        let request =
            LeaseRequest { budget: account.leased.name.clone(), lease_id: lease_id.clone(), used, want, need };
        let answer = match self.client() {
            Ok(client) => client.call::<LeaseGrant>(LEASE, &request).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(grant) => {
                let was_unreachable = account.leased.lock().unreachable_since.is_some();
                if was_unreachable {
                    tracing::info!(budget = %account.leased.name, "the budget ledger is reachable again");
                    account.leased.reachable();
                }
                let fresh = lease_id.as_deref() != Some(grant.lease_id.as_str());
                // Only the lease renewed took `used` in; a lease the ledger no longer had is
                // reported on its own (and owed as a debt if it is gone for good).
                if let Some(id) = lease_id.as_deref().filter(|_| !fresh) {
                    account.leased.acked(id, used, Some(grant.budget.clone()));
                }
                if !grant.lease_id.is_empty() {
                    if fresh {
                        self.metrics.leases_granted.inc();
                    } else {
                        self.metrics.leases_renewed.inc();
                    }
                }
                if expired {
                    self.metrics.leases_expired.inc();
                }
                let held = account.leased.lock().lease.as_ref().filter(|_| !fresh).map(|l| (l.granted, l.usage.window));
                let before = held.map_or(0, |(granted, _)| granted.credit);
                self.metrics.granted_credit.add(grant.granted.credit.saturating_sub(before));
                account.starved.store(held == Some((grant.granted, grant.window)), Relaxed);
                account.leased.granted(&grant, now_ms());
            }
            Err(CallError::Refused(Refused::UnknownBudget)) => {
                // The ledger does not serve it (yet): as if unreachable, so the key's failure mode applies.
                self.note_failure(account, &CallError::Unreachable("the ledger does not know this budget".into()));
            }
            Err(e) => self.note_failure(account, &e),
        }
    }

    /// Keeps every lease topped up and every use reported, until [`Fleet::close`].
    pub async fn keep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(KEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _keeping = self.keeping.lock().await;
            if self.closed.load(Relaxed) {
                return;
            }
            // Every budget at once: a ledger that hangs delays each by one call timeout, not by
            // one per budget.
            let accounts = self.accounts();
            let fleet = &*self;
            let rounds = accounts.iter().map(|account| async move {
                let retired = !account.in_config.load(Relaxed);
                if retired {
                    account.leased.retire();
                }
                fleet.keep_account(account, retired).await;
                retired && account.leased.is_settled()
            });
            let done = futures::future::join_all(rounds).await;
            let gone: Vec<&Arc<FleetAccount>> = accounts.iter().zip(done).filter(|(_, d)| *d).map(|(a, _)| a).collect();
            if !gone.is_empty() {
                let mut registry = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
                registry.retain(|_, a| !gone.iter().any(|g| Arc::ptr_eq(a, g)));
            }
            self.save();
        }
    }

    /// One round for one budget: renew or report the lease, then report what is closing. At
    /// shutdown and for a budget no longer configured (`closing`) nothing is renewed and every
    /// report is tried.
    async fn keep_account(&self, account: &FleetAccount, closing: bool) {
        // A new leader is told what this sidecar holds before anything else.
        self.holdings_told(account).await;
        let now = now_ms();
        let budget = account.budget();
        let (mode, lease, unreachable, stale_report) = {
            let book = account.leased.lock();
            let stale = book.lease.as_ref().is_some_and(|l| {
                !l.usage.is_acked() && now.saturating_sub(account.last_report.load(Relaxed)) >= REPORT_INTERVAL_MS
            });
            (book.mode, book.lease.clone(), book.unreachable_since.is_some(), stale)
        };
        let since_attempt = now.saturating_sub(account.last_attempt.load(Relaxed));
        let want = account.leased.want(FLOOR);
        let mut give_back = false;
        let renew = if closing {
            false
        } else if unreachable {
            since_attempt >= RETRY_INTERVAL_MS
        } else {
            match (mode, &lease) {
                // No lease yet, or given back when idle: the figures only, kept fresh, and a lease
                // when a request needs one, so that a budget nobody spends here (a team's other
                // keys) holds none of its credit.
                (None, _) | (Some(Mode::Lease), None) => {
                    if mode.is_none() || since_attempt >= IDLE_REFRESH_MS {
                        let _one = account.renewing.lock().await;
                        self.lease_call(account, Need::Figures).await;
                    }
                    false
                }
                (Some(Mode::Lease), Some(held)) => {
                    let due = needs_renewal(held, &want, budget.limit.is_some(), budget.rate_limit, now);
                    let life = held.expires_at.saturating_sub(held.granted_at);
                    let ending = held.expires_at.saturating_sub(now) <= life / 3
                        || held.usage.window != crate::budget::lease::minute(now);
                    // Near its end, a lease nobody used since its last grant is not renewed: its
                    // credit goes back.
                    give_back = ending && account.leased.is_idle();
                    // Asked for more and got none: not again every round, unless the lease is
                    // near its end or its rate window is over.
                    let retry = ending || !account.starved.load(Relaxed) || since_attempt >= REFRESH_INTERVAL_MS;
                    due && retry && !give_back
                }
                (Some(_), _) => since_attempt >= REFRESH_INTERVAL_MS,
            }
        };
        if give_back {
            account.leased.retire_lease();
        }
        if renew {
            let _one = account.renewing.lock().await;
            self.lease_call(account, Need::Nothing).await;
        } else if stale_report && let Some(held) = &lease {
            self.report(account, held, false).await;
        }
        account.leased.give_back_unspendable(0);
        if !closing && !renew && account.leased.lock().unreachable_since.is_some() {
            return;
        }
        // A new leader heard from in this round (or one that asked) is told what this sidecar
        // holds before any report: a report of what it does not know would be refused, and what
        // its predecessor took in and never wrote is counted only through the holdings.
        if !self.holdings_told(account).await {
            return;
        }
        // Closed leases, settled reservations and debts: all at once, so that they share the
        // ledger's next status write.
        let closing = account.leased.lock().closing.clone();
        let reports = closing
            .iter()
            .filter(|u| u.needs_report())
            .map(|usage| async move { (usage, self.close_usage(account, usage).await) });
        for (usage, answer) in futures::future::join_all(reports).await {
            match answer {
                Ok(figures) => account.leased.closed_acked(usage, figures),
                Err(CallError::Refused(Refused::UnknownLease)) => account.leased.forgotten(&usage.id, now_ms()),
                Err(CallError::Refused(Refused::TakingOver)) => account.leased.taking_over(),
                Err(e) => self.note_failure(account, &e),
            }
        }
    }

    /// Reports now what holds credit for nothing (settled reservations, and a lease not spent
    /// from outside state Active) instead of at the keeper's next round; whether there was
    /// any and the ledger took it.
    async fn settle_now(&self, account: &FleetAccount, amount: u64) -> bool {
        account.leased.give_back_unspendable(amount);
        let pending: Vec<Usage> = account.leased.lock().closing.iter().filter(|u| u.needs_report()).cloned().collect();
        let mut settled = false;
        for usage in &pending {
            if let Ok(figures) = self.close_usage(account, usage).await {
                account.leased.closed_acked(usage, figures);
                settled = true;
            }
        }
        settled
    }

    /// Tells a leader that has just taken over (or asked) what this sidecar holds of the budget,
    /// if it is due; whether nothing is due now.
    async fn holdings_told(&self, account: &FleetAccount) -> bool {
        if account.leased.lock().holdings_due {
            self.tell_holdings(account).await;
        }
        !account.leased.lock().holdings_due
    }

    async fn tell_holdings(&self, account: &FleetAccount) {
        let holdings = account.leased.holdings();
        match self.call::<HoldingsTaken>(HOLDINGS, &holdings).await {
            Ok(taken) => account.leased.holdings_taken(&holdings, &taken.written, taken.budget, now_ms()),
            Err(e) => self.note_failure(account, &e),
        }
    }

    /// Reports a closed lease (done once nothing is in flight on it), a debt or a settled
    /// reservation.
    async fn close_usage(&self, account: &FleetAccount, usage: &Usage) -> Result<BudgetFigures, CallError> {
        let budget = account.leased.name.clone();
        match usage.kind {
            UsageKind::Lease => {
                let done = usage.holds == 0;
                let report = Report { budget, lease_id: usage.id.clone(), used: usage.used, done };
                self.call(REPORT, &report).await
            }
            UsageKind::Debt => self.call(DEBT, &Debt { budget, debt_id: usage.id.clone(), used: usage.used }).await,
            UsageKind::Reservation => {
                let settle = Settle {
                    budget,
                    reservation_id: usage.id.clone(),
                    cost: usage.used.credit,
                    tokens: usage.used.tokens,
                };
                self.call(SETTLE, &settle).await
            }
        }
    }

    async fn report(&self, account: &FleetAccount, held: &Held, done: bool) {
        account.last_report.store(now_ms(), Relaxed);
        let report = Report {
            budget: account.leased.name.clone(),
            lease_id: held.usage.id.clone(),
            used: held.usage.used,
            done,
        };
        match self.call::<BudgetFigures>(REPORT, &report).await {
            Ok(figures) => account.leased.acked(&held.usage.id, held.usage.used, Some(figures)),
            Err(CallError::Refused(Refused::UnknownLease)) => account.leased.forgotten(&held.usage.id, now_ms()),
            Err(CallError::Refused(Refused::TakingOver)) => account.leased.taking_over(),
            Err(e) => self.note_failure(account, &e),
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, call: usize, body: &impl Serialize) -> Result<T, CallError> {
        self.client()?.call(call, body).await
    }

    /// At shutdown, once requests have drained: reports every lease as done, then saves what
    /// could not be reported for the next start. Bounded by `within`.
    pub async fn close(&self, within: Duration) {
        let close = async {
            let _keeping = self.keeping.lock().await;
            self.closed.store(true, Relaxed);
            let accounts = self.accounts();
            futures::future::join_all(accounts.iter().map(|account| {
                account.leased.retire();
                self.keep_account(account, true)
            }))
            .await;
        };
        if tokio::time::timeout(within, close).await.is_err() {
            tracing::warn!(
                "the budget ledger did not take the final reports in time; they are saved for the next start"
            );
        }
        self.save();
    }

    /// Writes what is not acknowledged yet to the state file, when it changed. The file lives in
    /// the pod's emptyDir, which outlives the container: a write and a rename suffice.
    fn save(&self) {
        let state = SavedState {
            budgets: self
                .accounts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(|(id, account)| {
                    let book = account.leased.lock();
                    let usages: Vec<SavedUsage> = book
                        .lease
                        .iter()
                        .map(|l| &l.usage)
                        .chain(book.debt.iter())
                        .chain(book.closing.iter())
                        .filter(|u| !u.is_acked() || !u.is_written(book.term, book.durable))
                        .map(|u| SavedUsage {
                            id: u.id.clone(),
                            kind: kind_name(u.kind).into(),
                            used: u.used,
                            acked: u.acked,
                            acked_at: u.acked_at.clone(),
                        })
                        .collect();
                    (!usages.is_empty()).then(|| SavedBudget { id: id.clone(), usages })
                })
                .collect(),
        };
        let text = serde_json::to_string(&state).unwrap_or_default();
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if *saved == text {
            return;
        }
        let tmp = self.state_file.with_extension("json.tmp");
        let written = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &self.state_file));
        match written {
            Ok(()) => *saved = text,
            Err(e) => {
                self.metrics.state_file_errors.inc();
                tracing::warn!(file = %self.state_file.display(), error = %e, "cannot save the unreported budget use");
            }
        }
    }

    /// Reads what an earlier container left unreported; it is reported as done.
    fn restore(&self) -> Result<(), String> {
        let text = match std::fs::read_to_string(&self.state_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot read {}: {e}", self.state_file.display())),
        };
        let state: SavedState = match serde_json::from_str(&text) {
            Ok(state) => state,
            Err(e) => {
                // A damaged file loses what it held; it must not stop the sidecar.
                tracing::error!(file = %self.state_file.display(), error = %e, "the unreported budget use is unreadable and is skipped");
                return Ok(());
            }
        };
        let mut restored = 0;
        for budget in state.budgets {
            let account = self.account_by_id(&budget.id);
            let mut book = account.leased.lock();
            for usage in budget.usages {
                let Some(kind) = kind_of(&usage.kind) else { continue };
                restored += 1;
                book.closing.push(crate::budget::lease::Usage {
                    id: usage.id,
                    kind,
                    used: usage.used,
                    acked: usage.acked,
                    window: crate::budget::lease::minute(now_ms()),
                    holds: 0,
                    reserved: 0,
                    acked_at: usage.acked_at,
                    done_acked: false,
                });
            }
        }
        if restored > 0 {
            tracing::info!(file = %self.state_file.display(), usages = restored, "reporting the budget use an earlier container left unreported");
        }
        Ok(())
    }

    /// Credit spent as debt and not yet acknowledged, per budget id.
    pub fn debt(&self, account: &FleetAccount) -> u64 {
        let book = account.leased.lock();
        book.debt
            .iter()
            .chain(book.closing.iter())
            .filter(|u| u.kind == UsageKind::Debt)
            .map(|u| u.used.credit.saturating_sub(u.acked.credit))
            .fold(0, u64::saturating_add)
    }
}

fn kind_name(kind: UsageKind) -> &'static str {
    match kind {
        UsageKind::Lease => "lease",
        UsageKind::Debt => "debt",
        UsageKind::Reservation => "reservation",
    }
}

fn kind_of(name: &str) -> Option<UsageKind> {
    match name {
        "lease" => Some(UsageKind::Lease),
        "debt" => Some(UsageKind::Debt),
        "reservation" => Some(UsageKind::Reservation),
        _ => None,
    }
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    budgets: Vec<SavedBudget>,
}

#[derive(Serialize, Deserialize)]
struct SavedBudget {
    /// `namespace/name`.
    id: String,
    usages: Vec<SavedUsage>,
}

#[derive(Serialize, Deserialize)]
struct SavedUsage {
    id: String,
    kind: String,
    used: Allowance,
    acked: Allowance,
    /// Where the ledger took its last report in, while no write is known to hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    acked_at: Option<crate::budget::protocol::Acked>,
}

/// What requests waiting for a lease call need of it now.
#[derive(Clone, Copy)]
enum Need {
    Nothing,
    /// No lease at all: only the fleet's figures (the lease was given back when idle).
    Figures,
    /// Credit for a request of this amount.
    Credit(u64),
    /// One request of the window for each request waiting for one.
    Requests,
}

/// Why a request could not hold credit.
#[derive(Debug)]
pub enum Refusal {
    /// Not enough credit in the key's budget, or in the one above it named `budget`
    /// (`namespace/name`).
    Insufficient {
        remaining: u64,
        budget: Option<String>,
    },
    RateLimited(RateStatus),
    /// The ledger is unreachable and the key fails closed: why.
    Unavailable(String),
}

/// A request's hold on a budget in cluster mode; released (at cost 0) if dropped unsettled.
pub enum Hold {
    /// On the lease or the debt.
    Local { account: Arc<FleetAccount>, hold: Option<LocalHold> },
    /// A per-request reservation of the ledger.
    Remote { account: Arc<FleetAccount>, id: Option<String> },
}

impl Hold {
    pub fn account(&self) -> &Arc<FleetAccount> {
        match self {
            Hold::Local { account, .. } | Hold::Remote { account, .. } => account,
        }
    }

    /// Holds `more` for a stream that outgrew its reservation; a per-request reservation cannot
    /// grow without a call to the ledger, so it does not.
    pub fn extend(&mut self, more: u64) -> Result<(), ()> {
        match self {
            Hold::Local { account, hold: Some(hold) } => {
                account.leased.extend(&account.budget(), hold, more, now_ms()).map_err(|_| ())
            }
            _ => Err(()),
        }
    }

    pub fn settle(mut self, cost: u64, tokens: u64) {
        self.finish(cost, tokens);
    }

    fn finish(&mut self, cost: u64, tokens: u64) {
        match self {
            Hold::Local { account, hold } => {
                if let Some(hold) = hold.take() {
                    account.leased.settle(hold, cost, tokens, now_ms());
                }
            }
            Hold::Remote { account, id, .. } => {
                if let Some(id) = id.take() {
                    account.leased.settled_remotely(id, cost, tokens, now_ms());
                }
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.finish(0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sideyard-fleet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn unreported_use_is_saved_and_restored_for_reporting_and_a_damaged_file_is_skipped() {
        let dir = state_dir("saved");
        let options = FleetOptions::default();
        let fleet = Fleet::new(&options, &dir).unwrap();
        let account = fleet.account_by_id("team-a/bot");
        let grant = crate::budget::protocol::LeaseGrant {
            lease_id: "l-1".into(),
            mode: Mode::Lease,
            granted: Allowance { credit: 100, requests: 0, tokens: 0 },
            window: crate::budget::lease::minute(now_ms()),
            expires_at: now_ms() + 30_000,
            budget: BudgetFigures {
                spent: 0,
                remaining: None,
                outstanding: 0,
                period_start: 0,
                state: crate::api::BudgetState::Active,
                term: 0,
                version: 0,
                durable: 0,
                topped_up: 0,
                parents: Vec::new(),
            },
        };
        account.leased.granted(&grant, now_ms());
        let budget = Budget { limit: Some(1000), ..Budget::clone(&account.budget()) };
        let hold = account.leased.reserve(&budget, 40, now_ms()).unwrap();
        account.leased.settle(hold, 30, 0, now_ms());
        fleet.save();

        let restored = Fleet::new(&options, &dir).unwrap();
        let book = restored.account_by_id("team-a/bot").leased.lock().clone();
        assert!(book.lease.is_none(), "a restored lease is not spent from");
        assert_eq!(book.closing.len(), 1);
        assert_eq!((book.closing[0].id.as_str(), book.closing[0].used.credit), ("l-1", 30));

        std::fs::write(dir.join(STATE_FILE), b"{\"budgets\": [{\"id\": 7").unwrap();
        let damaged = Fleet::new(&options, &dir).unwrap();
        assert!(damaged.accounts().is_empty(), "a damaged file does not stop the sidecar");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
