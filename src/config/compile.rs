//! ProviderRoutes, ApiKeyBudgets and Secrets -> [`Config`]. Pure: the environment and the file system are reached
//! only through a [`Resolver`], so tests feed maps.
//!
//! The checks here mirror the CRD schema (patterns, bounds, CEL rules) so that standalone mode
//! rejects what the API server would reject; the schema tests run the same bad specs through both.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Secret;

use sha2::{Digest, Sha256};

use super::values::{headers, sha256_hex, upstream};
use super::{
    Budget, Config, ConfigError, ConfigErrors, Credential, FallbackPolicy, HealthPolicy, MAX_BUDGET_CHAIN, ObjectRef,
    Origin, Prices, RateLimitPolicy, Reason, ReasonSet, Route, Target, Timeouts, TopUpPolicy, selector,
};
use crate::api::{self, ApiKeyBudget, LedgerUnavailable, ProviderRoute, SecretKeyRef, units};

/// Reaches the outside world for credentials that are not Secrets.
pub trait Resolver {
    /// The value of an environment variable of the sidecar process, or why there is none.
    fn env(&self, name: &str) -> Result<String, String>;
    /// The content of a file.
    fn file(&self, path: &str) -> std::io::Result<String>;
}

/// Environment variables and files from maps: what tests and tools feed compile with.
#[derive(Clone, Debug, Default)]
pub struct MapResolver {
    pub env: HashMap<String, String>,
    pub files: HashMap<String, String>,
}

impl MapResolver {
    pub fn new(env: &[(&str, &str)], files: &[(&str, &str)]) -> Self {
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        MapResolver { env: map(env), files: map(files) }
    }
}

impl Resolver for MapResolver {
    fn env(&self, name: &str) -> Result<String, String> {
        self.env.get(name).cloned().ok_or_else(|| env_not_set(name))
    }
    fn file(&self, path: &str) -> std::io::Result<String> {
        self.files.get(path).cloned().ok_or_else(|| std::io::ErrorKind::NotFound.into())
    }
}

/// The message for a credential variable that is not set, whoever resolves it.
pub fn env_not_set(name: &str) -> String {
    format!("environment variable {name:?} is not set")
}

/// An object and where it came from (absent for objects read from the API server).
#[derive(Clone, Debug)]
pub struct Document<T> {
    pub origin: Option<Origin>,
    pub object: T,
}

/// The objects a configuration is compiled from.
#[derive(Clone, Debug, Default)]
pub struct Documents {
    pub routes: Vec<Document<ProviderRoute>>,
    pub budgets: Vec<Document<ApiKeyBudget>>,
    pub secrets: Vec<Document<Secret>>,
    /// Configurations compiled by the operator (at most one may be loaded).
    pub compiled: Vec<Document<super::CompiledConfig>>,
}

/// The namespace of objects that do not name one, as `kubectl apply` would place them.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What compile made of each object: the accepted ones, compiled, and every object's problems.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    /// The accepted routes and budgets.
    pub config: Config,
    /// One per ProviderRoute and ApiKeyBudget document, in input order.
    pub outcomes: Vec<ObjectOutcome>,
}

/// How one object fared.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectOutcome {
    pub object: ObjectRef,
    /// Empty when the object is accepted.
    pub errors: Vec<ConfigError>,
    /// For a route: each target's credential, in target order.
    pub credentials: Vec<TargetCredential>,
}

