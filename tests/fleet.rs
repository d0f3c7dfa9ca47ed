//! Cluster mode's budgets end to end: the real operator process serving its ledger (against the
//! fake API server, which keeps ApiKeyBudget statuses and answers TokenReviews) and three real
//! sidecar processes leasing from it, each with its own projected-token file, all on 127.0.0.1.
//!
//! Targets are the in-process mock provider, priced per call and per completion token, so every
//! answer's cost is known exactly and equals its reservation: the fleet may then never pass a
//! limit at all (the standalone overspend bound is zero for exact reservations).

mod common;

use std::net::SocketAddr;

use common::fleet::*;
use common::*;
use serde_json::{Value, json};
use sideyard::api::units::parse_micros;

async fn metrics(admin: SocketAddr) -> String {
    get(admin, "/metrics").await.body
}

/// How many `call`s the ledger at `admin` answered with `result`.
async fn ledger_calls(admin: SocketAddr, call: &str, result: &str) -> u64 {
    let series = format!("sideyard_ledger_calls_total{{call=\"{call}\",result=\"{result}\"}}");
    metric_if_present(&metrics(admin).await, &series).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limit_holds_across_three_sidecars_and_the_status_keeps_every_answer() {
    // 4.50 affords 300 answers.
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "4.5"});
    let fleet = Fleet::new(&[("bot", spec)]).await;
    let (operator, operator_admin) = fleet.replica("op-1", fleet.port);
    fleet.publish_config().await;
    let (processes, apis, admins, states) = sidecars_with_state(&fleet, 3);

    let answers = burst(&apis, KEY, 1000).await;
    let served: Vec<u64> = answers.iter().filter(|(s, _)| *s == 200).map(|(_, c)| *c).collect();
    let refused = answers.iter().filter(|(s, _)| *s == 402).count();
    assert_eq!(served.len() + refused, 1000, "every request is served or refused for credit: {answers:?}");
    assert!(served.iter().all(|c| *c == COST), "each answer costs its reservation");
    let total: u64 = served.iter().sum();
    assert!(total <= 4_500_000, "the fleet spent {total} of 4500000");
    // What no sidecar could use: less than one answer per sidecar left on its lease, and less
    // than one in the ledger.
    assert!(4_500_000 - total < 4 * COST, "{} answers of 300 were served", served.len());

    let explain = async || {
        let logs: Vec<String> = processes.iter().map(Process::log).collect();
        let mut calls = vec![metrics(operator_admin).await];
        for admin in &admins {
            calls.push(metrics(*admin).await);
        }
        let calls: Vec<String> = calls
            .iter()
            .map(|m| m.lines().filter(|l| l.starts_with("sideyard_ledger_")).collect::<Vec<_>>().join("\n"))
            .collect();
        // What each sidecar has not had acknowledged (its state file, written every 200 ms).
        let unacknowledged: Vec<String> =
            states.iter().map(|s| std::fs::read_to_string(s.join("ledger-leases.json")).unwrap_or_default()).collect();
        format!(
            "the ledger has {:?}; its status: {:#}\nthe operator's log:\n{}\nthe sidecars' logs:\n{}\nnot acknowledged:\n{}\nledger calls (operator, then each sidecar):\n{}",
            fleet.spent("bot"),
            fleet.status("bot"),
            operator.log(),
            logs.join("\n---\n"),
            unacknowledged.join("\n---\n"),
            calls.join("\n---\n")
        )
    };
    eventually_or_find_out(
        "the ledger has every answer's cost",
        || async { fleet.spent("bot") == Some(total) },
        explain,
    )
    .await;
    let conditions = fleet.status("bot")["conditions"].as_array().cloned().unwrap_or_default();
    let condition = |t: &str| conditions.iter().find(|c| c["type"] == t).cloned().unwrap_or_default();
    assert_eq!(
        (condition("Ledger")["status"].as_str(), condition("Ready")["status"].as_str()),
        (Some("True"), Some("True"))
    );
    assert!(condition("Ledger")["message"].as_str().unwrap().contains("op-1"), "{conditions:?}");
    assert_eq!(fleet.status("bot")["remaining"].as_str().map(|r| parse_micros(r).unwrap()), Some(4_500_000 - total));
    let leased: u64 = {
        let mut sum = 0;
        for admin in &admins {
            sum +=
                metric(&metrics(*admin).await, "sideyard_budget_requests_total{budget=\"team-a/bot\",mode=\"lease\"}");
        }
        sum
    };
    assert!(leased > 0, "answers were billed from leases, without a ledger call each");
    // Every pod answers GET /api/v1/key from the fleet's figures.
    for api in &apis {
        let key_info = read(send_as(*api, Some(KEY), "GET", "/api/v1/key", "").await).await;
        eventually("the pod's figures catch up", || async {
            let info = read(send_as(*api, Some(KEY), "GET", "/api/v1/key", "").await).await.json();
            info["data"]["usage"].as_f64().map(|u| (u * 1e6).round() as u64) == Some(total)
        })
        .await;
        assert_eq!(key_info.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_holds_across_three_sidecars() {
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "rateLimit": {"requestsPerMinute": 100}});
    let (fleet, _operator) = Fleet::start(&[("bot", spec)]).await;
    let (_processes, apis, admins) = sidecars(&fleet, 3);
    // The allowance is per UTC minute: start where one minute holds the whole run (a few
    // seconds; the wait is at most 15 s).
    eventually("a minute with time left", || async {
        let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 60;
        second < 45
    })
    .await;
    let answers = burst(&apis, KEY, 300).await;
    let served = answers.iter().filter(|(s, _)| *s == 200).count();
    let limited = answers.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(served + limited, 300, "{answers:?}");
    // Never more than the minute's 100; fewer only by what a pod's lease holds unused when its
    // own requests are done (a lease's room: a few requests).
    assert!((100 - 3 * 8..=100).contains(&served), "{served} served: {answers:?}");
    // Over the limit, a request makes at most one ledger call of its own before its 429.
    let mut waits = 0;
    for admin in &admins {
        waits += metric(&metrics(*admin).await, "sideyard_budget_ledger_waits_total{budget=\"team-a/bot\"}");
    }
    assert!(waits <= 300, "{waits} ledger calls made for 300 requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn over_the_rate_limit_a_request_gets_its_429_after_one_call_that_waits_for_no_write() {
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "rateLimit": {"requestsPerMinute": 4}});
    let fleet = Fleet::new(&[("bot", spec)]).await;
    let (_operator, operator_admin) = fleet.replica("op-1", fleet.port);
    fleet.publish_config().await;
    let (_sidecar, api, admin) = fleet.sidecar("pod-r", &temp_dir("rate"));
    // One minute holds the whole test (the wait is at most 15 s).
    eventually("a minute with time left", || async {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 60 < 45
    })
    .await;
    for _ in 0..4 {
        assert_eq!(chat(api, KEY).await.0, 200);
    }
    let calls = |m: &str| metric(m, "sideyard_budget_ledger_waits_total{budget=\"team-a/bot\"}");
    let writes = |m: &str| metric(m, "sideyard_ledger_persist_waits_total{call=\"lease\"}");
    for _ in 0..3 {
        let (sidecar_before, operator_before) = (metrics(admin).await, metrics(operator_admin).await);
        let reply = read(send_as(api, Some(KEY), "POST", "/v1/chat/completions", CHAT).await).await;
        assert_eq!(reply.status, 429, "{}", reply.body);
        let retry_after: u64 = reply.header("retry-after").parse().unwrap();
        assert!((1..=60).contains(&retry_after), "to the window's end: {retry_after}");
        let (sidecar_after, operator_after) = (metrics(admin).await, metrics(operator_admin).await);
        assert!(calls(&sidecar_after) - calls(&sidecar_before) <= 1, "one ledger call for a refused request at most");
        assert_eq!(
            writes(&operator_after),
            writes(&operator_before),
            "a refusal waits for no status write: {}",
            fleet.status("bot")["leases"]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn near_the_limit_every_request_reserves_with_the_ledger() {
    let spec =
        json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "0.3", "lowBalanceThreshold": "0.15"});
    let (fleet, _operator) = Fleet::start(&[("bot", spec)]).await;
    let (_processes, apis, admins) = sidecars(&fleet, 1);
    let mut served = 0;
    for _ in 0..40 {
        let (status, _, body) = chat(apis[0], KEY).await;
        match status {
            200 => served += 1,
            402 => break,
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(served, 20, "0.30 affords exactly 20 answers");
    let m = metrics(admins[0]).await;
    let by =
        |mode: &str| metric(&m, &format!("sideyard_budget_requests_total{{budget=\"team-a/bot\",mode=\"{mode}\"}}"));
    assert!(by("lease") > 0 && by("per_request") > 0, "lease first, then per request below 0.15:\n{m}");
    eventually("the ledger has it all", || async { fleet.spent("bot") == Some(20 * COST) }).await;
    assert_eq!(fleet.status("bot")["state"], "Exhausted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leader_loses_no_reported_spend_and_a_new_one_goes_on() {
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "100"});
    let (fleet, mut operator) = Fleet::start(&[("bot", spec)]).await;
    let (_processes, apis, admins) = sidecars(&fleet, 3);
    let first = burst(&apis, KEY, 150).await;
    assert!(first.iter().all(|(s, _)| *s == 200), "{first:?}");
    eventually("the first answers are reported", || async { fleet.spent("bot") == Some(150 * COST) }).await;
    let outstanding_before = parse_micros(fleet.status("bot")["outstanding"].as_str().unwrap()).unwrap();

    operator.child.kill().unwrap();
    operator.wait_exit();
    // Leases held by the sidecars carry the next answers while no replica leads.
    let during = burst(&apis, KEY, 30).await;
    let _replica = fleet.operator("op-2");
    // Until op-2 leads and has loaded the budget, a sidecar whose lease ran out fails closed.
    let mut probes = 0;
    for api in &apis {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while chat(*api, KEY).await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "no answers after the takeover");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        probes += 1;
    }
    // A probe may have been served from a lease while its sidecar still waited for the leader.
    for admin in &admins {
        eventually("each sidecar hears from the new leader", || async {
            metric(&metrics(*admin).await, "sideyard_budget_ledger_reachable{budget=\"team-a/bot\"}") == 1
        })
        .await;
    }
    let after = burst(&apis, KEY, 150).await;
    let served = |answers: &[(u16, u64)]| answers.iter().filter(|(s, _)| *s == 200).count() as u64;
    assert_eq!(served(&after), 150, "requests go on after the takeover: {after:?}");
    let total = 150 + served(&during) + probes + 150;
    eventually("every answer reaches the new leader", || async { fleet.spent("bot") == Some(total * COST) }).await;
    let status = fleet.status("bot");
    let outstanding = parse_micros(status["outstanding"].as_str().unwrap()).unwrap();
    assert!(
        total * COST + outstanding <= 100_000_000,
        "granted credit is never more than the limit: spent {total} answers, {outstanding} outstanding (was {outstanding_before})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn per_request_spend_survives_a_leader_killed_before_writing_it_and_never_passes_the_limit() {
    // Low from the start: every request reserves and settles with the ledger. 0.6 affords
    // exactly 40 answers.
    let spec =
        json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "0.6", "lowBalanceThreshold": "0.7"});
    let (fleet, mut operator) = Fleet::start(&[("bot", spec)]).await;
    let (_processes, apis, _admins) = sidecars(&fleet, 2);
    let served = |answers: &[(u16, u64)]| answers.iter().filter(|(s, _)| *s == 200).count() as u64;
    let first = burst(&apis, KEY, 16).await;
    assert_eq!(served(&first), 16, "{first:?}");
    // Killed at once: what it took in since its last write is in no status.
    operator.child.kill().unwrap();
    operator.wait_exit();
    let (_replica, replica_admin) = fleet.replica("op-2", fleet.port);
    // Each sidecar tells the new leader what it holds (its settles of the first answers among
    // them) before the new leader grants what the last write did not prove free.
    eventually("both sidecars have told the new leader what they hold", || async {
        ledger_calls(replica_admin, "holdings", "ok").await >= 2
    })
    .await;
    let mut after = Vec::new();
    loop {
        let round = burst(&apis, KEY, 4).await;
        let done = round.iter().any(|(s, _)| *s == 402);
        assert!(round.iter().all(|(s, _)| *s == 200 || *s == 402), "{round:?}");
        after.extend(round);
        if done {
            break;
        }
        assert!(after.len() < 100, "the limit holds");
    }
    let total = served(&first) + served(&after);
    assert!(total <= 40, "{total} answers of 0.6 at 0.015: the limit passed");
    assert!(total >= 38, "{total} answers: the takeover lost credit for good");
    eventually("every answer's cost is in the status, once", || async { fleet.spent("bot") == Some(total * COST) })
        .await;
    // No reservation waited for a status write but a sidecar's first (which names it).
    let m = metrics(replica_admin).await;
    assert!(metric(&m, "sideyard_ledger_persist_waits_total{call=\"reserve\"}") <= 2, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_during_a_takeover_waits_for_every_pod_to_say_what_it_holds() {
    // Low from the start: every request reserves with the ledger, and a new leader holds all of
    // the credit back until both pods the last write names have said what they hold.
    let spec =
        json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "0.6", "lowBalanceThreshold": "0.7"});
    let (fleet, mut operator) = Fleet::start(&[("bot", spec)]).await;
    let (processes, apis, _admins) = sidecars(&fleet, 2);
    assert!(burst(&apis, KEY, 2).await.iter().all(|(s, _)| *s == 200));
    eventually("the status names both pods", || async {
        fleet.status("bot")["holders"].as_array().is_some_and(|h| h.len() == 2)
    })
    .await;
    operator.child.kill().unwrap();
    operator.wait_exit();
    let frozen = &processes[1];
    frozen.signal("STOP");
    let (replica, replica_admin) = fleet.replica("op-2", fleet.port);
    let refused = || ledger_calls(replica_admin, "reserve", "taking_over");

    eventually_or_explain(
        "pod-0 has told the new leader what it holds",
        || async { ledger_calls(replica_admin, "holdings", "ok").await >= 1 },
        || format!("pod-0:\n{}\nop-2:\n{}", processes[0].log(), replica.log()),
    )
    .await;

    // pod-1 cannot say what it holds: pod-0's request waits, then is refused saying why.
    let (status, _, body) = chat(apis[0], KEY).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "ledger_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("taken over") && message.contains("try again"), "{message}");
    assert!(refused().await > 1, "asked again while it waited");

    // Once pod-1 says what it holds, a waiting request is served.
    let before = refused().await;
    let waiting = tokio::spawn(chat(apis[0], KEY));
    eventually("the request is held back", || async { refused().await > before }).await;
    frozen.signal("CONT");
    let (status, cost, body) = waiting.await.unwrap();
    assert_eq!((status, cost), (200, COST), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_ledger_a_key_fails_closed_or_runs_a_bounded_debt_reported_later() {
    let closed = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "100"});
    let open = json!({"key": {"secretRef": {"name": "keys", "key": "other"}}, "limit": "100",
                      "onLedgerUnavailable": "failOpen", "maxDebt": "0.3"});
    let (fleet, mut operator) = Fleet::start(&[("closed", closed), ("open", open)]).await;
    let (_processes, apis, admins) = sidecars(&fleet, 1);
    assert_eq!(chat(apis[0], KEY).await.0, 200);
    assert_eq!(chat(apis[0], "sk-other").await.0, 200);
    operator.child.kill().unwrap();
    operator.wait_exit();

    // Each key spends its lease, then the closed one is refused and the open one owes.
    let mut closed_served = 1;
    loop {
        let (status, _, body) = chat(apis[0], KEY).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "ledger_unavailable");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("unreachable") && message.contains("failClosed"), "{message}");
            assert!(message.contains("this key's lease has run out"), "{message}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        closed_served += 1;
        assert!(closed_served < 5000, "the lease never ran out");
    }
    let mut open_served = 1;
    loop {
        let (status, _, body) = chat(apis[0], "sk-other").await;
        if status == 503 {
            break;
        }
        assert_eq!(status, 200, "{body}");
        open_served += 1;
        assert!(open_served < 5000, "the lease and the debt never ran out");
    }
    let m = metrics(admins[0]).await;
    let debt_served = metric(&m, "sideyard_budget_requests_total{budget=\"team-a/open\",mode=\"debt\"}");
    assert_eq!(debt_served, 20, "maxDebt 0.30 is 20 answers:\n{m}");
    assert_eq!(metric(&m, "sideyard_budget_ledger_reachable{budget=\"team-a/open\"}"), 0);

    let _replica = fleet.operator("op-2");
    eventually("the debt and the rest are reported to the ledger once it is back", || async {
        fleet.spent("open") == Some(open_served * COST) && fleet.spent("closed") == Some(closed_served * COST)
    })
    .await;
    // The closed key's spend may have reached the first leader before it died: wait for the
    // sidecar to have heard from the new one.
    eventually("the sidecar hears from the new leader", || async {
        metric(&metrics(admins[0]).await, "sideyard_budget_ledger_reachable{budget=\"team-a/closed\"}") == 1
    })
    .await;
    assert_eq!(chat(apis[0], KEY).await.0, 200, "the closed key is served again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_sidecar_reports_what_its_predecessor_could_not() {
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "100"});
    let (fleet, mut operator) = Fleet::start(&[("bot", spec)]).await;
    let state = temp_dir("restart-state");
    let (mut sidecar, api, _) = fleet.sidecar("pod-r", &state);
    assert_eq!(chat(api, KEY).await.0, 200);
    eventually("the first answer is reported", || async { fleet.spent("bot") == Some(COST) }).await;

    // With the ledger down, answers are spent from the lease and saved, not reported.
    operator.child.kill().unwrap();
    operator.wait_exit();
    for _ in 0..10 {
        let (status, _, body) = chat(api, KEY).await;
        assert_eq!(status, 200, "{body}\n{}", sidecar.log());
    }
    let saved = state.join("ledger-leases.json");
    eventually("the unreported use is saved", || async {
        std::fs::read_to_string(&saved).is_ok_and(|s| s.contains(&format!("\"credit\":{}", 11 * COST)))
    })
    .await;
    sidecar.child.kill().unwrap();
    sidecar.wait_exit();

    let _replica = fleet.operator("op-2");
    let (_restarted, _, _) = fleet.sidecar("pod-r", &state);
    eventually("the restarted sidecar reports its predecessor's answers", || async {
        fleet.spent("bot") == Some(11 * COST)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecars_with_another_namespaces_token_or_another_audience_get_nothing() {
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "100"});
    let (fleet, _operator) = Fleet::start(&[("bot", spec)]).await;
    // A token of team-b: team-a's budget is not its to touch.
    let (_b, b_api, b_admin) = fleet.sidecar_with_token("pod-b", &temp_dir("team-b"), "team-b:pod-b");
    // A token the API server issued for another audience.
    let (_w, w_api, w_admin) = fleet.sidecar_with_token("pod-w", &temp_dir("audience"), "wrong-audience");
    for (api, admin) in [(b_api, b_admin), (w_api, w_admin)] {
        let (status, _, body) = chat(api, KEY).await;
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("ledger_unavailable")), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("the ledger has not yet granted this sidecar a lease for this key"), "{message}");
        let m = metrics(admin).await;
        assert!(metric(&m, "sideyard_ledger_client_calls_total{call=\"lease\",result=\"rejected\"}") > 0, "{m}");
        assert_eq!(metric(&m, "sideyard_ledger_client_calls_total{call=\"lease\",result=\"ok\"}"), 0);
    }
    eventually("the budget is loaded", || async { fleet.spent("bot").is_some() }).await;
    assert_eq!(fleet.spent("bot"), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_stopped_with_sigterm_reports_its_lease_done() {
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "100"});
    let (fleet, _operator) = Fleet::start(&[("bot", spec)]).await;
    let (mut sidecar, api, _) = fleet.sidecar("pod-t", &temp_dir("sigterm"));
    for _ in 0..5 {
        assert_eq!(chat(api, KEY).await.0, 200);
    }
    sidecar.terminate();
    assert!(sidecar.wait_exit().success(), "{}", sidecar.log());
    let lease =
        |status: &Value| status["leases"].as_array().and_then(|l| l.iter().find(|l| l["holder"] == "pod-t").cloned());
    // Done and fully reported before the process exited: nothing is left outstanding for it.
    eventually("the ledger has the final report", || async {
        let status = fleet.status("bot");
        fleet.spent("bot") == Some(5 * COST) && lease(&status).is_none_or(|l| l["done"] == true)
    })
    .await;
    assert_eq!(fleet.status("bot")["outstanding"], "0", "{}", fleet.status("bot"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_does_not_lead_redirects_every_call_and_no_caller_sees_an_error() {
    // Two budgets, so that the sidecar's first lease calls go out together and both land on the
    // replica that does not lead: each must be redirected, not only the first.
    let key = |k: &str| json!({"key": {"secretRef": {"name": "keys", "key": k}}, "limit": "100"});
    let fleet = Fleet::new(&[("bot", key("app")), ("other", key("other"))]).await;
    // op-1 leads with its ledger elsewhere; the address sidecars are given is op-2's.
    let (_leader, _) = fleet.replica("op-1", free_port());
    fleet.publish_config().await;
    let (_follower, follower_admin) = fleet.replica("op-2", fleet.port);
    let (_sidecar, api, admin) = fleet.sidecar("pod-f", &temp_dir("follow"));
    let first = futures::future::join_all((0..6).map(|i| chat(api, if i % 2 == 0 { KEY } else { "sk-other" }))).await;
    for (status, _, body) in &first {
        assert_eq!(*status, 200, "{body}");
    }
    eventually("the leader has the answers", || async {
        fleet.spent("bot") == Some(3 * COST) && fleet.spent("other") == Some(3 * COST)
    })
    .await;
    let m = metrics(follower_admin).await;
    assert!(metric(&m, "sideyard_ledger_calls_total{call=\"lease\",result=\"not_leader\"}") >= 2, "{m}");
    let m = metrics(admin).await;
    for result in ["unreachable", "rejected"] {
        for call in ["lease", "reserve"] {
            let series = format!("sideyard_ledger_client_calls_total{{call=\"{call}\",result=\"{result}\"}}");
            assert_eq!(metric(&m, &series), 0, "a redirect counted as a failed call: {series}\n{m}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_removed_from_the_configuration_gives_its_lease_back() {
    let spec = json!({"key": {"secretRef": {"name": "keys", "key": "app"}}, "limit": "100"});
    let (fleet, _operator) = Fleet::start(&[("bot", spec)]).await;
    let (_sidecar, api, _) = fleet.sidecar("pod-g", &temp_dir("removed"));
    for _ in 0..3 {
        assert_eq!(chat(api, KEY).await.0, 200);
    }
    eventually("the sidecar holds a lease", || async {
        fleet.status("bot")["leases"].as_array().is_some_and(|l| l.iter().any(|l| l["holder"] == "pod-g"))
    })
    .await;
    // The namespace's next configuration has no budgets.
    let path = fleet.config_dir.join("config.json");
    let mut compiled: sideyard::config::CompiledConfig =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut config = compiled.config.clone();
    config.budgets.clear();
    config.ledger = None;
    compiled = sideyard::config::CompiledConfig::new(NS, compiled.version + 1, config);
    std::fs::write(&path, serde_json::to_vec(&compiled).unwrap()).unwrap();
    eventually("the lease is reported done and its rest given back", || async {
        let status = fleet.status("bot");
        status["leases"].as_array().is_none_or(|l| l.iter().all(|l| l["holder"] != "pod-g"))
            && status["outstanding"] == "0"
            && fleet.spent("bot") == Some(3 * COST)
    })
    .await;
    assert_eq!(chat(api, "sk-anyone").await.0, 200, "the route no longer asks for a key");
}

/// A request for `model`: its status.
async fn chat_with(api: SocketAddr, model: &str) -> u16 {
    let body = CHAT.replace("\"chat\"", &format!("{model:?}"));
    read(send(api, "POST", "/v1/chat/completions", &body).await).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_serves_what_the_operator_pushes_and_then_the_newest_version_from_either_source() {
    let (fleet, mut operator) = Fleet::start(&[]).await;
    let path = fleet.config_dir.join("config.json");
    let published: sideyard::config::CompiledConfig = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let pushed = published.version;
    // The mounted configuration, as it may be on a pod's start: older, its model named `old`.
    let version = |version: u64, model: &str| {
        let mut config = published.clone().into_config().unwrap();
        config.routes[0].model = model.into();
        serde_json::to_vec(&sideyard::config::CompiledConfig::new(NS, version, config)).unwrap()
    };
    std::fs::write(&path, version(pushed - 1, "old")).unwrap();
    let (_sidecar, api, admin) = fleet.sidecar("pod-p", &temp_dir("push"));

    eventually("the pushed version is served", || async {
        let m = metrics(admin).await;
        metric(&m, "sideyard_config_version") == pushed && metric(&m, "sideyard_config_source{source=\"push\"}") == 1
    })
    .await;
    let answer = read(send(api, "POST", "/v1/chat/completions", CHAT).await).await;
    assert_eq!(answer.status, 200, "the operator's route, while the file still has the old one");
    assert_eq!(answer.header("x-sideyard-config-version"), pushed.to_string());
    assert_eq!(chat_with(api, "old").await, 404);
    assert_eq!(std::fs::read(&path).unwrap(), version(pushed - 1, "old"), "the mounted file did not change");
    assert_eq!(metric(&metrics(admin).await, "sideyard_config_stream_connected"), 1);
    // The sidecar said which version it serves: the route is Programmed.
    let route = format!("/apis/sideyard.dev/v1alpha1/namespaces/{NS}/providerroutes/chat");
    let programmed = || {
        let statuses = fleet.api.statuses.lock().unwrap();
        let conditions = statuses.get(&route).and_then(|s| s["conditions"].as_array().cloned()).unwrap_or_default();
        conditions.into_iter().find(|c| c["type"] == "Programmed").unwrap_or_default()
    };
    let all_serve = format!("all 1 selected, connected pods serve configuration version {pushed} or newer");
    eventually("the route is Programmed", || async {
        programmed()["status"] == "True" && programmed()["message"] == all_serve.as_str()
    })
    .await;

    // The operator goes: the sidecar keeps serving what it has.
    operator.terminate();
    operator.wait_exit();
    eventually("the stream is seen to end", || async {
        metric(&metrics(admin).await, "sideyard_config_stream_connected") == 0
    })
    .await;
    assert_eq!(chat_with(api, "chat").await, 200);
    // A newer version in the mounted files is taken …
    std::fs::write(&path, version(pushed + 1, "newer")).unwrap();
    eventually("the newer mounted version is served", || async {
        let m = metrics(admin).await;
        metric(&m, "sideyard_config_version") == pushed + 1
            && metric(&m, "sideyard_config_source{source=\"files\"}") == 1
    })
    .await;
    assert_eq!(chat_with(api, "newer").await, 200);
    // … an older one is not.
    std::fs::write(&path, version(pushed, "chat")).unwrap();
    eventually("the older mounted version is seen and kept out", || async {
        metric(&metrics(admin).await, "sideyard_config_older_total{source=\"files\"}") == 1
    })
    .await;
    assert_eq!(metric(&metrics(admin).await, "sideyard_config_version"), pushed + 1);
    assert_eq!((chat_with(api, "newer").await, chat_with(api, "chat").await), (200, 404));
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_streams_follow_the_leader_and_never_go_back_a_version() {
    let fleet = Fleet::new(&[]).await;
    // op-1 leads with its ledger elsewhere; the address sidecars are given is op-2's.
    let (mut leader, leader_admin) = fleet.replica("op-1", free_port());
    fleet.publish_config().await;
    let (_follower, follower_admin) = fleet.replica("op-2", fleet.port);
    let (_sidecar, api, admin) = fleet.sidecar("pod-p", &temp_dir("push-leader"));
    let streams = |admin| async move { metric(&metrics(admin).await, "sideyard_operator_config_streams") };
    eventually("the follower redirects the stream to the leader", || async {
        streams(leader_admin).await == 1 && metric(&metrics(admin).await, "sideyard_config_stream_connected") == 1
    })
    .await;
    let before = metric(&metrics(admin).await, "sideyard_config_version");
    assert!(before >= 1);
    assert_eq!(streams(follower_admin).await, 0);

    leader.child.kill().unwrap();
    leader.wait_exit();
    eventually("the stream moves to the new leader", || async {
        streams(follower_admin).await == 1 && metric(&metrics(admin).await, "sideyard_config_stream_connected") == 1
    })
    .await;
    // The new leader publishes from what the API server holds: the same version or a newer one.
    let m = metrics(admin).await;
    assert!(metric(&m, "sideyard_config_version") >= before, "{m}");
    assert_eq!(metric(&m, "sideyard_config_older_total{source=\"push\"}"), 0, "{m}");
    assert_eq!(chat_with(api, "chat").await, 200);
}

/// The route `chat` of a target that always answers 503 (`flaky`), then one that works (`good`),
/// with its operator, the configuration published.
async fn flaky_fleet() -> (Fleet, Process) {
    let targets = json!([
        {"name": "flaky", "api": "mock", "baseUrl": "mock://local?fail-rate=1&fail-status=503"},
        {"name": "good", "api": "mock", "baseUrl": "mock://local"}]);
    let fleet = Fleet::with_targets(targets, &[]).await;
    let operator = fleet.operator("op-1");
    fleet.publish_config().await;
    (fleet, operator)
}

async fn streams_open(admins: &[SocketAddr]) {
    for admin in admins {
        eventually("every stream is open", || async {
            metric(&metrics(*admin).await, "sideyard_config_stream_connected") == 1
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_one_pod_ejects_is_avoided_by_a_pod_that_has_seen_no_failure() {
    let (fleet, _operator) = flaky_fleet().await;
    let (_a, a_api, a_admin) = fleet.sidecar("pod-0", &temp_dir("outage-a"));
    let (_b, b_api, b_admin) = fleet.sidecar("pod-1", &temp_dir("outage-b"));
    streams_open(&[a_admin, b_admin]).await;
    let series = |name: &str, target: &str| format!("{name}{{route=\"{NS}/chat\",target=\"{target}\"}}");
    // Pod A meets the outage: each request falls back, and the third failure ejects the target.
    for _ in 0..3 {
        let answer = read(send(a_api, "POST", "/v1/chat/completions", CHAT).await).await;
        assert_eq!((answer.status.as_u16(), answer.header("x-sideyard-target")), (200, "good"), "{}", answer.body);
    }
    assert_eq!(metric(&metrics(a_admin).await, &series("sideyard_ejections_total", "flaky")), 1);
    // Pod B, which has sent nothing, holds the target too once the operator pushes the ejection.
    eventually("the ejection reaches the other pod", || async {
        metric(&metrics(b_admin).await, &series("sideyard_fleet_ejections_total", "flaky")) >= 1
    })
    .await;
    let health = format!("sideyard_target_health{{route=\"{NS}/chat\",target=\"flaky\",state=\"ejected\"}}");
    assert_eq!(metric(&metrics(b_admin).await, &health), 1);
    let answer = read(send(b_api, "POST", "/v1/chat/completions", CHAT).await).await;
    assert_eq!(
        (answer.status.as_u16(), answer.header("x-sideyard-target"), answer.header("x-sideyard-attempts")),
        (200, "good", "1"),
        "no attempt on the target the fleet ejected"
    );
    let b = metrics(b_admin).await;
    assert_eq!(metric(&b, &series("sideyard_ejections_total", "flaky")), 0, "B ejected nothing itself");
    assert_eq!(
        metric(
            &b,
            &format!("sideyard_upstream_outcomes_total{{route=\"{NS}/chat\",target=\"flaky\",outcome=\"5xx\"}}")
        ),
        0
    );
    // And the route's status says so.
    let route = format!("/apis/sideyard.dev/v1alpha1/namespaces/{NS}/providerroutes/chat");
    let target_health = |name: &str| {
        let statuses = fleet.api.statuses.lock().unwrap();
        let targets = statuses.get(&route).and_then(|s| s["targets"].as_array().cloned()).unwrap_or_default();
        targets.into_iter().find(|t| t["name"] == name).map(|t| t["health"].clone()).unwrap_or_default()
    };
    eventually("the status shows the fleet's hold", || async {
        target_health("flaky") == "Ejected" && target_health("good") == "Healthy"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_without_measures_of_its_own_ranks_targets_by_the_fleets() {
    let targets = json!([{"name": "slow", "api": "mock", "baseUrl": "mock://local?latency=60ms"}]);
    let fleet = Fleet::with_targets(targets, &[]).await;
    let _operator = fleet.operator("op-1");
    fleet.publish_config().await;
    let (_a, a_api, a_admin) = fleet.sidecar("pod-0", &temp_dir("measures-a"));
    let (_b, _b_api, b_admin) = fleet.sidecar("pod-1", &temp_dir("measures-b"));
    // Pod A measures the target; pod B sends nothing.
    let answers = futures::future::join_all((0..12).map(|_| chat_with(a_api, "chat"))).await;
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    let ttft = |exposition: &str| -> Option<f64> {
        let series = format!(
            "sideyard_target_time_to_first_token_seconds{{route=\"{NS}/chat\",target=\"slow\",quantile=\"0.5\"}} "
        );
        exposition.lines().find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
    };
    // Within a report or two (measures go every 5 s), B's ranking measure is the fleet's.
    eventually("pod B has the fleet's time to first token", || async {
        ttft(&metrics(b_admin).await).is_some_and(|s| s > 0.0)
    })
    .await;
    let (a, b) = (ttft(&metrics(a_admin).await).unwrap_or(0.0), ttft(&metrics(b_admin).await).unwrap_or(0.0));
    assert!((0.05..0.2).contains(&b), "about the mock's 60 ms: {b}");
    assert!((a - b).abs() < 0.02, "A measured {a}, B was told {b}");
    assert_eq!(metric(&metrics(b_admin).await, "sideyard_api_calls_total{api=\"chat_completions\"}"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_spread_over_pods_eject_a_target_that_no_single_pod_ejected() {
    let (fleet, _operator) = flaky_fleet().await;
    let (_processes, apis, admins) = sidecars(&fleet, 3);
    streams_open(&admins).await;
    // One failure in each pod: below each pod's threshold of 3, the fleet's all the same.
    for api in &apis {
        let answer = read(send(*api, "POST", "/v1/chat/completions", CHAT).await).await;
        assert_eq!((answer.status.as_u16(), answer.header("x-sideyard-attempts")), (200, "2"), "{}", answer.body);
    }
    let series = |name: &str| format!("{name}{{route=\"{NS}/chat\",target=\"flaky\"}}");
    for admin in &admins {
        eventually("the fleet's ejection reaches every pod", || async {
            metric(&metrics(*admin).await, &series("sideyard_fleet_ejections_total")) >= 1
        })
        .await;
        assert_eq!(metric(&metrics(*admin).await, &series("sideyard_ejections_total")), 0, "no pod ejected it itself");
    }
    let answer = read(send(apis[0], "POST", "/v1/chat/completions", CHAT).await).await;
    assert_eq!((answer.header("x-sideyard-target"), answer.header("x-sideyard-attempts")), ("good", "1"));
}
