//! The immutable [`Snapshot`] of a configuration that requests read without locks: every route,
//! target and budget prepared for serving.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};

use super::billing::{Meter, ServedBudget};
use super::cluster::fleet::Fleet;
use super::routing::health::Ticks;
use super::routing::plan::{Candidate, weighted_schedule};
use super::state::{RouteState, StateRegistry, TargetState};
use super::upstream::{Clients, ForwardClient, TargetClient};
use crate::api::{Serves, Strategy};
use crate::budget::{Ledger, Level};
use crate::config::{
    self, Budget, Config, Credential, FallbackPolicy, Format, HealthPolicy, MAX_BUDGET_CHAIN, Prices, Timeouts,
};
use crate::mock_provider::MockStats;
use crate::providers::anthropic::{ANTHROPIC_VERSION, DEFAULT_ANTHROPIC_VERSION, X_API_KEY};
use crate::providers::openai::json_string;

/// What keeps the budgets of a configuration.
pub enum Meters<'a> {
    /// The configuration has no budgets.
    None,
    Embedded(&'a Ledger),
    Fleet(&'a Arc<Fleet>),
}

/// One configuration, prepared for serving: everything a request needs is computed here once.
#[derive(Default)]
pub struct Snapshot {
    by_model: HashMap<Box<str>, Arc<ServedRoute>>,
    /// Routes in configuration order, for `GET /v1/models`.
    pub routes: Vec<Arc<ServedRoute>>,
    /// Budgets by the SHA-256 of their key.
    budgets: HashMap<[u8; 32], Arc<ServedBudget>>,
}

pub struct ServedRoute {
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
    pub targets: Vec<ServedTarget>,
    pub fallback: FallbackPolicy,
    pub health: HealthPolicy,
    pub hold_back: Duration,
    pub hedge_after: Option<Duration>,
    pub reserved_completion_tokens: u32,
    pub serves: Serves,
    /// Calls passed through without a model come here.
    pub passthrough_default: bool,
    /// Some budget covers this route, so callers need a key.
    pub budgeted: bool,
    pub state: Arc<RouteState>,
}

pub struct ServedTarget {
    pub name: String,
    /// `name` as the value of the `x-sideyard-target` header.
    pub name_header: HeaderValue,
    /// The operator's version of this configuration, for `x-sideyard-config-version`; none for
    /// standalone files.
    pub config_version: Option<HeaderValue>,
    pub provider: String,
    pub format: Format,
    /// The target's `headers` set `anthropic-version`: callers' versions are not forwarded.
    pub pins_anthropic_version: bool,
    /// The callers' `anthropic-beta` values forwarded; `None`: all.
    pub anthropic_betas: Option<Vec<String>>,
    /// The upstream serves the Responses API itself.
    pub native_responses: bool,
    /// The model name sent upstream.
    pub model: String,
    /// The upstream model as a JSON string literal, ready to splice into request bodies.
    pub model_json: String,
    pub upstream: TargetClient,
    /// For requests forwarded as they are.
    pub forwarding: Arc<ForwardClient>,
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
    /// Prepares `config` for serving. It was checked when it was compiled; a value that still does
    /// not fit (a target name that is not a header value) refuses the whole configuration.
    pub fn build(
        config: &Config,
        version: Option<u64>,
        states: &StateRegistry,
        clients: &Clients,
        meters: &Meters<'_>,
    ) -> Result<Snapshot, String> {
        let mut by_model = HashMap::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        // Which budget's `allowedModels` name which routes.
        let covers = |budget: &Budget, route: &config::Route| {
            budget
                .allowed_models
                .as_ref()
                .is_none_or(|allowed| route.model_names().any(|n| allowed.iter().any(|a| a == n)))
        };
        let version = version.map(HeaderValue::from);
        for route in &config.routes {
            let id = format!("{}/{}", route.namespace, route.name);
            let targets: Vec<ServedTarget> = route
                .targets
                .iter()
                .map(|t| ServedTarget::build(&id, t, version.as_ref(), states, clients))
                .collect::<Result<_, _>>()?;
            let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
            let rt = Arc::new(ServedRoute {
                state: states.route(&id),
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
                serves: route.serves,
                passthrough_default: route.passthrough_default,
                budgeted: config.budgets.iter().any(|b| covers(b, route)),
            });
            for name in route.model_names() {
                by_model.insert(name.into(), rt.clone());
            }
            routes.push(rt);
        }
        let mut budgets = HashMap::new();
        if !matches!(meters, Meters::None) {
            for budget in &config.budgets {
                // A budget without a key of its own is only a parent: no caller presents it.
                let Some(key_hash) = budget.key_hash else { continue };
                let allowed = budget.allowed_models.as_ref().map(|_| {
                    config
                        .routes
                        .iter()
                        .filter(|r| covers(budget, r))
                        .map(|r| format!("{}/{}", r.namespace, r.name))
                        .collect()
                });
                let parents = parents_of(budget, &config.budgets);
                let meter = match meters {
                    Meters::Embedded(ledger) => {
                        let levels = std::iter::once(budget)
                            .chain(&parents)
                            .map(|b| Level {
                                account: ledger.account(&b.id()),
                                limit: b.limit,
                                period: b.period,
                                top_up: b.top_up,
                            })
                            .collect();
                        Meter::Embedded { ledger: (*ledger).clone(), levels }
                    }
                    Meters::Fleet(fleet) => Meter::Fleet { fleet: Arc::clone(fleet), account: fleet.account(budget) },
                    Meters::None => continue,
                };
                let rt = ServedBudget::new(budget, parents, allowed, meter);
                budgets.insert(key_hash, Arc::new(rt));
            }
        }
        Ok(Snapshot { by_model, routes, budgets })
    }

    pub fn budget(&self, key_hash: &[u8; 32]) -> Option<&Arc<ServedBudget>> {
        self.budgets.get(key_hash)
    }

    /// Every budget, in no particular order.
    pub fn budgets(&self) -> impl Iterator<Item = &Arc<ServedBudget>> {
        self.budgets.values()
    }

    pub fn route(&self, model: &str) -> Option<&Arc<ServedRoute>> {
        self.by_model.get(model)
    }

    /// The route that calls passed through without a model go to.
    pub fn passthrough_default(&self) -> Option<&Arc<ServedRoute>> {
        self.routes.iter().find(|r| r.passthrough_default)
    }

    /// Every model name served, sorted, for error messages.
    pub fn known_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_model.keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }
}