impl ObjectOutcome {
    pub fn accepted(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Whether a target's credential could be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetCredential {
    pub target: String,
    pub state: CredentialState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialState {
    /// The target has no `credentials`.
    NotConfigured,
    Resolved,
    Unresolved {
        reason: Reason,
        message: String,
    },
}

/// Compiles each object on its own: an object with a problem is left out and its problems are
/// reported, while the others are compiled. Routes claim model names, and budgets keys, in input
/// order, so the caller decides who wins a conflict by ordering the documents.
pub fn analyse(docs: &Documents, resolver: &dyn Resolver) -> Analysis {
    let secrets = index_secrets(&docs.secrets);
    let mut analysis = Analysis::default();
    // Which route claimed each model name first, for conflicts across routes.
    let mut claimed: HashMap<String, ObjectRef> = HashMap::new();
    // Which route is the pass-through default of each namespace.
    let mut defaults: HashMap<String, ObjectRef> = HashMap::new();
    let mut seen: HashSet<ObjectRef> = HashSet::new();

    for doc in &docs.routes {
        let mut cx = Cx::new(&doc.origin, object_ref(&doc.object));
        let route = if seen.insert(cx.object.clone()) {
            compile_route(&doc.object, &secrets, resolver, &mut cx)
        } else {
            cx.error("metadata.name", "is defined more than once".into());
            None
        };
        if let Some(route) = &route {
            for (i, name) in route.model_names().enumerate() {
                if let Some(owner) = claimed.get(name) {
                    let path = if i == 0 { "spec.model".to_string() } else { format!("spec.aliases[{}]", i - 1) };
                    let message = format!("model {name:?} is already served by {owner}");
                    cx.fail(&path, Problem(Reason::DuplicateModel, message));
                }
            }
            if let Some(owner) = defaults.get(&route.namespace).filter(|_| route.passthrough_default) {
                let message =
                    format!("{owner} is already the namespace's pass-through default; there is one per namespace");
                cx.fail("spec.passthroughDefault", Problem(Reason::DuplicatePassthroughDefault, message));
            }
        }
        match route {
            Some(route) if cx.errors.is_empty() => {
                for name in route.model_names() {
                    claimed.insert(name.to_string(), cx.object.clone());
                }
                if route.passthrough_default {
                    defaults.insert(route.namespace.clone(), cx.object.clone());
                }
                analysis.config.routes.push(route);
            }
            _ => {}
        }
        analysis.outcomes.push(cx.finish());
    }

    let mut key_owners: HashMap<[u8; 32], ObjectRef> = HashMap::new();
    // Each document's budgets: one, or one per Secret its `keys` template matches.
    let mut compiled: Vec<(Cx<'_>, Vec<Budget>)> = Vec::new();
    for doc in &docs.budgets {
        let mut cx = Cx::new(&doc.origin, budget_ref(&doc.object));
        let budget = if seen.insert(cx.object.clone()) {
            compile_budget(&doc.object, &secrets, &mut cx)
        } else {
            cx.error("metadata.name", "is defined more than once".into());
            None
        };
        let budgets = match (budget, &doc.object.spec.keys) {
            (Some(template), Some(keys)) => issue_keys(&template, keys, &docs.secrets, &mut cx),
            (budget, _) => budget.into_iter().collect(),
        };
        for key in budgets.iter().filter_map(|b| b.key_hash) {
            if let Some(owner) = key_owners.get(&key) {
                let message = format!("is the same key as {owner}'s; each key has one budget");
                let path = if doc.object.spec.keys.is_some() { "spec.keys" } else { "spec.key" };
                cx.fail(path, Problem(Reason::DuplicateKey, message));
            }
        }
        let budgets = if cx.errors.is_empty() { budgets } else { Vec::new() };
        for key in budgets.iter().filter_map(|b| b.key_hash) {
            key_owners.insert(key, cx.object.clone());
        }
        compiled.push((cx, budgets));
    }
    let flat: Vec<Option<&Budget>> = compiled.iter().flat_map(|(_, budgets)| budgets.iter().map(Some)).collect();
    let mut problems = parent_problems(&flat).into_iter();
    let mut accepted = Vec::new();
    for (mut cx, budgets) in compiled {
        // A template's keys share its parent: the first problem stands for all of them.
        match problems.by_ref().take(budgets.len()).flatten().next() {
            Some(problem) => cx.fail("spec.parent", problem),
            None => accepted.extend(budgets),
        }
        analysis.outcomes.push(cx.finish());
    }
    analysis.config.budgets = accepted;
    analysis
}

/// The budgets a `keys` template issues: one per Secret of its namespace that the selector
/// matches, named `<template>:<secret>`, with the template's terms and the Secret's key, in the
/// Secrets' name order.
fn issue_keys(
    template: &Budget,
    keys: &api::KeyTemplate,
    secrets: &[Document<Secret>],
    cx: &mut Cx<'_>,
) -> Vec<Budget> {
    if cx.check("spec.keys.secretSelector", selector::validate(&keys.secret_selector)).is_none() {
        return Vec::new();
    }
    let mut matched: Vec<&Secret> = secrets
        .iter()
        .map(|d| &d.object)
        .filter(|s| s.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE) == template.namespace)
        .filter(|s| selector::matches(&keys.secret_selector, s.metadata.labels.as_ref().unwrap_or(&Default::default())))
        .collect();
    matched.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    if matched.len() > super::MAX_ISSUED_KEYS {
        let message = format!(
            "matches {} Secrets; a template issues at most {} keys: narrow the selector, or split the keys between templates",
            matched.len(),
            super::MAX_ISSUED_KEYS
        );
        cx.fail("spec.keys.secretSelector", Problem(Reason::TooManyKeys, message));
        return Vec::new();
    }
    let mut issued = Vec::new();
    for secret in matched {
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        let key = match secret_value(secret, &keys.secret_key) {
            None => Err(Problem(
                Reason::KeyNotFound,
                format!("secret {name:?} matches secretSelector but has no key {:?}", keys.secret_key),
            )),
            Some(value) => value.map_err(Problem::from).and_then(|key| {
                Credential::parse(&key).map_err(Problem::from)?;
                Ok(<[u8; 32]>::from(Sha256::digest(key.as_bytes())))
            }),
        };
        if let Some(key) = cx.check("spec.keys", key) {
            issued.push(Budget {
                name: super::issued_name(&template.name, name),
                key_hash: Some(key),
                ..template.clone()
            });
        }
    }
    issued
}

/// What is wrong with each budget's chain of parents, by index: a parent that is not there (or
/// not accepted: `None` in `budgets`), a cycle, or more than [`MAX_BUDGET_CHAIN`] budgets. Each
/// chain is walked from its own budget, so a budget above a broken link is not blamed for it.
fn parent_problems(budgets: &[Option<&Budget>]) -> Vec<Option<Problem>> {
    let index: HashMap<(&str, &str), usize> = budgets
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.map(|b| ((b.namespace.as_str(), b.name.as_str()), i)))
        .collect();
    let name = |i: usize| budgets[i].map_or("", |b| b.name.as_str());
    budgets
        .iter()
        .enumerate()
        .map(|(i, budget)| {
            let budget = (*budget)?;
            let mut chain = vec![i];
            let mut at = budget;
            while let Some(parent) = &at.parent {
                let Some(&p) = index.get(&(budget.namespace.as_str(), parent.as_str())) else {
                    let whose = if chain.len() == 1 { String::new() } else { format!(" (the parent of {:?})", at.name) };
                    let message = format!(
                        "names {parent:?}{whose}, which is not an accepted ApiKeyBudget of namespace {:?}: create it, fix it, or remove spec.parent",
                        budget.namespace
                    );
                    return Some(Problem(Reason::ParentNotFound, message));
                };
                if chain.contains(&p) {
                    let names: Vec<&str> = chain.iter().chain([&p]).map(|&c| name(c)).collect();
                    let message = format!("the chain of parents {} comes back to itself", names.join(" -> "));
                    return Some(Problem(Reason::ParentCycle, message));
                }
                chain.push(p);
                if chain.len() > MAX_BUDGET_CHAIN {
                    let names: Vec<&str> = chain.iter().map(|&c| name(c)).collect();
                    let message = format!(
                        "the chain of parents {} is longer than {MAX_BUDGET_CHAIN} budgets",
                        names.join(" -> ")
                    );
                    return Some(Problem(Reason::ParentTooDeep, message));
                }
                at = budgets[p]?;
            }
            None
        })
        .collect()
}

/// Compiles every object; any problem anywhere rejects the whole configuration, and every problem is
/// reported, not only the first. This is standalone mode, where the files are one unit of change.
pub fn compile(docs: &Documents, resolver: &dyn Resolver) -> Result<Config, ConfigErrors> {
    let analysis = analyse(docs, resolver);
    let mut errors: Vec<ConfigError> = analysis.outcomes.into_iter().flat_map(|o| o.errors).collect();
    if docs.routes.is_empty() {
        errors.insert(
            0,
            ConfigError::input("", "no ProviderRoute found: the configuration must define at least one route"),
        );
    }
    if errors.is_empty() { Ok(analysis.config) } else { Err(ConfigErrors(errors)) }
}

fn budget_ref(budget: &ApiKeyBudget) -> ObjectRef {
    ObjectRef {
        kind: "ApiKeyBudget".into(),
        namespace: budget.metadata.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        name: budget.metadata.name.clone().unwrap_or_default(),
    }
}

fn compile_budget(b: &ApiKeyBudget, secrets: &SecretIndex<'_>, cx: &mut Cx<'_>) -> Option<Budget> {
    let errors_before = cx.errors.len();
    let spec = &b.spec;
    if cx.object.name.is_empty() {
        cx.error("metadata.name", "is required".into());
    }
    // `Some(None)`: no key of its own, which is valid.
    let key_hash = match spec.key.as_ref().map(|k| (&k.secret_ref, &k.sha256)) {
        None => Some(None),
        Some((Some(r), None)) => {
            let ns = b.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
            cx.check(
                "spec.key.secretRef",
                secret_key(secrets, ns, r).and_then(|key| {
                    Credential::parse(&key).map_err(Problem::from)?;
                    Ok(<[u8; 32]>::from(Sha256::digest(key.as_bytes())))
                }),
            )
            .map(Some)
        }
        Some((None, Some(hex))) => cx.check("spec.key.sha256", sha256_hex(hex)).map(Some),
        Some(_) => {
            cx.error("spec.key", "exactly one of secretRef or sha256 must be set".into());
            None
        }
    };
    if spec.key.is_some() && spec.keys.is_some() {
        cx.error("spec", "set key or keys, not both".into());
    }
    if let Some(parent) = &spec.parent
        && (parent.is_empty() || parent == &cx.object.name)
    {
        cx.error("spec.parent", "must name another ApiKeyBudget of the namespace".into());
    }
    let limit = spec.limit.as_ref().and_then(|l| cx.check("spec.limit", units::parse_micros(l)));
    let low_balance =
        spec.low_balance_threshold.as_ref().and_then(|l| cx.check("spec.lowBalanceThreshold", units::parse_micros(l)));
    if spec.low_balance_threshold.is_some() && spec.limit.is_none() {
        cx.error("spec", "lowBalanceThreshold needs a limit".into());
    }
    if let Some(models) = &spec.allowed_models {
        if models.len() > 64 {
            cx.error("spec.allowedModels", format!("has {} items, at most 64 are allowed", models.len()));
        }
        for (i, m) in models.iter().enumerate() {
            cx.check(&format!("spec.allowedModels[{i}]"), model_name(m));
        }
    }
    let max_debt = spec.max_debt.as_ref().and_then(|d| cx.check("spec.maxDebt", units::parse_micros(d)));
    if spec.max_debt.is_some() && spec.on_ledger_unavailable != LedgerUnavailable::FailOpen {
        cx.error("spec.maxDebt", "maxDebt needs onLedgerUnavailable: failOpen".into());
    }
    if let Some(selector) = &spec.workload_selector {
        cx.check("spec.workloadSelector", selector::validate(selector));
    }
    let top_up = spec.top_up.as_ref().and_then(|t| {
        let threshold = cx.check("spec.topUp.threshold", units::parse_micros(&t.threshold));
        let amount = cx.check("spec.topUp.amount", units::parse_micros(&t.amount));
        let max_per_period = cx.check("spec.topUp.maxPerPeriod", units::parse_micros(&t.max_per_period));
        Some(TopUpPolicy { threshold: threshold?, amount: amount?, max_per_period: max_per_period? })
    });
    if spec.top_up.is_some() && (spec.parent.is_none() || spec.limit.is_none()) {
        cx.error("spec", "topUp needs a parent and a limit".into());
    }
    if let Some(t) = top_up {
        if t.amount == 0 {
            cx.error("spec.topUp.amount", "must be more than 0".into());
        }
        if t.max_per_period < t.amount {
            cx.error("spec.topUp.maxPerPeriod", "must be at least amount, or no top-up ever fits".into());
        }
    }
    let rate_limit = spec.rate_limit.as_ref().map(|r| RateLimitPolicy {
        requests_per_minute: r.requests_per_minute,
        tokens_per_minute: r.tokens_per_minute,
    });
    if let Some(r) = rate_limit {
        if r.requests_per_minute.is_none() && r.tokens_per_minute.is_none() {
            cx.error("spec.rateLimit", "set requestsPerMinute, tokensPerMinute or both".into());
        }
        if r.requests_per_minute == Some(0) || r.tokens_per_minute == Some(0) {
            cx.error("spec.rateLimit", "limits must be at least 1".into());
        }
    }
    if cx.errors.len() > errors_before {
        return None;
    }
    Some(Budget {
        namespace: cx.object.namespace.clone(),
        name: cx.object.name.clone(),
        key_hash: key_hash?,
        parent: spec.parent.clone(),
        limit,
        period: spec.period,
        low_balance,
        fail_open: spec.on_ledger_unavailable == LedgerUnavailable::FailOpen,
        max_debt,
        top_up,
        allowed_models: spec.allowed_models.clone(),
        rate_limit,
        workload_selector: spec.workload_selector.clone(),
    })
}

/// A problem and the condition reason it is reported under.
struct Problem(Reason, String);

impl From<String> for Problem {
    fn from(message: String) -> Self {
        Problem(Reason::Invalid, message)
    }
}

/// Collects the errors of one object.
struct Cx<'a> {
    doc_origin: &'a Option<Origin>,
    object: ObjectRef,
    errors: Vec<ConfigError>,
    credentials: Vec<TargetCredential>,
}

