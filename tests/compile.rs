//! The compile step: YAML documents and Secrets to the runtime config, with errors that name the
//! file, the document, the object, the field and the reason.

use std::time::Duration;

use sideyard::api::FallbackReason;
use sideyard::config::{
    ConfigErrors, CredentialState, Documents, Format, MapResolver, Reason, Upstream, analyse, compile, compile_texts,
    parse_file,
};

/// Reads and compiles the files as standalone mode does.
fn compile_files(files: &[(&str, &str)], resolver: &MapResolver) -> Result<sideyard::config::Config, Vec<String>> {
    let texts: Vec<(String, String)> = files.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
    compile_texts(&texts, resolver)
        .map(|(config, _)| config)
        .map_err(|ConfigErrors(e)| e.iter().map(ToString::to_string).collect())
}

fn errors_of(files: &[(&str, &str)]) -> Vec<String> {
    compile_files(files, &MapResolver::default()).expect_err("the configuration should be rejected")
}

const SECRET_ROUTES: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: anthropic, namespace: team-a}
data:
  api-key: c2stYW50LWtleQo=
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: chat, namespace: team-a}
spec:
  model: chat
  targets:
    - {name: first, baseUrl: "https://api.example.com/v1", credentials: {secretRef: {name: anthropic, key: api-key}}}
    - {name: second, baseUrl: "https://api.openai.com/v1", credentials: {secretRef: {name: openai, key: api-key}}}
"#;

#[test]
fn errors_name_file_document_object_field_and_reason() {
    assert_eq!(
        errors_of(&[("routes.yaml", SECRET_ROUTES)]),
        [
            "routes.yaml: document 2 (ProviderRoute team-a/chat): spec.targets[1].credentials: secret \"openai\" not found"
        ]
    );
}

#[test]
fn secrets_resolve_in_their_namespace_only() {
    let other_namespace = SECRET_ROUTES.replace("namespace: team-a}\ndata", "namespace: team-b}\ndata");
    let errors = errors_of(&[("routes.yaml", &other_namespace)]);
    assert!(errors[0].ends_with("spec.targets[0].credentials: secret \"anthropic\" not found"), "{errors:?}");

    let with_openai = format!(
        "{SECRET_ROUTES}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: openai, namespace: team-a}}\nstringData: {{other: x}}\n"
    );
    let errors = errors_of(&[("routes.yaml", &with_openai)]);
    assert_eq!(
        errors,
        [
            "routes.yaml: document 2 (ProviderRoute team-a/chat): spec.targets[1].credentials: secret \"openai\" has no key \"api-key\""
        ]
    );

    let complete = with_openai.replace("{other: x}", "{api-key: sk-openai}");
    let config = compile_files(&[("routes.yaml", &complete)], &MapResolver::default()).unwrap();
    let targets = &config.routes[0].targets;
    // `data` is base64; the trailing newline of `echo ... | base64` is not part of the key.
    assert_eq!(targets[0].credential.as_ref().unwrap().expose(), "sk-ant-key");
    assert_eq!(targets[1].credential.as_ref().unwrap().expose(), "sk-openai");
    let debug = format!("{config:?}");
    assert!(!debug.contains("sk-ant-key") && !debug.contains("sk-openai"), "Debug shows a key: {debug}");
    assert!(debug.contains("<redacted>"));
}

#[test]
fn env_and_file_credentials_resolve_through_the_resolver() {
    let yaml = r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: chat}
spec:
  model: chat
  targets:
    - {name: a, baseUrl: "https://a.example/v1", credentials: {env: KEY_A}}
    - {name: b, baseUrl: "https://b.example/v1", credentials: {file: /keys/b}}
"#;
    let resolver = MapResolver::new(&[("KEY_A", "sk-a")], &[("/keys/b", "sk-b\r\n")]);
    let config = compile_files(&[("r.yaml", yaml)], &resolver).unwrap();
    assert_eq!(config.routes[0].targets[0].credential.as_ref().unwrap().expose(), "sk-a");
    assert_eq!(config.routes[0].targets[1].credential.as_ref().unwrap().expose(), "sk-b");

    let errors = errors_of(&[("r.yaml", yaml)]);
    assert_eq!(
        errors,
        [
            "r.yaml: document 1 (ProviderRoute default/chat): spec.targets[0].credentials: environment variable \"KEY_A\" is not set",
            "r.yaml: document 1 (ProviderRoute default/chat): spec.targets[1].credentials: cannot read file \"/keys/b\": entity not found",
        ]
    );
    let empty = MapResolver::new(&[("KEY_A", "")], &[("/keys/b", "line1\nline2")]);
    let errors = compile_files(&[("r.yaml", yaml)], &empty).unwrap_err();
    assert!(errors[0].ends_with("spec.targets[0].credentials: the key is empty"), "{errors:?}");
    assert!(errors[1].ends_with("the key contains characters that are not allowed in an HTTP header"), "{errors:?}");
}

