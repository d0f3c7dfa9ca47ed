//! ProviderRoutes, ApiKeyBudgets and Secrets -> [`Config`]. Pure: the environment and the file system are reached
//! only through a [`Resolver`], so tests feed maps.
//!
//! The checks here mirror the CRD schema (patterns, bounds, CEL rules) so that standalone mode
//! rejects what the API server would reject; the schema tests run the same bad specs through both.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Uri};
use k8s_openapi::api::core::v1::Secret;

use sha2::{Digest, Sha256};

use super::{
    Budget, Config, ConfigError, ConfigErrors, Credential, FallbackPolicy, HealthPolicy, ObjectRef, Origin, Prices,
    RateLimitPolicy, ReasonSet, Route, Target, Timeouts, Upstream,
};
use crate::api::{self, Api, ApiKeyBudget, LedgerUnavailable, ProviderRoute, SecretKeyRef, units};
use crate::mock_provider::MockOptions;

/// Reaches the outside world for credentials that are not Secrets.
pub trait Resolver {
    /// The value of an environment variable of the sidecar process.
    fn env(&self, name: &str) -> Option<String>;
    /// The content of a file.
    fn file(&self, path: &str) -> std::io::Result<String>;
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
}

/// The namespace of objects that do not name one, as `kubectl apply` would place them.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Compiles every route; any problem anywhere rejects the whole configuration, and every problem is
/// reported, not only the first.
pub fn compile(docs: &Documents, resolver: &dyn Resolver) -> Result<Config, ConfigErrors> {
    let secrets = index_secrets(&docs.secrets);
    let mut errors = Vec::new();
    let mut routes = Vec::with_capacity(docs.routes.len());
    // Which route claimed each model name first, for conflicts across routes.
    let mut claimed: HashMap<String, ObjectRef> = HashMap::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();

    if docs.routes.is_empty() {
        errors.push(ConfigError {
            origin: None,
            object: None,
            path: String::new(),
            message: "no ProviderRoute found: the configuration must define at least one route".into(),
        });
    }

    for doc in &docs.routes {
        let mut cx = Cx { doc_origin: &doc.origin, object: object_ref(&doc.object), errors: &mut errors };
        if !seen.insert((cx.object.namespace.clone(), cx.object.name.clone())) {
            cx.error("metadata.name", "is defined more than once".into());
            continue;
        }
        let Some(route) = compile_route(&doc.object, &secrets, resolver, &mut cx) else {
            continue;
        };
        for (i, name) in route.model_names().enumerate() {
            let path = if i == 0 { "spec.model".to_string() } else { format!("spec.aliases[{}]", i - 1) };
            match claimed.get(name) {
                Some(owner) => cx.error(&path, format!("model {name:?} is already served by {owner}")),
                None => {
                    claimed.insert(name.to_string(), cx.object.clone());
                }
            }
        }
        routes.push(route);
    }

    let mut budgets = Vec::with_capacity(docs.budgets.len());
    let mut key_owners: HashMap<[u8; 32], ObjectRef> = HashMap::new();
    for doc in &docs.budgets {
        let mut cx = Cx { doc_origin: &doc.origin, object: budget_ref(&doc.object), errors: &mut errors };
        if !seen.insert(("ApiKeyBudget ".to_string() + &cx.object.namespace, cx.object.name.clone())) {
            cx.error("metadata.name", "is defined more than once".into());
            continue;
        }
        let Some(budget) = compile_budget(&doc.object, &secrets, &mut cx) else { continue };
        match key_owners.get(&budget.key_hash) {
            Some(owner) => cx.error("spec.key", format!("is the same key as {owner}'s; each key has one budget")),
            None => {
                key_owners.insert(budget.key_hash, cx.object.clone());
            }
        }
        budgets.push(budget);
    }

    if errors.is_empty() { Ok(Config { routes, budgets }) } else { Err(ConfigErrors(errors)) }
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
    let key_hash = match (&spec.key.secret_ref, &spec.key.sha256) {
        (Some(r), None) => {
            let ns = b.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
            cx.check("spec.key.secretRef", secret_key(secrets, ns, r))
                .map(|key| <[u8; 32]>::from(Sha256::digest(key.as_bytes())))
        }
        (None, Some(hex)) => cx.check("spec.key.sha256", sha256_hex(hex)),
        _ => {
            cx.error("spec.key", "exactly one of secretRef or sha256 must be set".into());
            None
        }
    };
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
        limit,
        period: spec.period,
        low_balance,
        fail_open: spec.on_ledger_unavailable == LedgerUnavailable::FailOpen,
        allowed_models: spec.allowed_models.clone(),
        rate_limit,
    })
}

fn sha256_hex(hex: &str) -> Result<[u8; 32], String> {
    let invalid = || "must be 64 lowercase hexadecimal digits".to_string();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
    }
    Ok(out)
}

/// Collects the errors of one object.
struct Cx<'a> {
    doc_origin: &'a Option<Origin>,
    object: ObjectRef,
    errors: &'a mut Vec<ConfigError>,
}