impl<'a> Cx<'a> {
    fn new(doc_origin: &'a Option<Origin>, object: ObjectRef) -> Self {
        Cx { doc_origin, object, errors: Vec::new(), credentials: Vec::new() }
    }

    fn error(&mut self, path: &str, message: String) {
        self.fail(path, Problem(Reason::Invalid, message));
    }

    fn fail(&mut self, path: &str, Problem(reason, message): Problem) {
        self.errors.push(ConfigError {
            origin: self.doc_origin.clone(),
            object: Some(self.object.clone()),
            path: path.to_string(),
            message,
            reason,
        });
    }

    /// Records the error of a parse and returns its value, so a route is checked in one pass.
    fn check<T>(&mut self, path: &str, result: Result<T, impl Into<Problem>>) -> Option<T> {
        result.map_err(|problem| self.fail(path, problem.into())).ok()
    }

    fn finish(self) -> ObjectOutcome {
        ObjectOutcome { object: self.object, errors: self.errors, credentials: self.credentials }
    }
}

fn object_ref(route: &ProviderRoute) -> ObjectRef {
    ObjectRef {
        kind: "ProviderRoute".into(),
        namespace: route.metadata.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        name: route.metadata.name.clone().unwrap_or_default(),
    }
}

type SecretIndex<'a> = HashMap<(&'a str, &'a str), &'a Secret>;