#[test]
fn defaults_fill_what_the_route_leaves_out() {
    let yaml = r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: chat}
spec:
  model: chat
  targets:
    - {name: local, baseUrl: "http://127.0.0.1:8000/v1/", pricing: {prompt: "2.5", completion: "10"}}
    - {name: demo, api: mock}
"#;
    let config = compile_files(&[("r.yaml", yaml)], &MapResolver::default()).unwrap();
    let route = &config.routes[0];
    assert_eq!((route.namespace.as_str(), route.name.as_str()), ("default", "chat"));
    assert_eq!(route.fallback.max_attempts, 3);
    for reason in
        [FallbackReason::Connect, FallbackReason::Timeout, FallbackReason::TooManyRequests, FallbackReason::ServerError]
    {
        assert!(route.fallback.when.contains(reason), "{reason:?}");
    }
    assert!(!route.fallback.when.contains(FallbackReason::ClientError));
    assert_eq!(route.health.consecutive_failures, 3);
    assert_eq!(route.health.base_ejection, Duration::from_secs(10));
    assert_eq!(route.health.max_ejection, Duration::from_secs(300));
    let local = &route.targets[0];
    assert_eq!(local.provider, "local", "the provider label defaults to the name");
    assert_eq!(local.model, "chat", "the upstream model defaults to the route's");
    assert_eq!(
        local.upstream,
        Upstream::Http {
            format: Format::OpenAi,
            base_url: "http://127.0.0.1:8000/v1".into(),
            conversation: "http://127.0.0.1:8000/v1/chat/completions".parse().unwrap(),
        }
    );
    assert_eq!(local.timeouts.connect, Duration::from_secs(2));
    assert_eq!(local.timeouts.first_byte, Duration::from_secs(20));
    assert_eq!(local.timeouts.total, Duration::from_secs(600));
    assert_eq!(local.pricing.prompt, 2_500_000);
    assert_eq!(local.pricing.completion, 10_000_000);
    assert_eq!(local.pricing.cached_prompt, 2_500_000, "cached prompts cost the prompt price unless set");
    assert_eq!(local.pricing.cache_write, 2_500_000, "cache writes cost the prompt price unless set");
    assert_eq!(local.pricing.request, 0);
    assert_eq!(local.weight, 1);
    assert!(local.credential.is_none());
    assert!(matches!(route.targets[1].upstream, Upstream::Mock { .. }));
}

#[test]
fn anthropic_targets_take_conversations_at_v1_messages_or_run_the_mock_in_its_format() {
    let yaml = r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: claude}
spec:
  model: claude
  targets:
    - {name: api, api: anthropic, baseUrl: 'https://api.anthropic.com/', pricing: {prompt: "3", cacheWrite: "3.75"}}
    - {name: fake, api: anthropic, baseUrl: 'mock://local?chunks=2'}
"#;
    let config = compile_files(&[("r.yaml", yaml)], &MapResolver::default()).unwrap();
    let targets = &config.routes[0].targets;
    assert_eq!(
        targets[0].upstream,
        Upstream::Http {
            format: Format::Anthropic,
            base_url: "https://api.anthropic.com".into(),
            conversation: "https://api.anthropic.com/v1/messages".parse().unwrap(),
        }
    );
    assert_eq!(targets[0].pricing.cache_write, 3_750_000);
    assert!(
        matches!(&targets[1].upstream, Upstream::Mock { format: Format::Anthropic, options, .. } if options.chunks == 2)
    );
    // The compiled form the operator publishes reads back the same.
    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains(r#""api":"anthropic","baseUrl":"mock://local?chunks=2""#), "{json}");
    assert_eq!(serde_json::from_str::<sideyard::config::Config>(&json).unwrap(), config);
}

#[test]
fn conflicting_models_and_names_are_rejected() {
    let route = |name: &str, model: &str, aliases: &str| {
        format!(
            "---\napiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {{name: {name}}}\nspec:\n  model: {model}\n  aliases: [{aliases}]\n  targets: [{{name: m, api: mock}}]\n"
        )
    };
    let a = route("a", "chat", "gpt-4o");
    let b = route("b", "gpt-4o", "");
    let c = route("c", "other", "chat");
    assert_eq!(
        errors_of(&[("a.yaml", &a), ("b.yaml", &format!("{b}{c}"))]),
        [
            "b.yaml: document 1 (ProviderRoute default/b): spec.model: model \"gpt-4o\" is already served by ProviderRoute default/a",
            "b.yaml: document 2 (ProviderRoute default/c): spec.aliases[0]: model \"chat\" is already served by ProviderRoute default/a",
        ]
    );
    assert_eq!(
        errors_of(&[("a.yaml", &a), ("again.yaml", &a)]),
        ["again.yaml: document 1 (ProviderRoute default/a): metadata.name: is defined more than once"]
    );
}

