//! The sidecar's state: the shared parts that live for the whole process, and the immutable
//! [`Snapshot`] of a configuration that requests read without locks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue, Uri, header};

use super::billing::BudgetRt;
use super::health::Ticks;
use super::metrics::{RouteState, SidecarMetrics, TargetState};
use super::plan::{Candidate, weighted_schedule};
use super::upstream::{Clients, Upstream};
use crate::api::Strategy;
use crate::budget::{Ledger, SystemClock};
use crate::config::{self, Budget, Config, Credential, FallbackPolicy, HealthPolicy, Prices, Timeouts};
use crate::mock_provider::MockStats;
use crate::providers::openai::json_string;

/// Limits on bodies the sidecar holds in memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
}

/// What lives for the whole process.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: SidecarMetrics,
    pub clients: Clients,
    pub limits: Limits,
    /// Refuse requests without a known key, even on routes without budgets.
    pub require_key: bool,
    /// The budget ledger, opened in `state_dir` when the first budget appears.
    ledger: OnceLock<Ledger>,
    state_dir: PathBuf,
    /// Set on SIGTERM: `/readyz` fails so no new traffic is sent while in-flight requests finish.
    pub draining: AtomicBool,
}

impl Shared {
    pub fn new(
        config: &Config,
        limits: Limits,
        clients: Clients,
        require_key: bool,
        state_dir: PathBuf,
    ) -> Result<Self, String> {
        let shared = Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            metrics: SidecarMetrics::default(),
            clients,
            limits,
            require_key,
            ledger: OnceLock::new(),
            state_dir,
            draining: AtomicBool::new(false),
        };
        shared.apply(config)?;
        shared.metrics.last_reload_ok.set(1);
        Ok(shared)
    }

    /// Swaps in a new configuration; requests in flight finish on the one they started with.
    /// Fails, changing nothing, if the configuration has budgets and the ledger cannot be opened.
    pub fn apply(&self, config: &Config) -> Result<(), String> {
        let ledger = if config.budgets.is_empty() { self.ledger.get() } else { Some(self.open_ledger()?) };
        let snapshot = Snapshot::build(config, &self.metrics, &self.clients, ledger);
        self.snapshot.store(Arc::new(snapshot));
        self.metrics.routes_loaded.set(config.routes.len() as u64);
        Ok(())
    }

    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.get()
    }

    fn open_ledger(&self) -> Result<&Ledger, String> {
        if let Some(ledger) = self.ledger.get() {
            return Ok(ledger);
        }
        let ledger = Ledger::open(&self.state_dir, Arc::new(SystemClock))?;
        tracing::info!(state_dir = %self.state_dir.display(), "budget ledger opened");
        Ok(self.ledger.get_or_init(|| ledger))
    }
}

/// One configuration, prepared for serving: everything a request needs is computed here once.
#[derive(Default)]
pub struct Snapshot {
    by_model: HashMap<Box<str>, Arc<RouteRt>>,
    /// Routes in configuration order, for `GET /v1/models`.
    pub routes: Vec<Arc<RouteRt>>,
    /// Budgets by the SHA-256 of their key.
    budgets: HashMap<[u8; 32], Arc<BudgetRt>>,
}

pub struct RouteRt {
    /// `namespace/name`, as in metrics.
    pub id: String,
    pub model: String,
    pub aliases: Vec<String>,
    /// `model` as a JSON string literal, for renaming answers served through `models` fallback.
    pub model_json: String,
    pub strategy: Strategy,
    /// The weighted strategy's sequence of first targets.
    pub schedule: Vec<u8>,
    /// Requests so far, for the weighted sequence and for exploration.
    pub ticks: AtomicU64,
    pub targets: Vec<TargetRt>,
    pub fallback: FallbackPolicy,
    pub health: HealthPolicy,
    pub hold_back: Duration,
    pub hedge_after: Option<Duration>,
    pub reserved_completion_tokens: u32,
    /// Some budget covers this route, so callers need a key.
    pub budgeted: bool,
    pub state: Arc<RouteState>,
}

pub struct TargetRt {
    pub name: String,
    /// `name` as the value of the `x-switchyard-target` header.
    pub name_header: HeaderValue,
    pub provider: String,
    /// The upstream model as a JSON string literal, ready to splice into request bodies.
    pub model_json: String,
    pub upstream: Upstream,
    /// Content type, credentials and static headers of every request to this target.
    pub headers: HeaderMap,
    pub credential: Option<Credential>,
    pub timeouts: Timeouts,
    pub weight: u32,
    pub prices: Prices,
    pub context_window: Option<u32>,
    /// Counters, health and recent performance, kept across reloads.
    pub state: Arc<TargetState>,
}

