//! Fallback: each failure reason falls back when it is listed in `fallback.when` and does not when it
//! is not; attempts are bounded; a stream never falls back once it has started.
//!
//! One sidecar process serves a route per case, against a scripted upstream on 127.0.0.1.

mod common;

use common::*;

/// One way for the first target to fail.
struct Case {
    name: &'static str,
    reason: &'static str,
    base_url: String,
    timeouts: &'static str,
    /// Status the caller sees when the reason is not listed.
    unlisted_status: u16,
    /// `x-sideyard-error-source` then.
    unlisted_source: &'static str,
}

const ALL_REASONS: [&str; 6] = ["connect", "timeout", "429", "5xx", "auth", "4xx"];

async fn cases(up: &ScriptedUpstream) -> Vec<Case> {
    let case = |name, reason, base_url: String, timeouts, status, source| Case {
        name,
        reason,
        base_url,
        timeouts,
        unlisted_status: status,
        unlisted_source: source,
    };
    vec![
        case("refused", "connect", format!("http://{}", closed_port()), "{}", 502, "proxy"),
        case("closed", "connect", format!("http://{}", closing_server().await), "{}", 502, "proxy"),
        case("reset-body", "connect", up.url("reset-json"), "{}", 502, "proxy"),
        case(
            "connect-timeout",
            "timeout",
            format!("https://{}", silent_server().await),
            "{connect: 200ms, firstByte: 5s, total: 10s}",
            504,
            "proxy",
        ),
        case("first-byte-timeout", "timeout", up.url("hang"), "{firstByte: 200ms}", 504, "proxy"),
        case(
            "total-timeout",
            "timeout",
            up.url("stall-json"),
            "{connect: 100ms, firstByte: 200ms, total: 400ms}",
            504,
            "proxy",
        ),
        case("too-many", "429", up.url("status-429"), "{}", 429, "upstream"),
        case("server-500", "5xx", up.url("status-500"), "{}", 500, "upstream"),
        case("server-503", "5xx", up.url("status-503"), "{}", 503, "upstream"),
        case("garbage", "5xx", up.url("garbage"), "{}", 502, "proxy"),
        case("bad-request", "4xx", up.url("status-400"), "{}", 400, "upstream"),
        case("unauthorized", "auth", up.url("status-401"), "{}", 502, "proxy"),
        case("forbidden", "auth", up.url("status-403"), "{}", 502, "proxy"),
    ]
}

