//! Errors the caller sees, and the provider key never leaking into responses, logs or metrics.

mod common;

use common::*;

const KEY: &str = "sk-test-9f8e7d6c5b4a3210";

fn config(up: &ScriptedUpstream) -> String {
    format!(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: chat}}
spec:
  model: chat
  aliases: [gpt-4o, gpt-4o-mini]
  targets:
    - {{name: only, baseUrl: "{ok}"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: keyed}}
spec:
  model: keyed
  targets:
    - {{name: echoes, baseUrl: "{echo}", credentials: {{env: TEST_PROVIDER_KEY}}}}
    - {{name: fine, baseUrl: "{ok_keyed}", credentials: {{secretRef: {{name: provider, key: api-key}}}}}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: keyed-passthrough}}
spec:
  model: keyed-passthrough
  fallback: {{when: []}}
  targets:
    - {{name: echoes, baseUrl: "{echo}", credentials: {{env: TEST_PROVIDER_KEY}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: provider}}
stringData:
  api-key: "{KEY}"
"#,
        ok = up.url("ok/chat"),
        echo = up.url("echo-key"),
        ok_keyed = up.url("ok/keyed"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_shaped_errors() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start_with(&config(&up), &["--max-request-bytes", "1000"], &[("TEST_PROVIDER_KEY", KEY)]);
    let api = sidecar.api;

    let cases: [(&str, &str, u16, &str); 7] = [
        ("malformed JSON", r##"{"model": "chat", "messages": ["##, 400, "invalid_json"),
        ("not an object", r#"["chat"]"#, 400, "invalid_json"),
        ("missing model", r#"{"messages": []}"#, 400, "missing_model"),
        ("model not a string", r#"{"model": 4}"#, 400, "invalid_model"),
        ("stream not a bool", r#"{"model": "chat", "stream": "yes"}"#, 400, "invalid_parameter"),
        ("unknown model", r#"{"model": "gpt-5"}"#, 404, "model_not_found"),
        ("too large", &format!(r#"{{"model": "chat", "pad": "{}"}}"#, "x".repeat(2000)), 413, "request_too_large"),
    ];
    for (what, body, status, code) in cases {
        let reply = post(api, "/v1/chat/completions", body).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        assert_eq!(reply.header("content-type"), "application/json", "{what}");
        assert_eq!(reply.header("x-sideyard-error-source"), "proxy", "{what}");
        let error = &reply.json()["error"];
        assert_eq!(error["code"], code, "{what}: {error}");
        assert_eq!(error["type"], "invalid_request_error", "{what}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
    }
    assert_eq!(up.requests.lock().unwrap().len(), 0, "no bad request reaches an upstream");

    // A field of the wrong type is named, with what it should be: not "not valid JSON".
    let reply = post(api, "/v1/chat/completions", r#"{"model": "chat", "stream": "yes"}"#).await;
    assert_eq!(
        reply.json()["error"]["message"],
        r#"The field stream has the wrong type: invalid type: string "yes", expected a boolean."#
    );

    let reply = post(api, "/v1/chat/completions", r#"{"model": "gpt-5"}"#).await;
    let error = &reply.json()["error"];
    assert_eq!(
        error["message"],
        "The model \"gpt-5\" does not exist. Known models: chat, gpt-4o, gpt-4o-mini, keyed, keyed-passthrough."
    );
    assert_eq!(
        error["metadata"]["known_models"],
        serde_json::json!(["chat", "gpt-4o", "gpt-4o-mini", "keyed", "keyed-passthrough"])
    );

    // Other `/v1/` calls pass through to the route their model names, or to the namespace's
    // pass-through default, which this configuration has not.
    let reply = get(api, "/v1/nothing-here").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "no_passthrough_route");
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("passthroughDefault: true"), "{}", reply.body);
    let reply = get(api, "/nothing-here").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "unknown_endpoint");
    // Another method on a served /v1/ path may be the provider's (GET lists stored completions):
    // passed through too. Elsewhere it is the sidecar's 405.
    let reply = get(api, "/v1/chat/completions").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "no_passthrough_route");
    let reply = post(api, "/api/v1/key", "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.json()["error"]["code"], "method_not_allowed");

    // Aliases route like the model.
    let reply = post(api, "/v1/chat/completions", r#"{"model": "gpt-4o-mini"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let models = get(api, "/v1/models").await;
    assert_eq!(models.status, 200);
    let ids: Vec<String> =
        models.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["chat", "gpt-4o", "gpt-4o-mini", "keyed", "keyed-passthrough"]);
    assert_eq!(models.json()["object"], "list");

    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_requests_total{route="",target="",status="400"}"#), 6);
    assert_eq!(metric(&metrics, r#"sideyard_requests_total{route="",target="",status="404"}"#), 5);
    assert_eq!(metric(&metrics, r#"sideyard_requests_total{route="",target="",status="413"}"#), 1);
    assert_eq!(metric(&metrics, r#"sideyard_requests_total{route="default/chat",target="only",status="200"}"#), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_keys_reach_the_upstream_and_nothing_else() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start_with(&config(&up), &["--log", "trace"], &[("TEST_PROVIDER_KEY", KEY)]);

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"keyed"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "fine");
    for behaviour in ["echo-key", "ok/keyed"] {
        let recorded = up.recorded(behaviour);
        assert_eq!(recorded.len(), 1, "{behaviour}");
        assert_eq!(recorded[0].headers["authorization"], format!("Bearer {KEY}"), "{behaviour}");
        assert_eq!(recorded[0].headers["content-type"], "application/json");
    }

    // The upstream echoes the key in its error; the caller gets the error without it.
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"keyed-passthrough"}"#).await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.header("x-sideyard-error-source"), "upstream");
    assert_eq!(reply.json()["error"]["message"], "bad request with Bearer [redacted]");

    let metrics = get(sidecar.admin, "/metrics").await.body;
    let models = get(sidecar.api, "/v1/models").await.body;
    let log = sidecar.process.log();
    for (what, text) in [("metrics", &metrics), ("models", &models), ("log", &log), ("response", &reply.body)] {
        assert!(!text.contains(KEY), "the key leaked into the {what}:\n{text}");
    }
    assert!(log.contains("attempt failed"), "the trace log covered the failed attempt:\n{log}");
}

/// Any JSON, refused when an object repeats a key (serde_json's `Value` would keep the last).
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
                while seq.next_element::<UniqueKeys>()?.is_some() {}
                Ok(UniqueKeys)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("the key {key:?} repeats")));
                    }
                    map.next_value::<UniqueKeys>()?;
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_repeat_no_key_and_keep_the_upstream_target_and_lists() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "chat",
        "health: {consecutiveFailures: 1}",
        &[
            &format!("{{name: down, baseUrl: '{}'}}", up.url("status-503")),
            &format!("{{name: up, baseUrl: '{}'}}", up.url("ok/up")),
        ],
    );
    let sidecar = Sidecar::start_with(&config, &["--log-format", "json", "--log", "debug"], &[]);
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model": "chat"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model": "nope"}"#).await;
    assert_eq!(reply.status, 404);
    eventually("the ejection is logged", || async { sidecar.process.log().contains("target ejected") }).await;

    let log = sidecar.process.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            if let Err(e) = serde_json::from_str::<UniqueKeys>(line) {
                panic!("{e}: {line}");
            }
            serde_json::from_str(line).unwrap()
        })
        .collect();
    let with = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"].as_str().is_some_and(|m| m.contains(message)))
            .unwrap_or_else(|| panic!("no {message:?} line in:\n{log}"))
    };
    let loaded = with("configuration loaded");
    assert!(loaded["files"].as_array().is_some_and(|f| f.len() == 1), "a list is an array: {loaded}");
    let failed = with("attempt failed");
    assert_eq!(failed["upstream_target"], "down", "{failed}");
    assert_eq!(failed["target"], "sideyard::sidecar::calls::proxy", "the module, kept apart: {failed}");
    assert!(failed["detail"].as_str().is_some_and(|d| d.contains("503")), "{failed}");
    assert_eq!(with("target ejected")["upstream_target"], "down");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_and_fallen_back_requests_are_logged_at_info_within_a_rate_limit() {
    let up = ScriptedUpstream::start().await;
    let config = route_yaml(
        "chat",
        "health: {consecutiveFailures: 100}",
        &[
            &format!("{{name: down, baseUrl: '{}'}}", up.url("status-503")),
            &format!("{{name: up, baseUrl: '{}'}}", up.url("ok/up")),
        ],
    ) + &route_yaml("broken", "", &[&format!("{{name: only, baseUrl: 'http://{}'}}", closed_port())])
        + &route_yaml("fine", "", &[&format!("{{name: only, baseUrl: '{}'}}", up.url("ok/fine"))]);
    let sidecar = Sidecar::start(&config);
    let lines = |what: &str| -> Vec<String> {
        sidecar.process.log().lines().filter(|l| l.contains(what)).map(String::from).collect()
    };

    for (request_id, body, status) in [
        ("req-fine", r#"{"model": "fine"}"#, 200),
        ("req-fell", r#"{"model": "chat"}"#, 200),
        ("req-failed", r#"{"model": "broken"}"#, 502),
        ("req-unknown", r#"{"model": "nope"}"#, 404),
    ] {
        let response =
            send_with(sidecar.api, "POST", "/v1/chat/completions", &[("x-request-id", request_id)], body).await;
        assert_eq!(response.status(), status, "{request_id}");
    }
    eventually("three request lines", || async { lines("request_id=").len() == 3 }).await;
    assert!(lines("request_id=req-fine").is_empty(), "served at the first try: nothing at info");

    let fell = lines("request_id=req-fell");
    assert!(fell[0].contains("INFO") && fell[0].contains("request served after a fallback"), "{fell:?}");
    for part in [
        "path=/v1/chat/completions",
        "model=chat",
        "route=default/chat",
        "upstream_target=up",
        r#"attempts=["down: 5xx (503)"]"#,
        "status=200",
    ] {
        assert!(fell[0].contains(part), "{part} in {}", fell[0]);
    }
    let failed = lines("request_id=req-failed");
    assert!(failed[0].contains("request failed") && failed[0].contains("status=502"), "{failed:?}");
    assert!(failed[0].contains(r#"attempts=["only: connect"]"#), "{failed:?}");
    let unknown = lines("request_id=req-unknown");
    assert!(unknown[0].contains("status=404") && unknown[0].contains("model=nope"), "{unknown:?}");

    // An outage: every line is written or counted as left out, never more than the limit a second.
    const N: usize = 120;
    let requests = (0..N).map(|_| post(sidecar.api, "/v1/chat/completions", r#"{"model": "broken"}"#));
    assert!(futures::future::join_all(requests).await.iter().all(|r| r.status.is_server_error()));
    let metrics = get(sidecar.admin, "/metrics").await.body;
    let left_out = metric(&metrics, "sideyard_request_log_suppressed_total") as usize;
    eventually("every line of the outage is written or counted", || async {
        lines("request_id=-").len() + left_out == N
    })
    .await;
}