#[test]
fn yaml_and_type_errors_name_their_place() {
    let header = "apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {name: x}\n";
    let cases = [
        (
            format!("{header}spec:\n  model: x\n  targets: [{{name: m, api: mock}}]\n  fallbak: {{}}\n"),
            "document 1 (ProviderRoute default/x): spec.fallbak: unknown field; did you mean fallback?",
        ),
        (
            format!("{header}spec:\n  model: x\n  targets: [{{name: m, api: mock}}]\n  fallback: {{on: [connect]}}\n"),
            "spec.fallback.on: unknown field: the fallback reasons are set with `when`",
        ),
        (
            format!("{header}spec:\n  model: x\n  targets: [{{name: m, api: mock, weight: many}}]\n"),
            "spec.targets[0].weight: expected an integer, got the string \"many\"",
        ),
        (
            format!("{header}spec:\n  model: x\n  targets: [{{name: m, api: gemini}}]\n"),
            "spec.targets[0].api: the string \"gemini\" is not one of openai, anthropic, mock",
        ),
        (
            format!("{header}spec:\n  model: x\n  targets: [{{name: m, api: anthropic}}]\n"),
            "spec.targets[0].baseUrl: is required unless api is mock",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, api: anthropic, baseUrl: 'https://api.anthropic.com/v1'}}]\n"
            ),
            "spec.targets[0].baseUrl: must be the API's root, without /v1: /v1/messages is appended to it",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, baseUrl: 'https://a.example/v1', pricing: {{cacheWrite: lots}}}}]\n"
            ),
            "spec.targets[0].pricing.cacheWrite: ",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, api: anthropic, baseUrl: 'https://a.example', anthropicBetas: ['a b']}}]\n"
            ),
            "spec.targets[0].anthropicBetas[0]: \"a b\" is not a beta name",
        ),
        (format!("{header}spec:\n  model: x\n"), "(ProviderRoute default/x): spec.targets: required field is missing"),
        (
            format!("---\nkind: ProviderRoute\n---\n{header}spec: [\n"),
            "r.yaml: document 1 (ProviderRoute default/): not a Kubernetes object: apiVersion and kind are required",
        ),
        ("a: 1\n---\nb: [\n".to_string(), "r.yaml: document 2: invalid YAML: "),
        (
            "apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoutes\nmetadata: {name: x}\n".to_string(),
            "unknown kind \"ProviderRoutes\" in \"sideyard.dev/v1alpha1\"",
        ),
        (
            "apiVersion: sideyard.dev/v1\nkind: ProviderRoute\nmetadata: {name: x}\n".to_string(),
            "unknown kind \"ProviderRoute\" in \"sideyard.dev/v1\"",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, baseUrl: 'https://user:hunter2@api.example/v1'}}]\n"
            ),
            "spec.targets[0].baseUrl: must not contain credentials",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, baseUrl: 'https://a.example/v1', headers: {{Host: x}}}}]\n"
            ),
            "spec.targets[0].headers: \"Host\" is set by the proxy and cannot be configured",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, baseUrl: 'https://a.example/v1', headers: {{'bad header': x}}}}]\n"
            ),
            "spec.targets[0].headers: \"bad header\" is not a valid header name",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, baseUrl: 'mock://x', api: mock, model: y}}]\n  fallback: {{maxAttempts: 0}}\n"
            ),
            "spec.fallback.maxAttempts: 0 is out of range 1 to 16",
        ),
        (
            format!(
                "{header}spec:\n  model: x\n  targets: [{{name: m, api: mock, baseUrl: 'mock://local?latency=soon'}}]\n"
            ),
            "spec.targets[0].baseUrl: mock option latency: invalid duration \"soon\"",
        ),
    ];
    for (yaml, expected) in cases {
        let errors = errors_of(&[("r.yaml", &yaml)]);
        assert!(errors.iter().any(|e| e.contains(expected)), "expected {expected:?} in {errors:?}");
        assert!(!errors.iter().any(|e| e.contains("hunter2")), "an error repeats a password: {errors:?}");
    }
}

#[test]
fn every_problem_of_every_document_is_reported_in_one_run() {
    let header = |kind: &str, name: &str| {
        format!("apiVersion: sideyard.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\n")
    };
    let first = format!(
        "{}spec:\n  model: a\n  strategy: fastest\n  fallbak: {{}}\n  targets: [{{name: m, api: mock, weight: many}}]\n---\n{}spec:\n  model: b\n  targets: [{{name: m, api: mock, baseUrl: 'mock://local?latency=soon'}}]\n",
        header("ProviderRoute", "a"),
        header("ProviderRoute", "b")
    );
    let second = format!("{}spec: {{key: {{sha256: abc}}, limt: '1', period: hourly}}\n", header("ApiKeyBudget", "k"));
    let errors = errors_of(&[("first.yaml", &first), ("second.yaml", &second)]);
    for expected in [
        "first.yaml: document 1 (ProviderRoute default/a): spec.strategy: the string \"fastest\" is not one of",
        "first.yaml: document 1 (ProviderRoute default/a): spec.fallbak: unknown field; did you mean fallback?",
        "first.yaml: document 1 (ProviderRoute default/a): spec.targets[0].weight: expected an integer",
        // A document that reads well is compiled too, and its problems are reported beside.
        "first.yaml: document 2 (ProviderRoute default/b): spec.targets[0].baseUrl: mock option latency",
        "second.yaml: document 1 (ApiKeyBudget default/k): spec.limt: unknown field; did you mean limit?",
        "second.yaml: document 1 (ApiKeyBudget default/k): spec.period: the string \"hourly\" is not one of",
    ] {
        assert!(errors.iter().any(|e| e.starts_with(expected)), "expected {expected:?} in {errors:#?}");
    }
    assert_eq!(errors.len(), 6, "{errors:#?}");
}

