//! Routing intelligence against scripted outages: ejection and the half-open probe, recovery,
//! retry hints, panic mode, request preferences, context fit, hold-back and hedging. Assertions
//! are about counts and contents; waits are bounded only to turn hangs into failures.

mod common;

use std::sync::atomic::Ordering;

use common::*;

fn ask(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

async fn metrics_of(sidecar: &Sidecar) -> String {
    get(sidecar.admin, "/metrics").await.body
}

fn two_targets(model: &str, spec: &str, primary: &str, backup: &str) -> String {
    route_yaml(
        model,
        spec,
        &[&format!("{{name: primary, baseUrl: \"{primary}\"}}"), &format!("{{name: backup, baseUrl: \"{backup}\"}}")],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ejected_target_gets_no_requests_during_its_ejection() {
    let up = ScriptedUpstream::start().await;
    up.down.store(true, Ordering::Relaxed);
    let config = two_targets(
        "chat",
        "health: {consecutiveFailures: 3, baseEjection: 1h, maxEjection: 2h}",
        &up.url("switch"),
        &up.url("ok/backup"),
    );
    let sidecar = Sidecar::start(&config);
    for i in 0..10 {
        let reply = post(sidecar.api, "/v1/chat/completions", &ask("chat")).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-target"), "backup");
        assert_eq!(reply.header("x-sideyard-config-version"), "", "standalone files have no version");
        if i < 3 {
            assert_eq!(reply.header("x-sideyard-attempts"), "2");
            assert_eq!(reply.header("x-sideyard-fallback-reason"), "5xx");
        } else {
            assert_eq!(reply.header("x-sideyard-attempts"), "1", "the ejected primary is skipped, not tried");
            assert_eq!(reply.header("x-sideyard-fallback-reason"), "");
        }
    }
    assert_eq!(up.hits("switch"), 3, "exactly the failures that ejected it");
    assert_eq!(up.hits("ok/backup"), 10);

    let metrics = metrics_of(&sidecar).await;
    let labels = r#"route="default/chat",target="primary""#;
    assert_eq!(metric(&metrics, &format!("sideyard_ejections_total{{{labels}}}")), 1);
    assert_eq!(metric(&metrics, &format!("sideyard_target_health{{{labels},state=\"ejected\"}}")), 1);
    assert_eq!(metric(&metrics, &format!("sideyard_upstream_outcomes_total{{{labels},outcome=\"5xx\"}}")), 3);
    let models = get(sidecar.api, "/v1/models").await.json();
    let targets = &models["data"][0]["sideyard"]["targets"];
    assert_eq!(targets[0]["health"], "ejected", "{models}");
    assert_eq!(targets[1]["health"], "healthy");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_probe_at_a_time_then_recovery() {
    let up = ScriptedUpstream::start().await;
    let config = two_targets(
        "chat",
        "health: {consecutiveFailures: 2, baseEjection: 300ms, maxEjection: 1h}",
        &up.url("gated-503"),
        &up.url("ok/backup"),
    );
    let sidecar = Sidecar::start(&config);
    up.gate.add_permits(2);
    for _ in 0..2 {
        assert_eq!(post(sidecar.api, "/v1/chat/completions", &ask("chat")).await.status, 200);
    }
    assert_eq!(up.hits("gated-503"), 2);
    eventually("the ejection ends", || async {
        get(sidecar.api, "/v1/models").await.json()["data"][0]["sideyard"]["targets"][0]["health"] == "half-open"
    })
    .await;

    // Ten requests at once: one probes the primary, whose answer waits until the other nine are
    // served; they skip it while the probe is in flight.
    let mut requests: Vec<_> = (0..10)
        .map(|_| {
            let api = sidecar.api;
            tokio::spawn(async move { post(api, "/v1/chat/completions", &ask("chat")).await })
        })
        .collect();
    let mut served = 0;
    while served < 9 {
        let done = requests.iter().position(|r| r.is_finished());
        match done {
            Some(i) => {
                let reply = requests.swap_remove(i).await.unwrap();
                assert_eq!((reply.status.as_u16(), reply.header("x-sideyard-target")), (200, "backup"));
                served += 1;
            }
            None => eventually("a request is served", || async { requests.iter().any(|r| r.is_finished()) }).await,
        }
    }
    assert_eq!(up.hits("gated-503"), 3, "exactly one probe");
    up.gate.add_permits(1);
    let probe = requests.pop().unwrap().await.unwrap();
    assert_eq!((probe.status.as_u16(), probe.header("x-sideyard-target")), (200, "backup"), "the probe fell back");
    let metrics = metrics_of(&sidecar).await;
    assert_eq!(metric(&metrics, r#"sideyard_ejections_total{route="default/chat",target="primary"}"#), 2, "re-ejected");

    // A target that comes back: the ejection ends, a probe succeeds, traffic returns.
    let up2 = ScriptedUpstream::start().await;
    up2.down.store(true, Ordering::Relaxed);
    let config = two_targets(
        "chat",
        "health: {consecutiveFailures: 1, baseEjection: 200ms, maxEjection: 1h}",
        &up2.url("switch"),
        &up2.url("ok/backup"),
    );
    let sidecar = Sidecar::start(&config);
    assert_eq!(post(sidecar.api, "/v1/chat/completions", &ask("chat")).await.header("x-sideyard-target"), "backup");
    up2.down.store(false, Ordering::Relaxed);
    eventually("the primary serves again", || async {
        post(sidecar.api, "/v1/chat/completions", &ask("chat")).await.header("x-sideyard-target") == "primary"
    })
    .await;
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("chat")).await;
    assert_eq!((reply.header("x-sideyard-target"), reply.header("x-sideyard-attempts")), ("primary", "1"));
    let models = get(sidecar.api, "/v1/models").await.json();
    assert_eq!(models["data"][0]["sideyard"]["targets"][0]["health"], "healthy");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_hint_too_large_for_a_duration_still_gets_the_caller_an_answer() {
    let up = ScriptedUpstream::start().await;
    let config = [
        two_targets("huge", "", &up.url("ratelimit-after-1e20"), &up.url("ok/huge")),
        route_yaml("alone", "", &[&format!("{{name: only, baseUrl: \"{}\"}}", up.url("ratelimit-after-1e20/alone"))]),
    ]
    .concat();
    let sidecar = Sidecar::start(&config);
    for stream in [false, true] {
        let reply =
            post(sidecar.api, "/v1/chat/completions", &format!(r#"{{"model":"huge","stream":{stream}}}"#)).await;
        assert_eq!(reply.status, 200, "stream {stream}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-target"), "backup");
        let reply =
            post(sidecar.api, "/v1/chat/completions", &format!(r#"{{"model":"alone","stream":{stream}}}"#)).await;
        // Nothing left to fall back to: the caller's 429, naming the provider's (never a reset),
        // its Retry-After believed up to maxEjection (5m).
        assert_eq!(reply.status, 429, "stream {stream}: {}", reply.body);
        assert_eq!(reply.header("retry-after"), "300");
        assert_eq!(reply.json()["error"]["metadata"]["previous_errors"][0]["status"], 429, "{}", reply.body);
    }
    let metrics = metrics_of(&sidecar).await;
    assert_eq!(metric(&metrics, r#"sideyard_cooldowns_total{route="default/huge",target="primary"}"#), 1);
    let models = get(sidecar.api, "/v1/models").await.json();
    assert_eq!(models["data"][0]["sideyard"]["targets"][0]["health"], "cooling", "{models}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_hints_cool_a_target_down_without_ejecting_it() {
    let up = ScriptedUpstream::start().await;
    let config = [
        two_targets("long", "health: {consecutiveFailures: 1}", &up.url("ratelimit-after-30"), &up.url("ok/long")),
        two_targets("short", "health: {consecutiveFailures: 1}", &up.url("ratelimit-ms-200"), &up.url("ok/short")),
    ]
    .concat();
    let sidecar = Sidecar::start(&config);
    for _ in 0..5 {
        let reply = post(sidecar.api, "/v1/chat/completions", &ask("long")).await;
        assert_eq!((reply.status.as_u16(), reply.header("x-sideyard-target")), (200, "backup"));
    }
    assert_eq!(up.hits("ratelimit-after-30"), 1, "Retry-After: 30 keeps it out");
    let metrics = metrics_of(&sidecar).await;
    let labels = r#"route="default/long",target="primary""#;
    assert_eq!(metric(&metrics, &format!("sideyard_cooldowns_total{{{labels}}}")), 1);
    assert_eq!(metric(&metrics, &format!("sideyard_ejections_total{{{labels}}}")), 0, "not a health failure");
    assert_eq!(metric(&metrics, &format!("sideyard_target_health{{{labels},state=\"cooling\"}}")), 1);

    assert_eq!(post(sidecar.api, "/v1/chat/completions", &ask("short")).await.status, 200);
    eventually("the short cool-down ends and the target is asked again", || async {
        post(sidecar.api, "/v1/chat/completions", &ask("short")).await;
        up.hits("ratelimit-ms-200") >= 2
    })
    .await;
    let metrics = metrics_of(&sidecar).await;
    assert_eq!(metric(&metrics, r#"sideyard_ejections_total{route="default/short",target="primary"}"#), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn panic_mode_tries_the_target_that_recovers_soonest() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "chat",
        "health: {consecutiveFailures: 1, baseEjection: 1h, maxEjection: 2h}",
        &[
            &format!("{{name: first, baseUrl: \"{}\"}}", up.url("status-500/first")),
            &format!("{{name: second, baseUrl: \"{}\"}}", up.url("status-500/second")),
        ],
    );
    let sidecar = Sidecar::start(&config);
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("chat")).await;
    assert_eq!(reply.status, 502, "both fail and both are ejected, first before second");
    assert_eq!((up.hits("status-500/first"), up.hits("status-500/second")), (1, 1));

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("chat")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("x-sideyard-target"), "first", "its ejection ends soonest");
    assert_eq!((up.hits("status-500/first"), up.hits("status-500/second")), (2, 1));
    assert_eq!(metric(&metrics_of(&sidecar).await, r#"sideyard_panic_routing_total{route="default/chat"}"#), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_preferences_choose_and_exclude_targets() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "chat",
        "",
        &[
            &format!(
                "{{name: a, provider: OpenAI, baseUrl: \"{}\", pricing: {{prompt: '5', completion: '15'}}}}",
                up.url("ok/a")
            ),
            &format!("{{name: b, baseUrl: \"{}\", pricing: {{prompt: '1', completion: '2'}}}}", up.url("ok/b")),
            &format!("{{name: c, baseUrl: \"{}\", pricing: {{prompt: '3', completion: '4'}}}}", up.url("status-503/c")),
        ],
    );
    let sidecar = Sidecar::start(&config);
    let served = |provider: &'static str| {
        let api = sidecar.api;
        async move {
            let body = format!(r#"{{"model":"chat","provider":{provider}}}"#);
            let reply = post(api, "/v1/chat/completions", &body).await;
            (reply.status.as_u16(), reply.header("x-sideyard-target").to_string(), reply.json())
        }
    };

    assert_eq!(served(r#"{"order":["c","b"]}"#).await.1, "b", "c first, fails, then b");
    assert_eq!(served(r#"{"only":["openai"]}"#).await.1, "a", "provider labels match, case-insensitively");
    assert_eq!(served(r#"{"ignore":["a"]}"#).await.1, "b");
    assert_eq!(served(r#"{"sort":"price"}"#).await.1, "b", "cheapest");
    assert_eq!(served(r#"{"max_price":{"prompt":2}}"#).await.1, "b");
    let (status, target, body) = served(r#"{"order":["c"],"allow_fallbacks":false}"#).await;
    assert_eq!((status, target.as_str()), (502, "c"), "no fallback beyond the ordered providers: {body}");

    let (status, _, body) = served(r#"{"only":["b"],"max_price":{"completion":1.5}}"#).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "no_available_target");
    assert_eq!(body["error"]["metadata"]["excluded_by"], serde_json::json!(["provider.only", "provider.max_price"]));

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"chat","provider":{"sort":"random"}}"#).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "invalid_parameter");
    assert!(reply.json()["error"]["message"].as_str().unwrap().starts_with("provider.sort: "));
}

#[tokio::test(flavor = "multi_thread")]
async fn models_fall_back_to_the_next_route_and_say_which_answered() {
    let up = ScriptedUpstream::start().await;
    let config = [
        route_yaml("primary", "", &[&format!("{{name: down, baseUrl: \"{}\"}}", up.url("status-500/p"))]),
        route_yaml(
            "secondary",
            "",
            &[&format!("{{name: up, baseUrl: \"{}\", model: upstream-model}}", up.url("ok/s"))],
        ),
        route_yaml(
            "streamy",
            "",
            &[&format!("{{name: up, baseUrl: \"{}\", model: upstream-model}}", up.url("sse-ok/s"))],
        ),
    ]
    .concat();
    let sidecar = Sidecar::start(&config);
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"primary","models":["secondary"]}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["model"], "secondary", "the model that answered, not the upstream's name");
    assert_eq!(reply.header("x-sideyard-attempts"), "2");

    let response =
        send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"primary","models":["streamy"],"stream":true}"#)
            .await;
    let events = sse_data(&rest(&mut response.into_body()).await);
    assert!(events[..events.len() - 1].iter().all(|e| e.contains("\"model\":\"streamy\"")), "{events:?}");

    let reply = post(
        sidecar.api,
        "/v1/chat/completions",
        r#"{"model":"primary","models":["secondary"],"provider":{"allow_fallbacks":false}}"#,
    )
    .await;
    assert_eq!(reply.status, 502, "allow_fallbacks: false keeps to the first model");
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"primary","models":["nope"]}"#).await;
    assert_eq!(reply.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_go_to_targets_whose_context_window_fits() {
    let up = ScriptedUpstream::start().await;
    let config = [
        route_yaml(
            "fit",
            "",
            &[
                &format!("{{name: small, baseUrl: \"{}\", contextWindow: 50}}", up.url("ok/small")),
                &format!("{{name: large, baseUrl: \"{}\", contextWindow: 100000}}", up.url("ok/large")),
            ],
        ),
        route_yaml(
            "upstream-says",
            "fallback: {when: [4xx-context-length]}",
            &[
                &format!("{{name: small, baseUrl: \"{}\"}}", up.url("context-400")),
                &format!("{{name: large, baseUrl: \"{}\"}}", up.url("ok/large2")),
            ],
        ),
    ]
    .concat();
    let sidecar = Sidecar::start(&config);
    let long = "word ".repeat(200);
    let reply = post(
        sidecar.api,
        "/v1/chat/completions",
        &format!(r#"{{"model":"fit","messages":[{{"role":"user","content":"{long}"}}]}}"#),
    )
    .await;
    assert_eq!((reply.status.as_u16(), reply.header("x-sideyard-target")), (200, "large"));
    assert_eq!(up.hits("ok/small"), 0, "skipped without an attempt");
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"fit","max_tokens":100000}"#).await;
    assert_eq!(reply.status, 404, "nothing fits a 100k-token answer: {}", reply.body);
    assert_eq!(reply.json()["error"]["metadata"]["excluded_by"], serde_json::json!(["context_length"]));

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("upstream-says")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-sideyard-fallback-reason"), "4xx-context-length");
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_back_turns_a_failure_before_the_first_token_into_an_invisible_fallback() {
    let up = ScriptedUpstream::start().await;
    let config = two_targets("chat", "holdBack: 5s", &up.url("sse-break-early"), &up.url("sse-ok/backup"));
    let sidecar = Sidecar::start(&config);
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"chat","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sideyard-target"], "backup");
    assert_eq!(response.headers()["x-sideyard-fallback-reason"], "connect");
    let text = rest(&mut response.into_body()).await;
    assert!(!text.contains("error"), "the caller never sees the first target's failure: {text}");
    assert_eq!(sse_data(&text).len(), 4, "the backup's whole stream: {text}");

    // Without hold-back the same failure reaches the caller, mid-stream.
    let config = two_targets("chat", "holdBack: 0s", &up.url("sse-break-early"), &up.url("sse-ok/backup2"));
    let sidecar = Sidecar::start(&config);
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"chat","stream":true}"#).await;
    assert_eq!(response.headers()["x-sideyard-target"], "primary");
    let text = rest(&mut response.into_body()).await;
    assert!(text.contains("\"finish_reason\":\"error\""), "{text}");
    assert_eq!(up.hits("sse-ok/backup2"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_back_is_bounded() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&route_yaml(
        "chat",
        "holdBack: 300ms",
        &[&format!("{{name: t, baseUrl: \"{}\"}}", up.url("sse-gated"))],
    ));
    // The upstream sends only part of its first event and waits for the gate, which stays shut:
    // the headers still arrive once hold-back runs out.
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"chat","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    up.gate.add_permits(10);
    assert_eq!(rest(&mut response.into_body()).await, GATED_EVENTS.concat());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hedge_wins_against_a_slow_primary_and_the_loser_is_cancelled() {
    let up = ScriptedUpstream::start().await;
    let config = [
        two_targets("streamy", "hedge: {after: 200ms}", &up.url("sse-slow-token"), &up.url("sse-ok/fast")),
        two_targets("whole", "hedge: {after: 200ms}", &up.url("latency-3000"), &up.url("ok/fast")),
    ]
    .concat();
    let sidecar = Sidecar::start(&config);

    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"streamy","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sideyard-target"], "backup");
    assert_eq!(response.headers()["x-sideyard-attempts"], "2");
    assert_eq!(response.headers()["x-sideyard-hedged"], "won", "the hedge answered, and says so");
    let text = rest(&mut response.into_body()).await;
    assert!(!text.contains("thinking") && text.contains("\"three\""), "only the winner's stream: {text}");
    eventually("the slow primary's connection is closed", || async {
        up.cancelled.lock().unwrap().contains(&"sse-slow-token".to_string())
    })
    .await;

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("whole")).await;
    assert_eq!((reply.status.as_u16(), reply.header("x-sideyard-target")), (200, "backup"));
    assert_eq!(reply.header("x-sideyard-hedged"), "won");

    let metrics = metrics_of(&sidecar).await;
    for route in ["streamy", "whole"] {
        assert_eq!(
            metric(&metrics, &format!("sideyard_hedges_total{{route=\"default/{route}\",result=\"started\"}}")),
            1
        );
        assert_eq!(metric(&metrics, &format!("sideyard_hedges_total{{route=\"default/{route}\",result=\"won\"}}")), 1);
    }
    // A cancelled hedge loser is no health failure.
    assert_eq!(metric(&metrics, r#"sideyard_ejections_total{route="default/streamy",target="primary"}"#), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_latency_strategy_learns_which_target_is_faster() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "chat",
        "strategy: latency",
        &[
            &format!("{{name: slow, baseUrl: \"{}\"}}", up.url("latency-150")),
            &format!("{{name: fast, baseUrl: \"{}\"}}", up.url("latency-1")),
        ],
    );
    let sidecar = Sidecar::start(&config);
    // Unknown targets are explored now and then; once both are measured (and the cached
    // quantiles refreshed, once a second), the fast one goes first.
    eventually("the fast target is measured and preferred", || async {
        let targets = get(sidecar.api, "/v1/models").await.json()["data"][0]["sideyard"]["targets"].clone();
        let measured = targets.as_array().unwrap().iter().all(|t| !t["time_to_first_token_p50_ms"].is_null());
        let first = post(sidecar.api, "/v1/chat/completions", &ask("chat")).await;
        measured && first.header("x-sideyard-target") == "fast"
    })
    .await;
    let before = up.hits("latency-150");
    for _ in 0..10 {
        assert_eq!(post(sidecar.api, "/v1/chat/completions", &ask("chat")).await.header("x-sideyard-target"), "fast");
    }
    assert_eq!(up.hits("latency-150"), before, "the slow target is not tried while the fast one answers");
    let metrics = metrics_of(&sidecar).await;
    assert!(
        metrics.contains(
            r#"sideyard_target_time_to_first_token_seconds{route="default/chat",target="fast",quantile="0.5"}"#
        )
    );
}