fn index_secrets(secrets: &[Document<Secret>]) -> SecretIndex<'_> {
    secrets
        .iter()
        .filter_map(|d| {
            let ns = d.object.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
            Some(((ns, d.object.metadata.name.as_deref()?), &d.object))
        })
        .collect()
}

fn compile_route(
    pr: &ProviderRoute,
    secrets: &SecretIndex<'_>,
    resolver: &dyn Resolver,
    cx: &mut Cx<'_>,
) -> Option<Route> {
    let errors_before = cx.errors.len();
    let spec = &pr.spec;
    if cx.object.name.is_empty() {
        cx.error("metadata.name", "is required".into());
    }
    cx.check("spec.model", model_name(&spec.model));
    if spec.aliases.len() > 32 {
        cx.error("spec.aliases", format!("has {} items, at most 32 are allowed", spec.aliases.len()));
    }
    let mut names: HashSet<&str> = HashSet::from([spec.model.as_str()]);
    for (i, alias) in spec.aliases.iter().enumerate() {
        let path = format!("spec.aliases[{i}]");
        if cx.check(&path, model_name(alias)).is_some() && !names.insert(alias) {
            cx.error(&path, format!("{alias:?} repeats the route's model or another alias"));
        }
    }

    if spec.targets.is_empty() || spec.targets.len() > 16 {
        cx.error("spec.targets", format!("has {} items, 1 to 16 are required", spec.targets.len()));
    }
    let mut target_names = HashSet::new();
    let mut targets = Vec::with_capacity(spec.targets.len());
    for (i, t) in spec.targets.iter().enumerate() {
        if !target_names.insert(t.name.as_str()) {
            cx.error(&format!("spec.targets[{i}].name"), format!("target name {:?} is used twice", t.name));
        }
        if let Some(target) = compile_target(t, &format!("spec.targets[{i}]"), pr, secrets, resolver, cx) {
            targets.push(target);
        }
    }

    let fallback = &spec.fallback;
    let max_attempts = cx.check("spec.fallback.maxAttempts", in_range(fallback.max_attempts, 1, 16));
    let consecutive_failures =
        cx.check("spec.health.consecutiveFailures", in_range(spec.health.consecutive_failures, 1, 100));
    let base_ejection = cx.check("spec.health.baseEjection", units::parse_duration(&spec.health.base_ejection));
    let max_ejection = cx.check("spec.health.maxEjection", units::parse_duration(&spec.health.max_ejection));
    if let (Some(base), Some(max)) = (base_ejection, max_ejection)
        && base > max
    {
        cx.error("spec.health", "baseEjection must not exceed maxEjection".into());
    }

    cx.check("spec.reservedCompletionTokens", in_range(spec.reserved_completion_tokens, 1, 10_000_000));
    let hold_back = cx.check("spec.holdBack", units::parse_duration(&spec.hold_back));
    let hedge_after = match &spec.hedge {
        None => Some(None),
        Some(h) => cx.check("spec.hedge.after", units::parse_duration(&h.after)).map(Some),
    };
    if let (Some(hold_back), Some(Some(after))) = (hold_back, hedge_after)
        && after >= hold_back
    {
        let message = "must be shorter than holdBack: a stream is committed to its first target when hold-back ends, so a later hedge would never start";
        cx.error("spec.hedge.after", message.into());
    }
    if let Some(selector) = &spec.workload_selector {
        cx.check("spec.workloadSelector", selector::validate(selector));
    }

    if cx.errors.len() > errors_before {
        return None;
    }
    Some(Route {
        namespace: cx.object.namespace.clone(),
        name: cx.object.name.clone(),
        model: spec.model.clone(),
        aliases: spec.aliases.clone(),
        strategy: spec.strategy,
        targets,
        fallback: FallbackPolicy {
            when: fallback.when.iter().copied().collect::<ReasonSet>(),
            max_attempts: max_attempts?,
        },
        health: HealthPolicy {
            consecutive_failures: consecutive_failures?,
            base_ejection: base_ejection?,
            max_ejection: max_ejection?,
        },
        hold_back: hold_back?,
        hedge_after: hedge_after?,
        reserved_completion_tokens: spec.reserved_completion_tokens,
        workload_selector: spec.workload_selector.clone(),
        serves: spec.serves,
        passthrough_default: spec.passthrough_default,
    })
}