impl Cx<'_> {
    fn error(&mut self, path: &str, message: String) {
        self.errors.push(ConfigError {
            origin: self.doc_origin.clone(),
            object: Some(self.object.clone()),
            path: path.to_string(),
            message,
        });
    }

    /// Records the error of a parse and returns its value, so a route is checked in one pass.
    fn check<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.error(path, message)).ok()
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
            on: fallback.on.iter().copied().collect::<ReasonSet>(),
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

    cx.check(&at("name"), dns_label(&t.name));
    if let Some(provider) = &t.provider {
        cx.check(&at("provider"), provider_label(provider));
    }
    let upstream = cx.check(&at("baseUrl"), upstream(t.api, t.base_url.as_deref()));
    if let Some(model) = &t.model {
        cx.check(&at("model"), model_name(model));
    }
    let credential = match &t.credentials {
        None => None,
        Some(c) => cx.check(&at("credentials"), credential(c, pr, secrets, resolver)),
    };
    let headers = cx.check(&at("headers"), headers(&t.headers, credential.is_some()));
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
        weight: t.weight,
        pricing: Prices { prompt: prompt?, completion: completion?, cached_prompt: cached_prompt?, request: request? },
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

fn upstream(api: Api, base_url: Option<&str>) -> Result<Upstream, String> {
    match (api, base_url) {
        (Api::Mock, None) => Ok(Upstream::Mock(Arc::new(MockOptions::default()))),
        (Api::Mock, Some(url)) => {
            let query = url.strip_prefix("mock://").ok_or("must start with mock:// when api is mock")?;
            let query = query.split_once('?').map_or("", |(_, q)| q);
            Ok(Upstream::Mock(Arc::new(MockOptions::from_query(query)?)))
        }
        (Api::Openai, None) => Err("is required unless api is mock".into()),
        (Api::Openai, Some(url)) => {
            if url.len() > 2048 {
                return Err("is longer than 2048 characters".into());
            }
            let base_url = url.trim_end_matches('/');
            // Messages do not repeat the URL: it may hold a password.
            let uri: Uri = base_url.parse().map_err(|e| format!("is not a valid URL: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err("must be an http:// or https:// URL with a host".into());
            }
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                return Err("must not contain credentials; use the target's credentials field".into());
            }
            if uri.query().is_some() {
                return Err("must not have a query string".into());
            }
            Ok(Upstream::OpenAi { base_url: base_url.to_string() })
        }
    }
}

fn credential(
    c: &api::Credentials,
    pr: &ProviderRoute,
    secrets: &SecretIndex<'_>,
    resolver: &dyn Resolver,
) -> Result<Credential, String> {
    let value = match (&c.secret_ref, &c.env, &c.file) {
        (Some(r), None, None) => secret_key(secrets, pr.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), r)?,
        (None, Some(var), None) => {
            resolver.env(var).ok_or_else(|| format!("environment variable {var:?} is not set"))?
        }
        (None, None, Some(file)) => resolver.file(file).map_err(|e| format!("cannot read file {file:?}: {e}"))?,
        _ => return Err("exactly one of secretRef, env or file must be set".into()),
    };
    // Files and Secrets created with `echo` end in a newline that is not part of the key.
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err("the key is empty".into());
    }
    if HeaderValue::from_str(value).is_err() {
        return Err("the key contains characters that are not allowed in an HTTP header".into());
    }
    Ok(Credential::new(value.to_string()))
}

/// The value a `secretRef` points to, in namespace `ns`, without the trailing newline that `echo`
/// leaves in files and Secrets.
fn secret_key(secrets: &SecretIndex<'_>, ns: &str, r: &SecretKeyRef) -> Result<String, String> {
    let secret = secrets.get(&(ns, r.name.as_str())).ok_or_else(|| format!("secret {:?} not found", r.name))?;
    let value = secret_value(secret, &r.key).ok_or_else(|| format!("secret {:?} has no key {:?}", r.name, r.key))??;
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(format!("secret {:?} key {:?} is empty", r.name, r.key));
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

/// Headers that describe the connection or the body, which the proxy owns.
const RESERVED_HEADERS: [&str; 8] =
    ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer"];

fn headers(headers: &BTreeMap<String, String>, has_credential: bool) -> Result<Vec<(String, String)>, String> {
    if headers.len() > 32 {
        return Err(format!("has {} entries, at most 32 are allowed", headers.len()));
    }
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let parsed =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))?;
        if RESERVED_HEADERS.contains(&parsed.as_str()) {
            return Err(format!("{name:?} is set by the proxy and cannot be configured"));
        }
        if parsed == http::header::AUTHORIZATION && has_credential {
            return Err("\"authorization\" conflicts with credentials; set one or the other".into());
        }
        HeaderValue::from_str(value).map_err(|_| format!("the value of {name:?} is not a valid header value"))?;
        out.push((parsed.as_str().to_string(), value.clone()));
    }
    Ok(out)
}