impl ServedTarget {
    fn build(
        route_id: &str,
        t: &config::Target,
        config_version: Option<&HeaderValue>,
        states: &StateRegistry,
        clients: &Clients,
    ) -> Result<ServedTarget, String> {
        let format = t.upstream.format();
        let upstream = match &t.upstream {
            config::Upstream::Http { base_url, conversation, .. } => {
                TargetClient::http(clients, base_url, conversation.clone(), t.timeouts.connect)
            }
            config::Upstream::Mock { options, .. } => {
                TargetClient::mock(format, options.clone(), Arc::new(MockStats::default()))
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if format == Format::Anthropic {
            // Overridable in `headers`, for a target that needs a newer version.
            headers.insert(ANTHROPIC_VERSION, HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION));
        }
        for (name, value) in &t.headers {
            headers.insert(name, value.clone());
        }
        if let Some(credential) = &t.credential {
            match format {
                Format::OpenAi => headers.insert(header::AUTHORIZATION, credential.bearer().clone()),
                Format::Anthropic => headers.insert(X_API_KEY, credential.api_key().clone()),
            };
        }
        let name_header = HeaderValue::from_str(&t.name)
            .map_err(|_| format!("route {route_id}: target name {:?} is not a header value", t.name))?;
        Ok(ServedTarget {
            name: t.name.clone(),
            name_header,
            config_version: config_version.cloned(),
            format,
            pins_anthropic_version: t.headers.iter().any(|(name, _)| name == ANTHROPIC_VERSION),
            anthropic_betas: t.anthropic_betas.clone(),
            native_responses: t.native_responses,
            provider: t.provider.clone(),
            model: t.model.clone(),
            model_json: json_string(&t.model),
            upstream,
            forwarding: clients.forwarding(t.timeouts.connect),
            headers,
            credential: t.credential.clone(),
            timeouts: t.timeouts,
            weight: t.weight,
            prices: t.pricing,
            context_window: t.context_window,
            state: states.target(route_id, &t.name),
        })
    }

    /// What the planner needs to know about this target now.
    pub fn candidate(&self, now: Ticks) -> Candidate<'_> {
        let quantiles = |c: &super::routing::stats::Cached| -> Option<[u64; 4]> {
            Some([c.get(0)?, c.get(1)?, c.get(2)?, c.get(3)?])
        };
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

/// The budgets above `budget` in `budgets`, nearest first. Compiling checked every chain (no
/// cycle, at most `MAX_BUDGET_CHAIN` long, every parent there), so the walk is bounded anyway.
fn parents_of(budget: &Budget, budgets: &[Budget]) -> Vec<Budget> {
    let mut parents: Vec<Budget> = Vec::new();
    let mut at = budget;
    while let Some(name) = &at.parent
        && parents.len() < MAX_BUDGET_CHAIN
        && let Some(parent) = budgets.iter().find(|b| b.namespace == budget.namespace && &b.name == name)
    {
        parents.push(parent.clone());
        at = parent;
    }
    parents
}