#[test]
fn other_kinds_are_skipped_and_lists_are_read() {
    let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec: {replicas: 1}
---
apiVersion: v1
kind: List
items:
  - apiVersion: sideyard.dev/v1alpha1
    kind: ProviderRoute
    metadata: {name: listed}
    spec: {model: listed, targets: [{name: m, api: mock}]}
---
"#;
    let config = compile_files(&[("all.yaml", yaml)], &MapResolver::default()).unwrap();
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.routes[0].model, "listed");

    let only_other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n";
    assert_eq!(
        errors_of(&[("c.yaml", only_other)]),
        ["no ProviderRoute found: the configuration must define at least one route"]
    );
}

/// A route served by the mock, for configurations about budgets.
const MOCK_ROUTE: &str = "apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {name: chat}\nspec: {model: chat, targets: [{name: m, api: mock}]}\n";

/// An ApiKeyBudget document of the default namespace, `spec` as a flow mapping's fields.
fn budget_doc(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: {name}}}\nspec: {{{spec}}}\n"
    )
}

#[test]
fn budgets_keep_only_the_hash_of_their_key_and_a_key_has_one_budget() {
    let route = MOCK_ROUTE;
    let budget = |name: &str, key: &str| {
        format!(
            "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: {name}}}\nspec: {{key: {key}, limit: '12.5', period: daily}}\n"
        )
    };
    let secret = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: k}\nstringData: {key: \"sk-abc\\n\"}\n";
    let yaml = format!("{route}{}{secret}", budget("a", "{secretRef: {name: k, key: key}}"));
    let config = compile_files(&[("b.yaml", &yaml)], &MapResolver::default()).unwrap();
    let b = &config.budgets[0];
    assert_eq!(b.limit, Some(12_500_000));
    assert_eq!(b.period, sideyard::api::Period::Daily);
    let expected: [u8; 32] = sha2_of("sk-abc");
    assert_eq!(b.key_hash, Some(expected), "the trailing newline of the Secret is not part of the key");
    assert!(!format!("{config:?}").contains("sk-abc"));

    let hex: String = expected.iter().map(|b| format!("{b:02x}")).collect();
    let twice = format!("{yaml}{}", budget("b", &format!("{{sha256: {hex}}}")));
    assert_eq!(
        errors_of(&[("b.yaml", &twice)]),
        [
            "b.yaml: document 4 (ApiKeyBudget default/b): spec.key: is the same key as ApiKeyBudget default/a's; each key has one budget"
        ]
    );
    let missing = format!("{route}{}", budget("a", "{secretRef: {name: nope, key: key}}"));
    assert_eq!(
        errors_of(&[("b.yaml", &missing)]),
        ["b.yaml: document 2 (ApiKeyBudget default/a): spec.key.secretRef: secret \"nope\" not found"]
    );
}