fn compile_target(
    t: &api::Target,
    path: &str,
    pr: &ProviderRoute,
    secrets: &SecretIndex<'_>,
    resolver: &dyn Resolver,
    cx: &mut Cx<'_>,
) -> Option<Target> {
    let errors_before = cx.errors.len();
    let at = |field: &str| format!("{path}.{field}");
    if t.native_responses == Some(true) && t.api == api::ProviderApi::Anthropic {
        cx.error(
            &at("nativeResponses"),
            "is for OpenAI-compatible targets: Anthropic's API has no Responses endpoint".into(),
        );
    }
    if pr.spec.serves == api::Serves::Embeddings && t.api == api::ProviderApi::Anthropic {
        cx.error(
            &at("api"),
            "an embeddings route's targets must speak the OpenAI API: Anthropic's has no embeddings".into(),
        );
    }

    cx.check(&at("name"), dns_label(&t.name));
    if let Some(provider) = &t.provider {
        cx.check(&at("provider"), provider_label(provider));
    }
    let upstream = cx.check(&at("baseUrl"), upstream(t.api, t.base_url.as_deref()));
    if let Some(model) = &t.model {
        cx.check(&at("model"), model_name(model));
    }
    let (credential, state) = match t.credentials.as_ref().map(|c| credential(c, pr, secrets, resolver)) {
        None => (None, CredentialState::NotConfigured),
        Some(Ok(c)) => (Some(c), CredentialState::Resolved),
        Some(Err(Problem(reason, message))) => {
            cx.fail(&at("credentials"), Problem(reason, message.clone()));
            (None, CredentialState::Unresolved { reason, message })
        }
    };
    cx.credentials.push(TargetCredential { target: t.name.clone(), state });
    let headers = cx.check(&at("headers"), headers(&t.headers, credential.is_some()));
    for (k, beta) in t.anthropic_betas.iter().flatten().enumerate() {
        if beta.is_empty() || !beta.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            cx.error(&at(&format!("anthropicBetas[{k}]")), format!("{beta:?} is not a beta name ([A-Za-z0-9._-])"));
        }
    }
    cx.check(&at("weight"), in_range(t.weight, 1, 1000));
    let price = |cx: &mut Cx<'_>, field: &str, value: &Option<String>| match value {
        None => Some(0),
        Some(v) => cx.check(&at(&format!("pricing.{field}")), units::parse_micros(v)),
    };
    let prompt = price(cx, "prompt", &t.pricing.prompt);
    let completion = price(cx, "completion", &t.pricing.completion);
    let cached_prompt = match &t.pricing.cached_prompt {
        None => prompt,
        some => price(cx, "cachedPrompt", some),
    };
    let cache_write = match &t.pricing.cache_write {
        None => prompt,
        some => price(cx, "cacheWrite", some),
    };
    let request = price(cx, "request", &t.pricing.request);
    if t.context_window == Some(0) {
        cx.error(&at("contextWindow"), "must be at least 1".into());
    }
    let connect = cx.check(&at("timeouts.connect"), units::parse_duration(&t.timeouts.connect));
    let first_byte = cx.check(&at("timeouts.firstByte"), units::parse_duration(&t.timeouts.first_byte));
    let total = cx.check(&at("timeouts.total"), units::parse_duration(&t.timeouts.total));
    if let (Some(connect), Some(first_byte), Some(total)) = (connect, first_byte, total) {
        if connect > total {
            cx.error(&at("timeouts"), "connect must not exceed total".into());
        }
        if first_byte > total {
            cx.error(&at("timeouts"), "firstByte must not exceed total".into());
        }
    }

    if cx.errors.len() > errors_before {
        return None;
    }
    Some(Target {
        name: t.name.clone(),
        provider: t.provider.clone().unwrap_or_else(|| t.name.clone()),
        upstream: upstream?,
        model: t.model.clone().unwrap_or_else(|| pr.spec.model.clone()),
        credential,
        headers: headers?,
        anthropic_betas: t.anthropic_betas.clone(),
        native_responses: t.native_responses.unwrap_or_else(|| is_openai(t.api, t.base_url.as_deref())),
        weight: t.weight,
        pricing: Prices {
            prompt: prompt?,
            completion: completion?,
            cached_prompt: cached_prompt?,
            cache_write: cache_write?,
            request: request?,
        },
        context_window: t.context_window,
        timeouts: Timeouts { connect: connect?, first_byte: first_byte?, total: total? },
    })
}