impl Snapshot {
    pub fn build(config: &Config, metrics: &SidecarMetrics, clients: &Clients, ledger: Option<&Ledger>) -> Snapshot {
        let mut by_model = HashMap::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        // Which budget's `allowedModels` name which routes.
        let covers = |budget: &Budget, route: &config::Route| {
            budget
                .allowed_models
                .as_ref()
                .is_none_or(|allowed| route.model_names().any(|n| allowed.iter().any(|a| a == n)))
        };
        for route in &config.routes {
            let id = format!("{}/{}", route.namespace, route.name);
            let targets: Vec<TargetRt> =
                route.targets.iter().map(|t| TargetRt::build(&id, t, metrics, clients)).collect();
            let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
            let rt = Arc::new(RouteRt {
                state: metrics.route(&id),
                id,
                model: route.model.clone(),
                aliases: route.aliases.clone(),
                model_json: json_string(&route.model),
                strategy: route.strategy,
                schedule: weighted_schedule(&weights),
                ticks: AtomicU64::new(0),
                targets,
                fallback: route.fallback,
                health: route.health,
                hold_back: route.hold_back,
                hedge_after: route.hedge_after,
                reserved_completion_tokens: route.reserved_completion_tokens,
                budgeted: config.budgets.iter().any(|b| covers(b, route)),
            });
            for name in route.model_names() {
                by_model.insert(name.into(), rt.clone());
            }
            routes.push(rt);
        }
        let mut budgets = HashMap::new();
        if let Some(ledger) = ledger {
            for budget in &config.budgets {
                let allowed = budget.allowed_models.as_ref().map(|_| {
                    config
                        .routes
                        .iter()
                        .filter(|r| covers(budget, r))
                        .map(|r| format!("{}/{}", r.namespace, r.name))
                        .collect()
                });
                let rt = BudgetRt::new(budget, allowed, ledger.account(&budget.id()));
                budgets.insert(budget.key_hash, Arc::new(rt));
            }
        }
        Snapshot { by_model, routes, budgets }
    }

    pub fn budget(&self, key_hash: &[u8; 32]) -> Option<&Arc<BudgetRt>> {
        self.budgets.get(key_hash)
    }

    /// Every budget, in no particular order.
    pub fn budgets(&self) -> impl Iterator<Item = &Arc<BudgetRt>> {
        self.budgets.values()
    }

    pub fn route(&self, model: &str) -> Option<&Arc<RouteRt>> {
        self.by_model.get(model)
    }

    /// Every model name served, sorted, for error messages.
    pub fn known_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_model.keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }
}

impl TargetRt {
    fn build(route_id: &str, t: &config::Target, metrics: &SidecarMetrics, clients: &Clients) -> TargetRt {
        let upstream = match &t.upstream {
            config::Upstream::OpenAi { base_url } => Upstream::http(
                clients,
                // compile() checked that the base URL parses, so appending a path keeps it valid.
                format!("{base_url}/chat/completions").parse().unwrap_or_else(|_| Uri::from_static("/")),
                t.timeouts.connect,
            ),
            config::Upstream::Mock { options, .. } => {
                Upstream::Mock { options: options.clone(), stats: Arc::new(MockStats::default()) }
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // compile() validated every name and value below.
        for (name, value) in &t.headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str()))
            {
                headers.insert(name, value);
            }
        }
        if let Some(credential) = &t.credential
            && let Ok(mut value) = HeaderValue::try_from(format!("Bearer {}", credential.expose()))
        {
            // Keeps the value out of HTTP/2 header compression tables and debug output.
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        TargetRt {
            name: t.name.clone(),
            // Target names are DNS labels, always valid header values.
            name_header: HeaderValue::try_from(t.name.as_str()).unwrap_or(HeaderValue::from_static("invalid")),
            provider: t.provider.clone(),
            model_json: json_string(&t.model),
            upstream,
            headers,
            credential: t.credential.clone(),
            timeouts: t.timeouts,
            weight: t.weight,
            prices: t.pricing,
            context_window: t.context_window,
            state: metrics.target(route_id, &t.name),
        }
    }

    /// What the planner needs to know about this target now.
    pub fn candidate(&self, now: Ticks) -> Candidate<'_> {
        let quantiles =
            |c: &super::stats::Cached| -> Option<[u64; 4]> { Some([c.get(0)?, c.get(1)?, c.get(2)?, c.get(3)?]) };
        let stats = &self.state.stats;
        Candidate {
            name: &self.name,
            provider: &self.provider,
            weight: self.weight,
            prices: self.prices,
            context_window: self.context_window,
            admission: self.state.health.admission(now),
            ttft: quantiles(&stats.ttft_cached),
            throughput: quantiles(&stats.throughput_cached),
        }
    }
}