#[test]
fn a_chain_of_parents_ends_within_three_budgets_of_its_namespace_without_a_cycle() {
    let route = "apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {name: chat, namespace: t}\nspec: {model: chat, targets: [{name: m, api: mock}]}\n";
    // `parent` as `name: parent`; a budget named `key-*` has a key, the others are only parents.
    let budgets = |chain: &[(&str, Option<&str>)]| {
        let mut yaml = route.to_string();
        for (i, (name, parent)) in chain.iter().enumerate() {
            let key = if name.starts_with("key") {
                // A distinct hash per budget: its index, in each of the 64 digits.
                format!("key: {{sha256: {}}}, ", format!("{i:x}").repeat(64))
            } else {
                String::new()
            };
            let parent = parent.map(|p| format!(", parent: {p}")).unwrap_or_default();
            yaml += &format!(
                "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: {name}, namespace: t}}\nspec: {{{key}limit: '10'{parent}}}\n"
            );
        }
        analyse(&docs_of(&yaml), &MapResolver::default())
    };
    let reasons = |analysis: &sideyard::config::Analysis, name: &str| -> Vec<(Reason, String)> {
        let outcome = analysis.outcomes.iter().find(|o| o.object.name == name).expect("an outcome per object");
        outcome.errors.iter().map(|e| (e.reason, e.to_string())).collect()
    };

    // A key, its team, the team's organisation: three levels, all accepted; the organisation has
    // no key of its own.
    let three = budgets(&[("key-a", Some("team")), ("team", Some("org")), ("org", None)]);
    assert!(three.outcomes.iter().all(|o| o.accepted()), "{:?}", three.outcomes);
    let compiled = |name: &str| three.config.budgets.iter().find(|b| b.name == name).cloned();
    assert_eq!(compiled("key-a").and_then(|b| b.parent), Some("team".to_string()));
    assert_eq!(compiled("org").map(|b| b.key_hash), Some(None), "a budget may exist only to be a parent");

    // A fourth level is one too many: only the budget at its bottom is refused.
    let four = budgets(&[("key-a", Some("team")), ("team", Some("dept")), ("dept", Some("org")), ("org", None)]);
    assert_eq!(
        reasons(&four, "key-a"),
        [(
            Reason::ParentTooDeep,
            "ns.yaml: document 2 (ApiKeyBudget t/key-a): spec.parent: the chain of parents key-a -> team -> dept -> org is longer than 3 budgets".to_string()
        )]
    );
    assert!(["team", "dept", "org"].iter().all(|n| reasons(&four, n).is_empty()));
    assert_eq!(four.config.budgets.len(), 3);

    // A missing parent refuses its child and every budget below it, each told whose parent is missing.
    let missing = budgets(&[("key-a", Some("team")), ("team", Some("gone"))]);
    let (reason, message) = &reasons(&missing, "team")[0];
    assert_eq!(*reason, Reason::ParentNotFound);
    assert!(message.ends_with("spec.parent: names \"gone\", which is not an accepted ApiKeyBudget of namespace \"t\": create it, fix it, or remove spec.parent"), "{message}");
    let (reason, message) = &reasons(&missing, "key-a")[0];
    assert_eq!(*reason, Reason::ParentNotFound);
    assert!(message.contains("names \"gone\" (the parent of \"team\")"), "{message}");
    assert!(missing.config.budgets.is_empty());

    // A cycle refuses every budget on it or below it, and says where it closes.
    let cycle = budgets(&[("key-a", Some("team")), ("team", Some("org")), ("org", Some("team"))]);
    for name in ["key-a", "team", "org"] {
        assert_eq!(reasons(&cycle, name)[0].0, Reason::ParentCycle, "{name}");
    }
    assert!(
        reasons(&cycle, "key-a")[0]
            .1
            .ends_with("the chain of parents key-a -> team -> org -> team comes back to itself")
    );
    // A budget is not its own parent.
    let own = budgets(&[("key-a", Some("key-a"))]);
    assert_eq!(
        reasons(&own, "key-a")[0].1,
        "ns.yaml: document 2 (ApiKeyBudget t/key-a): spec.parent: must name another ApiKeyBudget of the namespace"
    );

    // Parents are found in their child's namespace only.
    let yaml = format!(
        "{route}---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: key-a, namespace: t}}\nspec: {{key: {{sha256: {}}}, parent: team}}\n---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: team, namespace: other}}\nspec: {{limit: '1'}}\n",
        "a".repeat(64)
    );
    let across = analyse(&docs_of(&yaml), &MapResolver::default());
    assert_eq!(reasons(&across, "key-a")[0].0, Reason::ParentNotFound);
}

#[test]
fn a_top_up_needs_a_parent_a_limit_and_room_for_one_amount_a_period() {
    let route = MOCK_ROUTE;
    let team =
        "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {name: team}\nspec: {limit: '100'}\n";
    let key = |spec: &str| {
        format!(
            "{route}{team}---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: key}}\nspec: {{key: {{sha256: {}}}, {spec}}}\n",
            "a".repeat(64)
        )
    };
    let config = compile_files(
        &[("b.yaml", &key("limit: '10', parent: team, topUp: {threshold: '2', amount: '5', maxPerPeriod: '20'}"))],
        &MapResolver::default(),
    )
    .unwrap();
    let policy = config.budgets.iter().find(|b| b.name == "key").and_then(|b| b.top_up);
    assert_eq!(policy.map(|p| (p.threshold, p.amount, p.max_per_period)), Some((2_000_000, 5_000_000, 20_000_000)));
    assert_eq!(
        errors_of(&[(
            "b.yaml",
            &key("limit: '10', parent: team, topUp: {threshold: '2', amount: '5', maxPerPeriod: '4'}")
        )]),
        [
            "b.yaml: document 3 (ApiKeyBudget default/key): spec.topUp.maxPerPeriod: must be at least amount, or no top-up ever fits"
        ]
    );
    let errors =
        errors_of(&[("b.yaml", &key("limit: '10', topUp: {threshold: '2', amount: '5', maxPerPeriod: '20'}"))]);
    assert!(errors.iter().any(|e| e.ends_with("topUp needs a parent and a limit")), "{errors:?}");
}

