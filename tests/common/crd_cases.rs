//! One table of ProviderRoutes and ApiKeyBudgets that must be refused, read by the offline
//! schema and CEL checks (tests/crd.rs) and by the real API server (tests/envtest), so the two
//! cannot drift.

use serde_json::{Value, json};

/// An object that must be refused.
pub struct Case {
    pub what: &'static str,
    pub object: Value,
    /// The field standalone mode's error names.
    pub field: &'static str,
    /// What the API server's message says (a part of it), and so the offline check's too.
    pub says: &'static str,
}

pub fn valid_route() -> Value {
    json!({
        "apiVersion": "sideyard.dev/v1alpha1",
        "kind": "ProviderRoute",
        "metadata": {"name": "chat", "namespace": "team-a"},
        "spec": {
            "model": "chat",
            "aliases": ["gpt-4o"],
            "workloadSelector": {"matchLabels": {"app": "support-bot"}},
            "targets": [
                {
                    "name": "openai", "provider": "OpenAI", "api": "openai", "baseUrl": "https://api.openai.com/v1",
                    "model": "gpt-4o-2024-08-06", "credentials": {"env": "OPENAI_API_KEY"},
                    "headers": {"OpenAI-Organization": "org-1"}, "weight": 3,
                    "pricing": {"prompt": "2.50", "completion": "10.00", "cachedPrompt": "1.25", "request": "0"},
                    "contextWindow": 128000, "timeouts": {"connect": "2s", "firstByte": "20s", "total": "10m"}
                },
                {"name": "backup", "baseUrl": "http://10.0.0.7:8000/v1", "credentials": {"file": "/keys/openai"}},
                {"name": "demo", "api": "mock", "baseUrl": "mock://local?latency=5ms"}
            ],
            "strategy": "weighted",
            "fallback": {"when": ["connect", "timeout", "429", "5xx", "4xx-context-length", "4xx"], "maxAttempts": 3},
            "health": {"consecutiveFailures": 3, "baseEjection": "10s", "maxEjection": "5m"},
            "holdBack": "2s",
            "hedge": {"after": "800ms"}
        }
    })
}

/// Applies a change to the valid route, given as a JSON pointer and a value (`null` removes).
pub fn mutated(pointer: &str, value: Value) -> Value {
    let mut route = valid_route();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = route.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}"));
    match (parent, value) {
        (Value::Object(map), Value::Null) => {
            map.remove(key);
        }
        (Value::Object(map), v) => {
            map.insert(key.to_string(), v);
        }
        (Value::Array(list), v) => list[key.parse::<usize>().unwrap()] = v,
        _ => panic!("cannot set {pointer}"),
    }
    route
}

pub fn valid_budget() -> Value {
    json!({
        "apiVersion": "sideyard.dev/v1alpha1",
        "kind": "ApiKeyBudget",
        "metadata": {"name": "support-bot", "namespace": "team-a"},
        "spec": {
            "key": {"secretRef": {"name": "key", "key": "key"}},
            "limit": "100.00",
            "period": "weekly",
            "lowBalanceThreshold": "10",
            "onLedgerUnavailable": "failOpen",
            "maxDebt": "5.00",
            "allowedModels": ["chat", "gpt-4o"],
            "rateLimit": {"requestsPerMinute": 600, "tokensPerMinute": 200000},
            "workloadSelector": {"matchLabels": {"app": "support-bot"}}
        }
    })
}

pub fn mutated_budget(pointer: &str, value: Value) -> Value {
    let mut budget = valid_budget();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = budget.pointer_mut(parent).unwrap().as_object_mut().unwrap();
    if value.is_null() {
        parent.remove(key);
    } else {
        parent.insert(key.to_string(), value);
    }
    budget
}