fn in_range(value: u32, min: u32, max: u32) -> Result<u32, String> {
    if (min..=max).contains(&value) { Ok(value) } else { Err(format!("{value} is out of range {min} to {max}")) }
}

/// `^\S+$`, at most 253 characters.
fn model_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 || s.chars().any(char::is_whitespace) {
        return Err(format!("{s:?} is not a model name: 1 to 253 characters without whitespace"));
    }
    Ok(())
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 63 characters.
fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

/// `^[A-Za-z0-9][A-Za-z0-9._-]*$`, at most 63 characters.
fn provider_label(s: &str) -> Result<(), String> {
    let ok = s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} must be 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"))
    }
}

fn credential(
    c: &api::Credentials,
    pr: &ProviderRoute,
    secrets: &SecretIndex<'_>,
    resolver: &dyn Resolver,
) -> Result<Credential, Problem> {
    let value = match (&c.secret_ref, &c.env, &c.file) {
        (Some(r), None, None) => secret_key(secrets, pr.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), r)?,
        (None, Some(var), None) => resolver.env(var).map_err(Problem::from)?,
        (None, None, Some(file)) => resolver.file(file).map_err(|e| format!("cannot read file {file:?}: {e}"))?,
        _ => return Err("exactly one of secretRef, env or file must be set".to_string().into()),
    };
    Ok(Credential::parse(&value)?)
}