fn route(model: &str, on: &[&str], bad_url: &str, timeouts: &str, good_url: &str) -> String {
    let on: Vec<String> = on.iter().map(|r| format!("{r:?}")).collect();
    route_yaml(
        model,
        &format!("fallback: {{when: [{}]}}", on.join(", ")),
        &[
            &format!("{{name: bad, baseUrl: \"{bad_url}\", model: bad-model, timeouts: {timeouts}}}"),
            &format!("{{name: good, baseUrl: \"{good_url}\", model: good-model}}"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn each_reason_falls_back_only_when_listed() {
    let up = ScriptedUpstream::start().await;
    let cases = cases(&up).await;
    let mut config = String::new();
    for c in &cases {
        // `4xx` covers `auth` too: it is left out where `auth` must not fall back.
        let others: Vec<&str> =
            ALL_REASONS.iter().copied().filter(|r| *r != c.reason && !(c.reason == "auth" && *r == "4xx")).collect();
        config += &route(
            &format!("{}-listed", c.name),
            &[c.reason],
            &c.base_url,
            c.timeouts,
            &up.url(&format!("ok/{}-listed", c.name)),
        );
        config += &route(
            &format!("{}-unlisted", c.name),
            &others,
            &c.base_url,
            c.timeouts,
            &up.url(&format!("ok/{}-unlisted", c.name)),
        );
    }
    let sidecar = Sidecar::start(&config);

    for c in &cases {
        let listed = format!("{}-listed", c.name);
        let reply =
            post(sidecar.api, "/v1/chat/completions", &format!(r#"{{"model":"{listed}","messages":[]}}"#)).await;
        assert_eq!(reply.status, 200, "{listed}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-target"), "good", "{listed}");
        assert_eq!(reply.header("x-sideyard-attempts"), "2", "{listed}");
        assert_eq!(reply.header("x-sideyard-fallback-reason"), c.reason, "{listed}");
        assert_eq!(reply.json()["model"], "good-model", "{listed}: the upstream model is spliced in");
        assert_eq!(up.hits(&format!("ok/{listed}")), 1, "{listed}");

        let unlisted = format!("{}-unlisted", c.name);
        let reply =
            post(sidecar.api, "/v1/chat/completions", &format!(r#"{{"model":"{unlisted}","messages":[]}}"#)).await;
        assert_eq!(reply.status, c.unlisted_status, "{unlisted}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-error-source"), c.unlisted_source, "{unlisted}");
        assert_eq!(reply.header("x-sideyard-target"), "bad", "{unlisted}");
        assert_eq!(reply.header("x-sideyard-attempts"), "1", "{unlisted}");
        assert_eq!(up.hits(&format!("ok/{unlisted}")), 0, "{unlisted}: must not fall back");
        assert_eq!(reply.header("x-sideyard-fallback-reason"), "", "{unlisted}: no fallback happened");
        if c.unlisted_source == "proxy" {
            let errors = &reply.json()["error"]["metadata"]["previous_errors"];
            assert_eq!(errors.as_array().unwrap().len(), 1, "{unlisted}: {errors}");
            assert_eq!(errors[0]["target"], "bad");
            assert_eq!(errors[0]["reason"], c.reason, "{unlisted}: {errors}");
        } else {
            // The upstream's own error passes through unchanged, with its headers.
            let code = c.unlisted_status;
            assert_eq!(reply.json()["error"]["message"], format!("upstream says {code}"), "{unlisted}");
            if code == 429 {
                assert_eq!(reply.header("retry-after"), "7");
            }
        }
    }

    let metrics = get(sidecar.admin, "/metrics").await.body;
    for c in &cases {
        let series = format!(
            "sideyard_fallbacks_total{{route=\"default/{}-listed\",target=\"bad\",reason=\"{}\"}}",
            c.name, c.reason
        );
        assert_eq!(metric(&metrics, &series), 1, "{series}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn attempts_are_bounded_and_every_failure_is_reported() {
    let up = ScriptedUpstream::start().await;
    let config = format!(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: bounded, namespace: team-a}}
spec:
  model: bounded
  fallback: {{maxAttempts: 2}}
  targets:
    - {{name: first, baseUrl: "{a}"}}
    - {{name: second, baseUrl: "{b}"}}
    - {{name: third, baseUrl: "{c}"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: slow-last, namespace: team-a}}
spec:
  model: slow-last
  targets:
    - {{name: first, baseUrl: "{d}"}}
    - {{name: second, baseUrl: "{e}", timeouts: {{firstByte: 200ms}}}}
"#,
        a = up.url("status-500"),
        b = up.url("status-429"),
        c = up.url("ok/third"),
        d = up.url("status-503"),
        e = up.url("hang"),
    );
    let sidecar = Sidecar::start(&config);

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"bounded"}"#).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-error-source"), "proxy");
    assert_eq!(reply.header("x-sideyard-attempts"), "2");
    assert_eq!(reply.header("x-sideyard-target"), "second");
    assert_eq!(up.hits("ok/third"), 0, "maxAttempts stops before the third target");
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "upstream_error");
    assert_eq!(error["code"], "upstream_failed");
    assert_eq!(
        error["metadata"]["previous_errors"],
        serde_json::json!([
            {"model": "bounded", "target": "first", "status": 500, "reason": "5xx", "message": "upstream answered 500: upstream says 500"},
            {"model": "bounded", "target": "second", "status": 429, "reason": "429", "message": "upstream answered 429: upstream says 429"},
        ])
    );
    assert!(error["message"].as_str().unwrap().contains("bounded"));

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"slow-last"}"#).await;
    assert_eq!(reply.status, 504, "the last attempt timed out: {}", reply.body);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "upstream_timeout");
    let previous = error["metadata"]["previous_errors"].as_array().unwrap();
    assert_eq!(previous.len(), 2);
    assert_eq!(previous[0]["reason"], "5xx");
    assert_eq!(previous[1]["reason"], "timeout");
    assert_eq!(previous[1]["status"], serde_json::Value::Null);
    assert_eq!(previous[1]["message"], "no response headers within the firstByte timeout of 200ms");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_never_falls_back_after_its_first_byte() {
    let up = ScriptedUpstream::start().await;
    let config = format!(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: streamy}}
spec:
  model: streamy
  fallback: {{when: [connect, timeout, "429", "5xx", "4xx"]}}
  targets:
    - {{name: breaks, baseUrl: "{a}"}}
    - {{name: spare, baseUrl: "{b}"}}
"#,
        a = up.url("sse-break"),
        b = up.url("sse-ok/spare"),
    );
    let sidecar = Sidecar::start(&config);
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"streamy","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sideyard-target"], "breaks");
    let mut body = response.into_body();
    let text = rest(&mut body).await;
    let events = sse_data(&text);
    assert_eq!(events.len(), 3, "two events, then the error event: {text}");
    assert!(events[0].contains("\"one\"") && events[1].contains("\"two\""), "{text}");
    assert!(!text.contains("choi\n"), "the half event is not forwarded: {text}");
    let error: serde_json::Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_disconnected");
    assert_eq!(error["choices"][0]["finish_reason"], "error");
    assert_eq!(error["model"], "streamy");
    assert!(!text.contains("[DONE]"), "a broken stream does not end as if it were complete");
    assert_eq!(up.hits("sse-ok/spare"), 0, "no fallback once the answer started");

    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_stream_errors_total{route="default/streamy",target="breaks"}"#), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_provider_rate_limits_the_caller_gets_429_with_the_soonest_retry_after() {
    let up = ScriptedUpstream::start().await;
    // The same two rate-limited providers behind one route per request kind: each route's
    // targets cool down on their own.
    let targets = [
        format!("{{name: slow-to-recover, baseUrl: '{}'}}", up.url("ratelimit-after-30")),
        format!("{{name: soon, baseUrl: '{}'}}", up.url("ratelimit-ms-4500")),
    ];
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let config =
        ["json", "stream", "messages", "messages-stream"].map(|model| route_yaml(model, "", &targets)).concat()
            + &route_yaml(
                "mixed",
                "",
                &[
                    &format!("{{name: limited, baseUrl: '{}'}}", up.url("ratelimit-after-3")),
                    &format!("{{name: down, baseUrl: '{}'}}", up.url("status-503")),
                ],
            );
    let sidecar = Sidecar::start(&config);
    let ask = |model: &str, extra: &str| {
        format!(r#"{{"model":"{model}","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
    };
    let previous = serde_json::json!([
        {"model": "json", "target": "slow-to-recover", "status": 429, "reason": "429", "message": "upstream answered 429: slow down"},
        {"model": "json", "target": "soon", "status": 429, "reason": "429", "message": "upstream answered 429: slow down"},
    ]);

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("json", "")).await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert_eq!(reply.header("retry-after"), "5", "the soonest hint, 4.5 s, in whole seconds rounded up");
    assert_eq!(reply.header("x-sideyard-attempts"), "2");
    let error = &reply.json()["error"];
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("rate_limit_error"), Some("rate_limit_exceeded"))
    );
    assert_eq!(error["metadata"]["previous_errors"], previous, "each attempt's error stays");

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("stream", r#","stream":true"#)).await;
    assert_eq!(reply.status, 429, "a stream that never started: {}", reply.body);
    assert_eq!(reply.header("retry-after"), "5");
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");

    for (model, extra) in [("messages", ""), ("messages-stream", r#","stream":true"#)] {
        let reply = post(sidecar.api, "/v1/messages", &ask(model, extra)).await;
        assert_eq!(reply.status, 429, "{model}: {}", reply.body);
        assert_eq!(reply.header("retry-after"), "5", "{model}");
        let body = reply.json();
        assert_eq!((body["type"].as_str(), body["error"]["type"].as_str()), (Some("error"), Some("rate_limit_error")));
    }

    // Failures of mixed kinds keep the gateway's answer.
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("mixed", "")).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "upstream_failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_whose_credentials_are_refused_falls_back_and_is_ejected_with_one_warning() {
    const PROVIDER_KEY: &str = "sk-provider-revoked-0123456789";
    let up = ScriptedUpstream::start().await;
    // The default fallback.when, and maxEjection long enough to outlast the test.
    let config = route_yaml(
        "chat",
        "health: {maxEjection: 10m}",
        &[
            &format!("{{name: revoked, baseUrl: '{}', credentials: {{env: PROVIDER_KEY}}}}", up.url("status-401")),
            &format!("{{name: good, baseUrl: '{}'}}", up.url("ok/good")),
        ],
    ) + &route_yaml("alone", "", &[&format!("{{name: forbidden, baseUrl: '{}'}}", up.url("status-403"))]);
    let sidecar = Sidecar::start_with(&config, &[], &[("PROVIDER_KEY", PROVIDER_KEY)]);
    let ask = |model: &str| format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);

    let reply = post(sidecar.api, "/v1/chat/completions", &ask("chat")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-fallback-reason"), "auth");
    assert_eq!(reply.header("x-sideyard-attempts"), "2");
    // Ejected at once: the next requests go straight to the good target.
    for _ in 0..3 {
        let reply = post(sidecar.api, "/v1/chat/completions", &ask("chat")).await;
        assert_eq!((reply.status.as_u16(), reply.header("x-sideyard-attempts")), (200, "1"), "{}", reply.body);
    }
    assert_eq!(up.hits("status-401"), 1);
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_ejections_total{route="default/chat",target="revoked"}"#), 1);
    assert_eq!(metric(&metrics, r#"sideyard_target_health{route="default/chat",target="revoked",state="ejected"}"#), 1);

    // A route with no other target: a 502 naming the reason, never the provider's complaint.
    let reply = post(sidecar.api, "/v1/chat/completions", &ask("alone")).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["error"]["metadata"]["previous_errors"][0]["reason"], "auth");

    // One warning per ejection, naming the route, target and status, never the key. The log is
    // read from the process's stderr by another thread: wait for the second line to arrive.
    let warned = |log: &str| log.lines().filter(|l| l.contains("refused the target's credentials")).count();
    eventually("both warnings reach the log", || async { warned(&sidecar.process.log()) >= 2 }).await;
    let log = sidecar.process.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("refused the target's credentials")).collect();
    assert_eq!(warnings.len(), 2, "one per ejected target:\n{log}");
    assert!(warnings[0].contains("WARN") && warnings[0].contains("default/chat") && warnings[0].contains("revoked"));
    assert!(warnings[0].contains("status=401") && warnings[1].contains("status=403"), "{warnings:?}");
    assert!(!log.contains(PROVIDER_KEY), "the provider key never reaches the log");
}