#[test]
fn a_pod_selected_by_a_key_gets_its_parents_without_their_keys() {
    let route = MOCK_ROUTE;
    let budget = budget_doc;
    let yaml = format!(
        "{route}{}{}{}",
        budget(
            "key-a",
            &format!(
                "key: {{sha256: {}}}, parent: team, workloadSelector: {{matchLabels: {{app: a}}}}",
                "a".repeat(64)
            )
        ),
        budget(
            "team",
            &format!(
                "key: {{sha256: {}}}, parent: org, limit: '5', workloadSelector: {{matchLabels: {{app: z}}}}",
                "b".repeat(64)
            )
        ),
        budget("org", "limit: '50'"),
    );
    let config = compile_files(&[("b.yaml", &yaml)], &MapResolver::default()).unwrap();
    let for_pod = |app: &str| {
        let mut c = config.clone();
        c.retain_for(&[("app".to_string(), app.to_string())].into());
        c.budgets.iter().map(|b| (b.name.clone(), b.key_hash.is_some())).collect::<Vec<_>>()
    };
    assert_eq!(
        for_pod("a"),
        [("key-a".to_string(), true), ("team".to_string(), false), ("org".to_string(), false)],
        "the team's limit comes along, its key does not"
    );
    assert_eq!(for_pod("z"), [("team".to_string(), true), ("org".to_string(), false)]);
}

fn sha2_of(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

fn docs_of(text: &str) -> Documents {
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    parse_file("ns.yaml", text, &mut docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    docs
}

/// The operator's view: each object stands alone, and its reasons become status conditions.
#[test]
fn analyse_keeps_the_valid_objects_and_gives_each_problem_a_reason() {
    let docs = docs_of(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: good, namespace: team-a}
spec:
  model: chat
  targets:
    - {name: keyed, baseUrl: "https://a.example/v1", credentials: {secretRef: {name: keys, key: openai}}}
    - {name: open, api: mock}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: no-secret, namespace: team-a}
spec:
  model: other
  targets:
    - {name: one, baseUrl: "https://a.example/v1", credentials: {secretRef: {name: missing, key: k}}}
    - {name: two, baseUrl: "https://b.example/v1", credentials: {secretRef: {name: keys, key: nope}}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: newer, namespace: team-a}
spec:
  model: third
  aliases: [chat]
  targets: [{name: m, api: mock}]
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: broken, namespace: team-a}
spec:
  model: fourth
  holdBack: soon
  targets: [{name: m, api: mock}]
---
apiVersion: sideyard.dev/v1alpha1
kind: ApiKeyBudget
metadata: {name: first, namespace: team-a}
spec: {key: {secretRef: {name: keys, key: app}}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ApiKeyBudget
metadata: {name: same-key, namespace: team-a}
spec: {key: {secretRef: {name: keys, key: app}}}
---
apiVersion: v1
kind: Secret
metadata: {name: keys, namespace: team-a}
stringData: {openai: sk-1, app: sk-app}
"#,
    );
    let analysis = analyse(&docs, &MapResolver::default());
    let routes: Vec<&str> = analysis.config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(routes, ["good"], "only the valid route is compiled");
    let budgets: Vec<&str> = analysis.config.budgets.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(budgets, ["first"], "the first budget keeps the key");

    let outcome = |name: &str| analysis.outcomes.iter().find(|o| o.object.name == name).unwrap();
    let reasons = |name: &str| outcome(name).errors.iter().map(|e| e.reason).collect::<Vec<_>>();
    assert!(outcome("good").accepted());
    assert_eq!(reasons("no-secret"), [Reason::SecretNotFound, Reason::KeyNotFound]);
    assert_eq!(reasons("newer"), [Reason::DuplicateModel]);
    assert_eq!(
        outcome("newer").errors[0].to_string(),
        "ns.yaml: document 3 (ProviderRoute team-a/newer): spec.aliases[0]: model \"chat\" is already served by ProviderRoute team-a/good"
    );
    assert_eq!(reasons("broken"), [Reason::Invalid]);
    assert_eq!(reasons("same-key"), [Reason::DuplicateKey]);

    let states: Vec<(&str, &CredentialState)> =
        outcome("no-secret").credentials.iter().map(|c| (c.target.as_str(), &c.state)).collect();
    assert_eq!(
        states,
        [
            (
                "one",
                &CredentialState::Unresolved {
                    reason: Reason::SecretNotFound,
                    message: "secret \"missing\" not found".into()
                }
            ),
            (
                "two",
                &CredentialState::Unresolved {
                    reason: Reason::KeyNotFound,
                    message: "secret \"keys\" has no key \"nope\"".into()
                }
            ),
        ]
    );
    let good: Vec<&CredentialState> = outcome("good").credentials.iter().map(|c| &c.state).collect();
    assert_eq!(good, [&CredentialState::Resolved, &CredentialState::NotConfigured]);

    // Standalone compiles the same documents as one unit: every problem, nothing served.
    let errors = compile(&docs, &MapResolver::default()).unwrap_err();
    assert_eq!(errors.0.len(), 5);
}