/// Budgets both the API server and standalone mode refuse: what is wrong, the object, and the
/// field standalone mode's error names.
pub fn refused_budgets() -> Vec<Case> {
    let cases: Vec<(&str, &str, Value, &str, &str)> = vec![
        (
            "two key sources",
            "/spec/key",
            json!({"secretRef": {"name": "key", "key": "key"}, "sha256": "a".repeat(64)}),
            "key",
            "spec.key: Invalid value: exactly one of secretRef or sha256 must be set",
        ),
        (
            "no key source",
            "/spec/key",
            json!({}),
            "key",
            "spec.key: Invalid value: exactly one of secretRef or sha256 must be set",
        ),
        (
            "uppercase sha256",
            "/spec/key",
            json!({"sha256": "A".repeat(64)}),
            "sha256",
            "spec.key.sha256 in body should match '^[0-9a-f]{64}$'",
        ),
        (
            "short sha256",
            "/spec/key",
            json!({"sha256": "abc"}),
            "sha256",
            "spec.key.sha256 in body should match '^[0-9a-f]{64}$'",
        ),
        ("limit with 7 decimals", "/spec/limit", json!("1.0000001"), "limit", "spec.limit in body should match"),
        ("negative limit", "/spec/limit", json!("-5"), "limit", "spec.limit in body should match"),
        ("unknown period", "/spec/period", json!("yearly"), "period", r#"spec.period: Unsupported value: "yearly""#),
        (
            "threshold without limit",
            "/spec/limit",
            Value::Null,
            "lowBalanceThreshold",
            "spec: Invalid value: lowBalanceThreshold needs a limit",
        ),
        (
            "unknown ledger policy",
            "/spec/onLedgerUnavailable",
            json!("ignore"),
            "onLedgerUnavailable",
            r#"spec.onLedgerUnavailable: Unsupported value: "ignore""#,
        ),
        (
            "debt allowed while failing closed",
            "/spec/onLedgerUnavailable",
            json!("failClosed"),
            "maxDebt",
            "spec: Invalid value: maxDebt needs onLedgerUnavailable: failOpen",
        ),
        (
            "debt allowed by default policy",
            "/spec/onLedgerUnavailable",
            Value::Null,
            "maxDebt",
            "spec: Invalid value: maxDebt needs onLedgerUnavailable: failOpen",
        ),
        ("debt that is no decimal", "/spec/maxDebt", json!("lots"), "maxDebt", "spec.maxDebt in body should match"),
        (
            "empty rate limit",
            "/spec/rateLimit",
            json!({}),
            "rateLimit",
            "spec.rateLimit: Invalid value: set requestsPerMinute, tokensPerMinute or both",
        ),
        (
            "zero requests per minute",
            "/spec/rateLimit",
            json!({"requestsPerMinute": 0}),
            "rateLimit",
            "spec.rateLimit.requestsPerMinute in body should be greater than or equal to 1",
        ),
        (
            "model with a space",
            "/spec/allowedModels",
            json!(["my model"]),
            "allowedModels",
            "spec.allowedModels[0] in body should match '^\\S+$'",
        ),
        (
            "key and keys",
            "/spec/keys",
            json!({"secretSelector": {"matchLabels": {"team": "a"}}}),
            "keys",
            "spec: Invalid value: set key or keys, not both",
        ),
        (
            "top-up without a parent",
            "/spec/topUp",
            json!({"threshold": "1", "amount": "5", "maxPerPeriod": "20"}),
            "topUp",
            "spec: Invalid value: topUp needs a parent and a limit",
        ),
        (
            "top-up amount not a decimal",
            "/spec/topUp",
            json!({"threshold": "1", "amount": "five", "maxPerPeriod": "20"}),
            "amount",
            "spec.topUp.amount in body should match",
        ),
        (
            "parent not a name",
            "/spec/parent",
            json!("Team A"),
            "parent",
            "spec.parent in body should match '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'",
        ),
    ];
    cases
        .into_iter()
        .map(|(what, pointer, value, field, says)| Case { what, object: mutated_budget(pointer, value), field, says })
        .collect()
}

/// Routes both the API server and standalone mode refuse: what is wrong, the object, and the
/// field standalone mode's error names.
pub fn refused_routes() -> Vec<Case> {
    use serde_json::json;
    let target = |overrides: Value| {
        let mut t = json!({"name": "t", "baseUrl": "https://api.example.com/v1"});
        for (k, v) in overrides.as_object().unwrap() {
            t[k] = v.clone();
        }
        t
    };
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "duplicate target names",
            json!([target(json!({})), target(json!({}))]),
            "target",
            "spec.targets: Invalid value: target names must be unique",
        ),
        ("no targets", json!([]), "targets", "spec.targets in body should have at least 1 items"),
        (
            "17 targets",
            Value::Array((0..17).map(|i| target(json!({"name": format!("t{i}")}))).collect()),
            "targets",
            "spec.targets: Too many: 17: must have at most 16 items",
        ),
        (
            "two credential sources",
            json!([target(json!({"credentials": {"env": "OPENAI_API_KEY", "file": "/keys/openai"}}))]),
            "credentials",
            "spec.targets[0].credentials: Invalid value: exactly one of secretRef, env or file must be set",
        ),
        (
            "no credential source",
            json!([target(json!({"credentials": {}}))]),
            "credentials",
            "spec.targets[0].credentials: Invalid value: exactly one of secretRef, env or file must be set",
        ),
        (
            "openai without baseUrl",
            json!([{"name": "t"}]),
            "baseUrl",
            "spec.targets[0]: Invalid value: baseUrl is required unless api is mock",
        ),
        (
            "mock with an https baseUrl",
            json!([target(json!({"api": "mock"}))]),
            "baseUrl",
            "spec.targets[0]: Invalid value: baseUrl must use mock:// when api is mock",
        ),
        (
            "openai with a mock baseUrl",
            json!([target(json!({"baseUrl": "mock://local"}))]),
            "baseUrl",
            "spec.targets[0]: Invalid value: baseUrl must use mock:// when api is mock",
        ),
        (
            "unknown api",
            json!([target(json!({"api": "gemini"}))]),
            "api",
            r#"spec.targets[0].api: Unsupported value: "gemini""#,
        ),
        (
            "anthropic baseUrl with /v1",
            json!([target(json!({"api": "anthropic"}))]),
            "baseUrl",
            "spec.targets[0]: Invalid value: an anthropic baseUrl is the API's root, without /v1",
        ),
        (
            "nativeResponses on an anthropic target",
            json!([target(
                json!({"api": "anthropic", "baseUrl": "https://api.anthropic.com", "nativeResponses": true})
            )]),
            "nativeResponses",
            "spec.targets[0]: Invalid value: nativeResponses is for OpenAI-compatible targets",
        ),
        (
            "bad target name",
            json!([target(json!({"name": "Bad_Name"}))]),
            "name",
            "spec.targets[0].name in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
        ),
        (
            "bad provider label",
            json!([target(json!({"provider": "-x"}))]),
            "provider",
            "spec.targets[0].provider in body should match",
        ),
        (
            "weight 0",
            json!([target(json!({"weight": 0}))]),
            "weight",
            "spec.targets[0].weight in body should be greater than or equal to 1",
        ),
        (
            "weight 1001",
            json!([target(json!({"weight": 1001}))]),
            "weight",
            "spec.targets[0].weight in body should be less than or equal to 1000",
        ),
        (
            "negative weight",
            json!([target(json!({"weight": -1}))]),
            "weight",
            "spec.targets[0].weight in body should be greater than or equal to 1",
        ),
        (
            "price with 7 decimals",
            json!([target(json!({"pricing": {"prompt": "0.0000001"}}))]),
            "pricing",
            "spec.targets[0].pricing.prompt in body should match",
        ),
        (
            "price as a number",
            json!([target(json!({"pricing": {"prompt": 2.5}}))]),
            "pricing",
            "spec.targets[0].pricing.prompt in body must be of type string: \"number\"",
        ),
        (
            "negative price",
            json!([target(json!({"pricing": {"completion": "-1"}}))]),
            "pricing",
            "spec.targets[0].pricing.completion in body should match",
        ),
        (
            "context window 0",
            json!([target(json!({"contextWindow": 0}))]),
            "contextWindow",
            "spec.targets[0].contextWindow in body should be greater than or equal to 1",
        ),
        (
            "bad duration",
            json!([target(json!({"timeouts": {"connect": "2 seconds"}}))]),
            "timeouts",
            "spec.targets[0].timeouts.connect in body should match",
        ),
        (
            "connect over total",
            json!([target(json!({"timeouts": {"connect": "20s", "total": "10s"}}))]),
            "timeouts",
            "spec.targets[0].timeouts: Invalid value: connect must not exceed total",
        ),
        (
            "firstByte over total",
            json!([target(json!({"timeouts": {"firstByte": "11m"}}))]),
            "timeouts",
            "spec.targets[0].timeouts: Invalid value: firstByte must not exceed total",
        ),
        (
            "model with a space",
            json!([target(json!({"model": "gpt 4"}))]),
            "model",
            "spec.targets[0].model in body should match '^\\S+$'",
        ),
        (
            "33 headers",
            json!([target(
                json!({"headers": (0..33).map(|i| (format!("x-h{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()})
            )]),
            "headers",
            "spec.targets[0].headers: Too many: 33: must have at most 32 items",
        ),
    ];
    let mut refused: Vec<Case> = cases
        .into_iter()
        .map(|(what, targets, field, says)| Case { what, object: mutated("/spec/targets", targets), field, says })
        .collect();
    let spec_cases: Vec<(&str, &str, Value, &str, &str)> = vec![
        (
            "unknown strategy",
            "/spec/strategy",
            json!("fastest"),
            "strategy",
            r#"spec.strategy: Unsupported value: "fastest""#,
        ),
        ("model with a space", "/spec/model", json!("my model"), "model", "spec.model in body should match '^\\S+$'"),
        ("empty model", "/spec/model", json!(""), "model", "spec.model in body should be at least 1 chars long"),
        (
            "duplicate aliases",
            "/spec/aliases",
            json!(["a", "a"]),
            "aliases",
            "spec.aliases: Invalid value: aliases must be unique",
        ),
        (
            "alias repeats model",
            "/spec/aliases",
            json!(["chat"]),
            "aliases",
            "spec: Invalid value: aliases must not repeat model",
        ),
        (
            "unknown fallback reason",
            "/spec/fallback/when",
            json!(["connect", "4xx-content-filter"]),
            "fallback",
            r#"spec.fallback.when[1]: Unsupported value: "4xx-content-filter""#,
        ),
        ("bad holdBack", "/spec/holdBack", json!("2 s"), "holdBack", "spec.holdBack in body should match"),
        ("hedge without after", "/spec/hedge", json!({}), "hedge", "spec.hedge.after: Required value"),
        (
            "bad hedge duration",
            "/spec/hedge",
            json!({"after": "soon"}),
            "hedge",
            "spec.hedge.after in body should match",
        ),
        (
            "hedge after hold-back ends",
            "/spec/hedge",
            json!({"after": "2s"}),
            "hedge",
            "spec: Invalid value: hedge.after must be shorter than holdBack",
        ),
        (
            "hedge without hold-back",
            "/spec/holdBack",
            json!("0s"),
            "hedge",
            "spec: Invalid value: hedge.after must be shorter than holdBack",
        ),
        (
            "maxAttempts 0",
            "/spec/fallback/maxAttempts",
            json!(0),
            "maxAttempts",
            "spec.fallback.maxAttempts in body should be greater than or equal to 1",
        ),
        (
            "maxAttempts 17",
            "/spec/fallback/maxAttempts",
            json!(17),
            "maxAttempts",
            "spec.fallback.maxAttempts in body should be less than or equal to 16",
        ),
        (
            "consecutiveFailures 0",
            "/spec/health/consecutiveFailures",
            json!(0),
            "consecutiveFailures",
            "spec.health.consecutiveFailures in body should be greater than or equal to 1",
        ),
        (
            "baseEjection over maxEjection",
            "/spec/health/baseEjection",
            json!("10m"),
            "health",
            "spec.health: Invalid value: baseEjection must not exceed maxEjection",
        ),
        (
            "bad ejection duration",
            "/spec/health/maxEjection",
            json!("forever"),
            "maxEjection",
            "spec.health.maxEjection in body should match",
        ),
        ("missing targets", "/spec/targets", Value::Null, "targets", "spec.targets: Required value"),
        ("unknown serves", "/spec/serves", json!("images"), "serves", r#"spec.serves: Unsupported value: "images""#),
    ];
    refused.extend(spec_cases.into_iter().map(|(what, pointer, value, field, says)| Case {
        what,
        object: mutated(pointer, value),
        field,
        says,
    }));
    let mut anthropic_embeddings = mutated("/spec/serves", json!("embeddings"));
    anthropic_embeddings["spec"]["targets"] =
        json!([target(json!({"api": "anthropic", "baseUrl": "https://api.anthropic.com"}))]);
    refused.push(Case {
        what: "an embeddings route with an anthropic target",
        object: anthropic_embeddings,
        field: "api",
        says: "spec: Invalid value: an embeddings route's targets must speak the OpenAI API",
    });
    refused
}
