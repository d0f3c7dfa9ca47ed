//! Budgets: keys, 401/402/403/429, exact and estimated cost, reservations under concurrency, a
//! crash in the middle of load, usage chunks on streams, and a stream that runs out of credit.

mod common;

use std::collections::BTreeMap;

use common::*;

const KEY: &str = "sk-team-a-0123456789";

/// A route served by the in-process mock (8 words per answer, usage as OpenAI reports it) and a
/// budget for `KEY`. Completion tokens cost 1000 per million (0.001 each); prompts are free unless
/// `prompt_price` says otherwise.
fn config(limit: &str, budget_extra: &str, route_extra: &str, prompt_price: &str, mock: &str) -> String {
    let route = route_yaml(
        "chat",
        route_extra,
        &[&format!(
            "{{name: mock, api: mock, baseUrl: 'mock://local?chunk-interval=1ms{mock}', pricing: {{prompt: '{prompt_price}', completion: '1000'}}}}"
        )],
    );
    let open = route_yaml(
        "open",
        "",
        &[&format!("{{name: mock, api: mock, baseUrl: 'mock://local?chunk-interval=1ms{mock}'}}")],
    );
    let budget = budget_yaml("team-a", KEY, &format!("limit: \"{limit}\"\n  allowedModels: [chat]\n  {budget_extra}"));
    format!("{route}{open}{budget}")
}

async fn call(sidecar: &Sidecar, key: Option<&str>, body: &str) -> Reply {
    read(send_as(sidecar.api, key, "POST", "/v1/chat/completions", body).await).await
}

/// The events of a stream sent with `KEY`.
async fn stream_events(sidecar: &Sidecar, body: &str) -> Vec<String> {
    let response = send_as(sidecar.api, Some(KEY), "POST", "/v1/chat/completions", body).await;
    assert_eq!(response.status(), 200);
    sse_data(&rest(&mut response.into_body()).await)
}