/// An invalid route claims no model name, so a valid route that comes later keeps serving it.
#[test]
fn an_invalid_route_does_not_hold_its_model_names() {
    let docs = docs_of(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: older}
spec:
  model: chat
  targets: [{name: a, baseUrl: "https://a.example/v1", credentials: {secretRef: {name: missing, key: k}}}]
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: newer}
spec:
  model: chat
  targets: [{name: m, api: mock}]
"#,
    );
    let analysis = analyse(&docs, &MapResolver::default());
    assert_eq!(analysis.config.routes.len(), 1);
    assert_eq!(analysis.config.routes[0].name, "newer");
}

#[test]
fn workload_selectors_are_kept_checked_and_applied_per_pod() {
    let yaml = r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: bots}
spec:
  model: chat
  workloadSelector: {matchLabels: {app: bot}}
  targets: [{name: m, api: mock}]
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: everyone}
spec:
  model: other
  targets: [{name: m, api: mock}]
"#;
    let config = compile_files(&[("r.yaml", yaml)], &MapResolver::default()).unwrap();
    let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let names = |mut c: sideyard::config::Config, l| {
        c.retain_for(&l);
        c.routes.into_iter().map(|r| r.name).collect::<Vec<_>>()
    };
    assert_eq!(names(config.clone(), labels(&[("app", "bot")])), ["bots", "everyone"]);
    assert_eq!(names(config, labels(&[("app", "web")])), ["everyone"]);

    let bad = yaml.replace("{matchLabels: {app: bot}}", "{matchExpressions: [{key: app, operator: In}]}");
    assert_eq!(
        errors_of(&[("r.yaml", &bad)]),
        [
            "r.yaml: document 1 (ProviderRoute default/bots): spec.workloadSelector: matchExpressions[0].values: must not be empty for In"
        ]
    );
}

/// The compile step on arbitrary YAML: whatever a file holds, it is accepted or refused with
/// errors, never a panic.
mod properties {
    use proptest::prelude::*;
    use serde_yaml::Value;

    use super::*;

    /// A valid route, budget and Secret: the property tests bend one of its values at a time.
    const BASE: &str = r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: chat, namespace: team-a}
spec:
  model: chat
  aliases: [gpt-4o]
  strategy: weighted
  targets:
    - name: a
      baseUrl: https://api.example.com/v1
      model: gpt-4o
      credentials: {secretRef: {name: keys, key: openai}}
      headers: {x-team: a}
      weight: 3
      pricing: {prompt: "2.50", completion: "10", cachedPrompt: "1.25", request: "0.001"}
      contextWindow: 128000
      timeouts: {connect: 2s, firstByte: 20s, total: 10m}
    - {name: b, api: mock, baseUrl: "mock://local?chunks=3&fail-rate=0.5"}
  fallback: {maxAttempts: 2}
  health: {consecutiveFailures: 3, baseEjection: 10s, maxEjection: 5m}
  holdBack: 2s
  hedge: {after: 800ms}
  reservedCompletionTokens: 512
---
apiVersion: sideyard.dev/v1alpha1
kind: ApiKeyBudget
metadata: {name: bot, namespace: team-a}
spec:
  key: {secretRef: {name: keys, key: app}}
  limit: "100.00"
  period: monthly
  lowBalanceThreshold: "5"
  allowedModels: [chat]
  rateLimit: {requestsPerMinute: 60, tokensPerMinute: 100000}