/// The value a `secretRef` points to, in namespace `ns`, without the trailing newline that `echo`
/// leaves in files and Secrets.
fn secret_key(secrets: &SecretIndex<'_>, ns: &str, r: &SecretKeyRef) -> Result<String, Problem> {
    let secret = secrets
        .get(&(ns, r.name.as_str()))
        .ok_or_else(|| Problem(Reason::SecretNotFound, format!("secret {:?} not found", r.name)))?;
    let value = secret_value(secret, &r.key)
        .ok_or_else(|| Problem(Reason::KeyNotFound, format!("secret {:?} has no key {:?}", r.name, r.key)))??;
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(format!("secret {:?} key {:?} is empty", r.name, r.key).into());
    }
    Ok(value.to_string())
}

/// The value of `key` in a Secret's `data` (base64, already decoded) or `stringData`.
fn secret_value(secret: &Secret, key: &str) -> Option<Result<String, String>> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(String::from_utf8(bytes.0.clone()).map_err(|_| format!("secret key {key:?} is not UTF-8")));
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).map(|v| Ok(v.clone()))
}

/// OpenAI's own API, which serves the Responses API.
fn is_openai(api: api::ProviderApi, base_url: Option<&str>) -> bool {
    api == api::ProviderApi::Openai
        && base_url.and_then(|u| u.parse::<http::Uri>().ok()).is_some_and(|u| u.host() == Some("api.openai.com"))
}