async fn key_info(sidecar: &Sidecar) -> serde_json::Value {
    let reply = read(send_as(sidecar.api, Some(KEY), "GET", "/api/v1/key", "").await).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Micro-units of a JSON number's decimal text, or of a decimal string, as the sidecar writes them.
fn micros(value: &serde_json::Value) -> u64 {
    let text = value.as_str().map_or_else(|| value.to_string(), str::to_string);
    sideyard::api::units::parse_micros(&text).unwrap_or_else(|e| panic!("{value}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_never_overspend_the_limit() {
    // Each answer costs exactly what it reserves: 8 completion tokens at 0.001 = 0.008, and 50 of
    // them make the limit.
    let sidecar = Sidecar::start(&config("0.4", "", "", "0", ""));
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let api = sidecar.api;
            tokio::spawn(async move {
                let body = r#"{"model":"chat","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
                read(send_as(api, Some(KEY), "POST", "/v1/chat/completions", body).await).await
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    let mut billed = 0;
    for r in requests {
        let reply = r.await.unwrap();
        *statuses.entry(reply.status.as_u16()).or_insert(0) += 1;
        match reply.status.as_u16() {
            200 => billed += micros(&reply.json()["usage"]["cost"]),
            402 => {
                let error = &reply.json()["error"];
                assert_eq!(error["code"], "insufficient_credits");
                assert_eq!(error["metadata"]["reservation"], serde_json::json!(0.008));
            }
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert_eq!(statuses, BTreeMap::from([(200, 50), (402, 150)]), "exactly the 50 answers the limit pays for");
    assert_eq!(billed, 400_000);
    let key = key_info(&sidecar).await;
    assert_eq!(key["data"]["usage"], serde_json::json!(0.4));
    assert_eq!(key["data"]["limit_remaining"], serde_json::json!(0));
    assert_eq!(key["data"]["state"], "Exhausted");
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_budget_reservations_in_flight{budget="default/team-a"}"#), 0);
    assert_eq!(metric(&metrics, r#"sideyard_budget_insufficient_credits_total{budget="default/team-a"}"#), 150);
    assert_eq!(metric(&metrics, r#"sideyard_budget_state{budget="default/team-a",state="Exhausted"}"#), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn reservations_above_the_cost_release_the_difference() {
    // Prompts are priced too: the reservation counts every byte of the body as a prompt token, the
    // answer far fewer. Spend is what the answers cost, and stays under the limit.
    let sidecar = Sidecar::start(&config("1", "", "", "1000", ""));
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let api = sidecar.api;
            tokio::spawn(async move {
                let body = r#"{"model":"chat","max_tokens":8,"messages":[{"role":"user","content":"a prompt of some length"}]}"#;
                read(send_as(api, Some(KEY), "POST", "/v1/chat/completions", body).await).await
            })
        })
        .collect();
    let mut billed = 0;
    for r in requests {
        let reply = r.await.unwrap();
        if reply.status == 200 {
            billed += micros(&reply.json()["usage"]["cost"]);
        } else {
            assert_eq!(reply.status, 402);
        }
    }
    let spent = micros(&key_info(&sidecar).await["data"]["usage"]);
    assert_eq!(spent, billed, "the ledger holds exactly what the answers reported");
    assert!(spent <= 1_000_000, "{spent}");
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_budget_reservations_in_flight{budget="default/team-a"}"#), 0);

    // Nothing is held once the answers are settled: requests go on until what is left of the
    // limit no longer covers a reservation, and the refusal counts every unspent micro-unit as
    // available. A settle that kept its whole reservation would refuse far earlier.
    let body = r#"{"model":"chat","max_tokens":8,"messages":[{"role":"user","content":"a prompt of some length"}]}"#;
    let refusal = loop {
        let reply = call(&sidecar, Some(KEY), body).await;
        if reply.status == 402 {
            break reply.json();
        }
        assert_eq!(reply.status, 200, "{}", reply.body);
    };
    let spent = micros(&key_info(&sidecar).await["data"]["usage"]);
    let remaining = micros(&refusal["error"]["metadata"]["remaining"]);
    let reservation = micros(&refusal["error"]["metadata"]["reservation"]);
    assert_eq!(remaining, 1_000_000 - spent, "no credit is held after settling: {refusal}");
    assert!(remaining < reservation, "refused only when the credit does not cover it: {refusal}");
    // The amounts are numbers, as in /api/v1/key, and the message says when credit comes back:
    // a monthly budget's, on the first of next month.
    let metadata = &refusal["error"]["metadata"];
    assert!(metadata["remaining"].is_number() && metadata["reservation"].is_number(), "{refusal}");
    let resets_at = metadata["resets_at"].as_str().unwrap_or_else(|| panic!("{refusal}"));
    assert!(resets_at.ends_with("-01T00:00:00Z"), "{resets_at}");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(message.ends_with(&format!("; the credit resets at {resets_at}.")), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_models_and_rate_limits_are_enforced() {
    let extra = "rateLimit: {requestsPerMinute: 3}";
    let sidecar = Sidecar::start(&config("100", extra, "", "0", ""));
    let ask = |model: &str| format!(r#"{{"model":"{model}","max_tokens":8}}"#);

    let reply = call(&sidecar, None, &ask("chat")).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"]["code"], "missing_api_key");
    let reply = call(&sidecar, Some("sk-wrong"), &ask("chat")).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"]["code"], "invalid_api_key");
    assert_eq!(call(&sidecar, None, &ask("open")).await.status, 200, "a route no budget covers stays open");

    let reply = call(&sidecar, Some(KEY), &ask("open")).await;
    assert_eq!(reply.status, 403, "the key may use only chat: {}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "model_not_allowed");

    for remaining in ["2", "1", "0"] {
        let reply = call(&sidecar, Some(KEY), &ask("chat")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-ratelimit-limit"), "3");
        assert_eq!(reply.header("x-ratelimit-remaining"), remaining);
    }
    let reply = call(&sidecar, Some(KEY), &ask("chat")).await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(reply.header("x-ratelimit-remaining"), "0");
    let retry: u64 = reply.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(reply.header("x-ratelimit-reset"), reply.header("retry-after"));

    // --require-key closes the routes no budget covers, too.
    let strict = Sidecar::start_with(&config("100", "", "", "0", ""), &["--require-key"], &[]);
    assert_eq!(call(&strict, None, &ask("open")).await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_per_minute_limit_the_next_request() {
    let sidecar = Sidecar::start(&config("100", "rateLimit: {tokensPerMinute: 5}", "", "0", ""));
    assert_eq!(call(&sidecar, Some(KEY), r#"{"model":"chat"}"#).await.status, 200, "8+ tokens used");
    let reply = call(&sidecar, Some(KEY), r#"{"model":"chat"}"#).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("x-ratelimit-limit"), "5");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_carry_the_cost_in_their_usage_chunk_only_when_asked() {
    let sidecar = Sidecar::start(&config("100", "", "", "0", ""));
    let stream = |body| stream_events(&sidecar, body);
    let spent = || async { micros(&key_info(&sidecar).await["data"]["usage"]) };

    // The sidecar asks the provider for usage to bill exactly, and drops that chunk for a caller
    // that did not ask for it.
    let events = stream(r#"{"model":"chat","stream":true}"#).await;
    assert!(!events.iter().any(|e| e.contains("\"usage\"")), "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(spent().await, 8000, "billed from the provider's usage: 8 tokens");

    let events = stream(r#"{"model":"chat","stream":true,"stream_options":{"include_usage":true}}"#).await;
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 8, "{usage}");
    assert_eq!(usage["usage"]["cost"], serde_json::json!(0.008));
    assert_eq!(spent().await, 16_000);

    // Without a budget the cost is still reported to a caller who asked for usage.
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"open"}"#).await;
    assert_eq!(reply.json()["usage"]["cost"], serde_json::json!(0), "the open route is free");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_usage_from_the_provider_the_cost_is_estimated_and_counted() {
    let sidecar = Sidecar::start(&config("100", "", "", "0", "&usage=never"));
    let events = stream_events(&sidecar, r#"{"model":"chat","stream":true}"#).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    // "Hello from the Sideyard mock provider, all good." is 48 bytes: 12 tokens at 4 bytes each.
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), 12_000);
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_budget_estimated_costs_total{budget="default/team-a"}"#), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_outgrows_the_budget_ends_with_a_typed_error() {
    // 200 words, no max_tokens; the route reserves 8 completion tokens, then more as it streams.
    // The limit pays for 0.02 / 0.001 = 20 tokens.
    let sidecar = Sidecar::start(&config("0.02", "", "reservedCompletionTokens: 8", "0", "&chunks=200"));
    let events = stream_events(&sidecar, r#"{"model":"chat","stream":true}"#).await;
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "insufficient_credits", "{events:?}");
    assert_eq!(last["error"]["type"], "insufficient_credits");
    assert_eq!(last["choices"][0]["finish_reason"], "error");
    assert!(events.len() > 10 && events.len() < 40, "it ran until the credit was used: {} events", events.len());
    let key = key_info(&sidecar).await;
    let spent = micros(&key["data"]["usage"]);
    // At most the last chunk's tokens over the limit (see docs/budgets.md).
    assert!((18_000..=22_000).contains(&spent), "{key}");
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_budget_reservations_in_flight{budget="default/team-a"}"#), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_read_whole_during_hold_back_counts_its_output_once() {
    // The answer ("Hello there", 11 bytes: 3 tokens at most) and its usage (2 tokens) come in one
    // read, before hold-back ends. The reservation covers 3 tokens and the limit nothing more:
    // counting the output twice would take 6 and cut the stream for want of credit.
    let up = ScriptedUpstream::start().await;
    let target = format!(
        "{{name: up, api: openai, baseUrl: '{}', pricing: {{prompt: '0', completion: '1000'}}}}",
        up.url("openai-whole-text")
    );
    let route = route_yaml("chat", "reservedCompletionTokens: 3", &[&target]);
    let sidecar = Sidecar::start(&(route + &budget_yaml("team-a", KEY, "limit: \"0.003\"")));
    let events = stream_events(&sidecar, r#"{"model":"chat","stream":true}"#).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    assert!(!events.iter().any(|e| e.contains("insufficient_credits")), "{events:?}");
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), 2000, "billed from the usage: 2 tokens");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_team_limit_holds_across_its_keys_and_the_refusal_names_the_team() {
    // A team budget with no key of its own, above three keys of 1 each: the team's 0.05 pays
    // for six answers of 0.008 (8 tokens at 0.001), whichever keys ask.
    let team =
        "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {name: team}\nspec: {limit: \"0.05\"}\n";
    let keys = ["sk-team-0", "sk-team-1", "sk-team-2"];
    let mut yaml = config("1", "", "", "0", "")
        .replace(&budget_yaml("team-a", KEY, "limit: \"1\"\n  allowedModels: [chat]\n  "), "");
    yaml += team;
    for (i, key) in keys.iter().enumerate() {
        yaml += &budget_yaml(&format!("key-{i}"), key, "limit: \"1\"\n  parent: team");
    }
    let sidecar = Sidecar::start(&yaml);
    let ask = r#"{"model":"chat","max_tokens":8}"#;
    let mut served = 0;
    let mut refusal = None;
    for i in 0..10 {
        let reply = call(&sidecar, Some(keys[i % 3]), ask).await;
        match reply.status.as_u16() {
            200 => served += 1,
            402 => {
                refusal = Some(reply.json());
                break;
            }
            other => panic!("{other}: {}", reply.body),
        }
    }
    assert_eq!(served, 6, "the team's limit, not the keys', ran out");
    let refusal = refusal.expect("a refusal once the team's credit is spent");
    assert_eq!(refusal["error"]["metadata"]["budget"], "default/team", "{refusal}");
    assert_eq!(refusal["error"]["metadata"]["remaining"], serde_json::json!(0.002), "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("Insufficient credits in default/team, a budget above this key's:"), "{message}");
    // Every key is refused now, and each key's own figures count only its answers.
    for key in keys {
        assert_eq!(call(&sidecar, Some(key), ask).await.status, 402);
        let reply = read(send_as(sidecar.api, Some(key), "GET", "/api/v1/key", "").await).await;
        assert_eq!(micros(&reply.json()["data"]["usage"]), 16_000, "two answers each: {}", reply.body);
        let parents = &reply.json()["data"]["parents"];
        assert_eq!(parents[0]["label"], "default/team", "{}", reply.body);
        assert_eq!(micros(&parents[0]["limit_remaining"]), 2_000, "{}", reply.body);
        assert_eq!(parents[0]["state"], "Active", "{}", reply.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn top_ups_move_credit_from_the_team_until_the_period_maximum_or_the_team_runs_out() {
    let team = |limit: &str| {
        format!(
            "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {{name: team}}\nspec: {{limit: \"{limit}\"}}\n"
        )
    };
    let base = config("1", "", "", "0", "")
        .replace(&budget_yaml("team-a", KEY, "limit: \"1\"\n  allowedModels: [chat]\n  "), "");
    // A key of 0.01, topped up by 0.01 whenever less than 0.008 (one answer) would be left, at
    // most 0.02 a period: three answers of 0.008 in all.
    let top_up =
        "limit: \"0.01\"\n  parent: team\n  topUp: {threshold: \"0.008\", amount: \"0.01\", maxPerPeriod: \"0.02\"}";
    let answers = |sidecar: &Sidecar| {
        let sidecar_api = sidecar.api;
        async move {
            let mut statuses = Vec::new();
            for _ in 0..6 {
                let reply = read(
                    send_as(
                        sidecar_api,
                        Some(KEY),
                        "POST",
                        "/v1/chat/completions",
                        r#"{"model":"chat","max_tokens":8}"#,
                    )
                    .await,
                )
                .await;
                statuses.push(reply.status.as_u16());
                if reply.status != 200 {
                    return (statuses, reply.json());
                }
            }
            (statuses, serde_json::Value::Null)
        }
    };

    let rich = Sidecar::start(&format!("{base}{}{}", team("1"), budget_yaml("key", KEY, top_up)));
    let (statuses, refusal) = answers(&rich).await;
    assert_eq!(statuses, [200, 200, 200, 402], "the period's maximum stops the top-ups");
    assert_eq!(refusal["error"]["metadata"]["budget"], serde_json::Value::Null, "the key's own limit: {refusal}");
    let info = key_info(&rich).await;
    assert_eq!(micros(&info["data"]["topped_up"]), 20_000, "{info}");
    assert_eq!(micros(&info["data"]["limit_remaining"]), 6_000, "0.01 + 0.02 - 0.024: {info}");
    assert_eq!(micros(&info["data"]["parents"][0]["usage"]), 24_000, "the team paid for every answer: {info}");
    let metrics = get(rich.admin, "/metrics").await.body;
    assert!(metrics.contains("sideyard_budget_topped_up{budget=\"default/key\"} 0.02"), "{metrics}");

    // A team of 0.02: the key is topped up while the team has credit, and the team's limit holds.
    let poor = Sidecar::start(&format!("{base}{}{}", team("0.02"), budget_yaml("key", KEY, top_up)));
    let (statuses, refusal) = answers(&poor).await;
    assert_eq!(statuses, [200, 200, 402], "{refusal}");
    assert_eq!(refusal["error"]["metadata"]["budget"], "default/team", "{refusal}");
    let info = key_info(&poor).await;
    assert_eq!(micros(&info["data"]["parents"][0]["usage"]), 16_000, "{info}");
    assert!(micros(&info["data"]["topped_up"]) <= 20_000, "never more than the team had: {info}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_labelled_secret_is_a_key_of_the_template_and_losing_its_label_revokes_it() {
    let base = config("1", "", "", "0", "")
        .replace(&budget_yaml("team-a", KEY, "limit: \"1\"\n  allowedModels: [chat]\n  "), "");
    let template = "---\napiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {name: bots}\nspec:\n  keys: {secretSelector: {matchLabels: {sideyard.dev/key: bots}}}\n  limit: \"0.02\"\n";
    let secret = |name: &str, key: &str, labelled: bool| {
        let labels = if labelled { ", labels: {sideyard.dev/key: bots}" } else { "" };
        format!("---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}{labels}}}\nstringData: {{key: {key}}}\n")
    };
    let files = |carol_labelled: bool| {
        format!(
            "{base}{template}{}{}{}",
            secret("alice", "sk-alice", true),
            secret("bob", "sk-bob", true),
            secret("carol", "sk-carol", carol_labelled)
        )
    };
    let sidecar = Sidecar::start(&files(false));
    let ask = r#"{"model":"chat","max_tokens":8}"#;
    for key in ["sk-alice", "sk-bob"] {
        assert_eq!(call(&sidecar, Some(key), ask).await.status, 200, "{key}");
        let info = read(send_as(sidecar.api, Some(key), "GET", "/api/v1/key", "").await).await.json();
        let name = key.trim_start_matches("sk-");
        assert_eq!(info["data"]["label"], format!("default/bots:{name}"), "each key is tracked apart: {info}");
        assert_eq!(micros(&info["data"]["usage"]), 8_000, "{info}");
        assert_eq!(micros(&info["data"]["limit"]), 20_000, "the template's terms: {info}");
    }
    assert_eq!(call(&sidecar, Some("sk-carol"), ask).await.status, 401, "an unlabelled Secret is no key");

    // Labelling carol's Secret issues her key; taking alice's label away revokes hers.
    let relabelled = files(true).replacen(", labels: {sideyard.dev/key: bots}", "", 1);
    let tmp = sidecar.config_path.with_extension("tmp");
    std::fs::write(&tmp, relabelled).unwrap();
    std::fs::rename(&tmp, &sidecar.config_path).unwrap();
    eventually("carol's key works", || async { call(&sidecar, Some("sk-carol"), ask).await.status == 200 }).await;
    assert_eq!(call(&sidecar, Some("sk-alice"), ask).await.status, 401);
    assert_eq!(call(&sidecar, Some("sk-bob"), ask).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_load_keeps_settled_spend_and_no_reservation() {
    let dir = temp_dir("crash");
    let yaml = config("1000", "", "", "0", "");
    let mut sidecar = Sidecar::start_in(dir.clone(), &yaml, &[], &[]);
    let body = r#"{"model":"chat","max_tokens":8}"#;
    for _ in 0..20 {
        assert_eq!(call(&sidecar, Some(KEY), body).await.status, 200);
    }
    let before = micros(&key_info(&sidecar).await["data"]["usage"]);
    assert_eq!(before, 20 * 8000);
    wait_until_saved(&sidecar).await;

    let load: Vec<_> = (0..50)
        .map(|_| {
            let api = sidecar.api;
            tokio::spawn(async move {
                let request = http::Request::post(format!("http://{api}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {KEY}"))
                    .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"model":"chat","max_tokens":8}"#)))
                    .unwrap();
                let client =
                    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
                client.request(request).await.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        })
        .collect();
    // Kill it in the middle of the load: once some of it is settled.
    eventually("part of the load is answered", || async {
        micros(&key_info(&sidecar).await["data"]["usage"]) > before
    })
    .await;
    sidecar.process.child.kill().unwrap(); // SIGKILL
    sidecar.process.child.wait().unwrap();
    let mut answered = 0;
    for r in load {
        if r.await.unwrap() == 200 {
            answered += 1;
        }
    }

    let sidecar = Sidecar::start_in(dir, &yaml, &[], &[]);
    let after = micros(&key_info(&sidecar).await["data"]["usage"]);
    assert!(after >= before, "settled spend survived: {after} >= {before}");
    assert!(after <= before + answered * 8000, "nothing counted twice: {after}, {answered} answered in the crash");
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_budget_reservations_in_flight{budget="default/team-a"}"#), 0, "none stuck");
    assert_eq!(call(&sidecar, Some(KEY), body).await.status, 200);
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), after + 8000);
}

/// Waits until every settled answer's spend is on disk.
async fn wait_until_saved(sidecar: &Sidecar) {
    eventually("settled spend is on disk", || async {
        metric(&get(sidecar.admin, "/metrics").await.body, "sideyard_ledger_unsaved_settlements") == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_record_in_the_journal_is_skipped_reported_and_kept_aside() {
    let dir = temp_dir("damaged");
    let yaml = config("1000", "", "", "0", "");
    let body = r#"{"model":"chat","max_tokens":8}"#;
    let mut sidecar = Sidecar::start_in(dir.clone(), &yaml, &[], &[]);
    for _ in 0..2 {
        // One request, one commit: two records, each with the budget's whole spend.
        assert_eq!(call(&sidecar, Some(KEY), body).await.status, 200);
        wait_until_saved(&sidecar).await;
    }
    sidecar.process.terminate();
    assert!(sidecar.process.wait_exit().success());

    // Damage inside the first record (past the 8-byte magic and its 12-byte head).
    let journal = dir.join("state/ledger.journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes[8 + 12 + 3] ^= 0xff;
    std::fs::write(&journal, &bytes).unwrap();

    let sidecar = Sidecar::start_in(dir.clone(), &yaml, &[], &[]);
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), 16_000, "the later record still counts");
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, "sideyard_ledger_journal_damaged_regions"), 1);
    assert!(metric(&metrics, "sideyard_ledger_journal_damaged_bytes") > 0);
    let log = sidecar.process.log();
    assert!(log.contains("the ledger journal is damaged here"), "{log}");
    let copies: Vec<_> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.starts_with("ledger.journal.damaged-"))
        .collect();
    assert_eq!(copies.len(), 1, "a copy of the damaged journal is kept");
    assert_eq!(std::fs::read(dir.join("state").join(&copies[0])).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_endpoint_speaks_openrouters_shape() {
    let sidecar = Sidecar::start(&config("2.5", "lowBalanceThreshold: \"2.495\"\n  period: daily", "", "0", ""));
    assert_eq!(call(&sidecar, Some(KEY), r#"{"model":"chat","max_tokens":8}"#).await.status, 200);
    let data = key_info(&sidecar).await["data"].clone();
    assert_eq!(data["label"], "default/team-a");
    assert_eq!(data["limit"], serde_json::json!(2.5));
    assert_eq!(data["limit_reset"], "daily");
    assert_eq!(data["limit_remaining"], serde_json::json!(2.492));
    for field in ["usage", "usage_daily", "usage_weekly", "usage_monthly"] {
        assert_eq!(data[field], serde_json::json!(0.008), "{field}");
    }
    assert_eq!(data["is_free_tier"], false);
    assert_eq!(data["state"], "Low", "under the low-balance threshold");
    let reply = get(sidecar.api, "/api/v1/key").await;
    assert_eq!(reply.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_example_meters_and_refuses() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/budget.yaml")).unwrap();
    let sidecar = Sidecar::start(&example);
    let body = r#"{"model":"metered","max_tokens":8}"#;
    let mut statuses = Vec::new();
    for _ in 0..13 {
        statuses.push(call(&sidecar, Some("sk-demo-key"), body).await.status.as_u16());
    }
    assert_eq!(statuses, [[200; 12].as_slice(), &[402]].concat(), "as the example's comment says");
    assert_eq!(call(&sidecar, None, body).await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_timeouts_and_hang_ups_release_their_reservation_at_once() {
    let budget = budget_yaml("team-a", KEY, "limit: '10'");
    let target = |url: &str, extra: &str| {
        format!("{{name: t, api: mock, baseUrl: '{url}', pricing: {{completion: '1000'}}{extra}}}")
    };
    let config = [
        route_yaml("failing", "", &[&target("mock://local?fail-rate=1", "")]),
        route_yaml("hanging", "", &[&target("mock://local?hang", ", timeouts: {connect: 100ms, firstByte: 200ms}")]),
        route_yaml("slow", "", &[&target("mock://local?chunks=1000&chunk-interval=20ms", "")]),
        budget,
    ]
    .concat();
    let sidecar = Sidecar::start(&config);
    let in_flight = || async {
        let m = get(sidecar.admin, "/metrics").await.body;
        metric(&m, r#"sideyard_budget_reservations_in_flight{budget="default/team-a"}"#)
    };

    assert_eq!(call(&sidecar, Some(KEY), r#"{"model":"failing"}"#).await.status, 502);
    assert_eq!(call(&sidecar, Some(KEY), r#"{"model":"hanging"}"#).await.status, 504);
    assert_eq!(in_flight().await, 0);
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), 0, "nothing answered, nothing spent");

    let response =
        send_as(sidecar.api, Some(KEY), "POST", "/v1/chat/completions", r#"{"model":"slow","stream":true}"#).await;
    let mut body = response.into_body();
    next_chunk(&mut body).await.expect("the stream started");
    assert_eq!(in_flight().await, 1);
    drop(body); // the caller hangs up
    eventually("the reservation is released", || async { in_flight().await == 0 }).await;
    let spent = micros(&key_info(&sidecar).await["data"]["usage"]);
    assert!(spent > 0 && spent < 1_000_000, "the words streamed so far are paid for, not the whole answer: {spent}");
}

/// The same configuration with its targets speaking Anthropic's Messages API.
fn anthropic(config: String) -> String {
    config.replace("api: mock", "api: anthropic")
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_translated_from_anthropic_are_metered_like_any_other() {
    let sidecar = Sidecar::start(&anthropic(config("100", "", "", "0", "")));
    let hi = r#""messages":[{"role":"user","content":"hi"}]"#;
    let reply = call(&sidecar, Some(KEY), &format!(r#"{{"model":"chat",{hi}}}"#)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["usage"]["cost"], serde_json::json!(0.008), "8 words at 0.001");
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), 8000);

    let body = format!(r#"{{"model":"chat",{hi},"stream":true,"stream_options":{{"include_usage":true}}}}"#);
    let events = stream_events(&sidecar, &body).await;
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["cost"], serde_json::json!(0.008), "{usage}");
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), 16_000);

    let events = stream_events(&sidecar, &format!(r#"{{"model":"chat",{hi},"stream":true}}"#)).await;
    assert!(!events.iter().any(|e| e.contains("\"usage\"")), "asked for by the sidecar only: {events:?}");
    assert_eq!(micros(&key_info(&sidecar).await["data"]["usage"]), 24_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_translated_stream_that_outgrows_the_budget_ends_with_a_typed_error() {
    // Anthropic is sent max_tokens 200 (reservedCompletionTokens); 200 words estimate at about 310
    // tokens, and the limit pays for 250.
    let config = config("0.25", "", "reservedCompletionTokens: 200", "0", "&chunks=200");
    let sidecar = Sidecar::start(&anthropic(config));
    let events =
        stream_events(&sidecar, r#"{"model":"chat","messages":[{"role":"user","content":"hi"}],"stream":true}"#).await;
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "insufficient_credits", "{events:?}");
    assert!(!events.contains(&"[DONE]".to_string()));
    let spent = micros(&key_info(&sidecar).await["data"]["usage"]);
    assert!((240_000..=260_000).contains(&spent), "{spent}");
}