---
apiVersion: v1
kind: Secret
metadata: {name: keys, namespace: team-a}
stringData: {openai: sk-upstream, app: sk-app}
"#;

    fn base() -> Vec<Value> {
        BASE.split("\n---\n").map(|doc| serde_yaml::from_str(doc).expect("BASE is YAML")).collect()
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<u64>().prop_map(|n| Value::Number(n.into())),
            any::<f64>().prop_map(|f| Value::Number(f.into())),
            prop::sample::select(
                &[
                    "",
                    "0",
                    "-1",
                    "1e999",
                    "99999999999999999999",
                    "2.5000001",
                    "0.000001",
                    "1s",
                    "999999999h",
                    "1h30m",
                    "mock://",
                    "mock://x?chunks=99999999999",
                    "http://",
                    "https://[::1]:0/v1",
                    "a\nb",
                    "sk-\u{0}",
                    "on",
                    "yes",
                    "~",
                    "éé",
                    "{",
                    "[",
                ][..]
            )
            .prop_map(|s| Value::String(s.into())),
            ".{0,16}".prop_map(Value::String),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
                prop::collection::vec((".{1,8}", inner), 0..4)
                    .prop_map(|kv| Value::Mapping(kv.into_iter().map(|(k, v)| (Value::String(k), v)).collect())),
            ]
        })
    }

    /// Every place in a document: the paths to its mappings' values and sequences' items.
    fn places(value: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
        match value {
            Value::Mapping(m) => {
                for (k, v) in m {
                    at.push(k.clone());
                    out.push(at.clone());
                    places(v, at, out);
                    at.pop();
                }
            }
            Value::Sequence(s) => {
                for (i, v) in s.iter().enumerate() {
                    at.push(Value::Number(i.into()));
                    out.push(at.clone());
                    places(v, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }

    fn replace(value: &mut Value, path: &[Value], new: Value) {
        let Some((first, rest)) = path.split_first() else {
            *value = new;
            return;
        };
        let next = match (value, first) {
            (Value::Mapping(m), k) => m.get_mut(k),
            (Value::Sequence(s), Value::Number(i)) => i.as_u64().and_then(|i| s.get_mut(i as usize)),
            _ => None,
        };
        if let Some(next) = next {
            replace(next, rest, new);
        }
    }

    fn compile_text(text: &str) {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        parse_file("fuzz.yaml", text, &mut docs, &mut errors);
        let _ = analyse(&docs, &MapResolver::default());
        let _ = compile(&docs, &MapResolver::default());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn one_bent_value_is_compiled_or_refused(pick in any::<prop::sample::Index>(), doc in 0usize..3, new in value()) {
            let mut docs = base();
            let mut all = Vec::new();
            places(&docs[doc], &mut Vec::new(), &mut all);
            let path = pick.get(&all).clone();
            replace(&mut docs[doc], &path, new);
            let text: Vec<String> = docs.iter().map(|d| serde_yaml::to_string(d).unwrap_or_default()).collect();
            compile_text(&text.join("---\n"));
        }

        #[test]
        fn any_text_is_compiled_or_refused(text in prop_oneof![".{0,200}", "[a-zA-Z:{}\\[\\],\\- \\n\"'#&*!|>%@`0-9]{0,200}"]) {
            compile_text(&text);
        }

        #[test]
        fn a_cut_file_is_compiled_or_refused(cut in any::<prop::sample::Index>()) {
            let at = cut.index(BASE.len());
            if BASE.is_char_boundary(at) {
                compile_text(&BASE[..at]);
            }
        }
    }

    #[test]
    fn the_base_compiles() {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        parse_file("base.yaml", BASE, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let config = compile(&docs, &MapResolver::default()).expect("BASE is valid");
        assert_eq!((config.routes.len(), config.budgets.len()), (1, 1));
    }
}

/// One pass-through default per namespace: a second claim is refused with its own reason, which
/// the operator writes into the route's status.
#[test]
fn a_namespace_has_at_most_one_pass_through_default() {
    let route = |name: &str, namespace: &str| {
        format!(
            "---\napiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  model: {name}\n  passthroughDefault: true\n  targets: [{{name: m, api: mock}}]\n"
        )
    };
    let docs = docs_of(&[route("files", "team-a"), route("batches", "team-a"), route("files-b", "team-b")].concat());
    let analysis = analyse(&docs, &MapResolver::default());
    let defaults: Vec<&str> =
        analysis.config.routes.iter().filter(|r| r.passthrough_default).map(|r| r.name.as_str()).collect();
    assert_eq!(defaults, ["files", "files-b"]);
    let refused = analysis.outcomes.iter().find(|o| o.object.name == "batches").unwrap();
    assert_eq!(refused.errors.iter().map(|e| e.reason).collect::<Vec<_>>(), [Reason::DuplicatePassthroughDefault]);
    assert_eq!(
        refused.errors[0].to_string(),
        "ns.yaml: document 2 (ProviderRoute team-a/batches): spec.passthroughDefault: ProviderRoute team-a/files is already the namespace's pass-through default; there is one per namespace"
    );
}

#[test]
fn a_template_issues_at_most_a_hundred_keys() {
    let secret = |i: usize| {
        format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bot-{i:03}, labels: {{sideyard.dev/key: bots}}}}\nstringData: {{key: sk-bot-{i:03}}}\n"
        )
    };
    let template = "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {name: bots}\nspec:\n  keys: {secretSelector: {matchLabels: {sideyard.dev/key: bots}}}\n  limit: '1'\n";
    let issued = |n: usize| {
        let docs = docs_of(&format!("{template}{}", (0..n).map(secret).collect::<String>()));
        sideyard::config::analyse(&docs, &MapResolver::default())
    };
    let hundred = issued(100);
    assert_eq!(hundred.config.budgets.len(), 100);
    assert_eq!(hundred.config.budgets[0].name, "bots:bot-000");
    let more = issued(101);
    assert!(more.config.budgets.is_empty());
    let error = &more.outcomes[0].errors[0];
    assert_eq!((error.reason.as_str(), error.path.as_str()), ("TooManyKeys", "spec.keys.secretSelector"));
    assert!(error.message.starts_with("matches 101 Secrets; a template issues at most 100 keys"), "{error:?}");
}
