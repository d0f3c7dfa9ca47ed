//! The operator's budget ledger service, in process: its calls as a sidecar makes them, with a
//! scripted token check and an in-memory status store in place of the API server.

use sideyard::api::units::parse_micros;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use futures::future::BoxFuture;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sideyard::api::{ApiKeyBudgetStatus, BudgetState, Period};
use sideyard::config::{Budget, RateLimitPolicy, TopUpPolicy};
use sideyard::operator::leader::Leadership;
use sideyard::operator::ledger::{BoundPod, FleetService, LEADER_HEADER, Review, Reviewer, StatusStore, router};
use sideyard::operator::metrics::OperatorMetrics;
use tokio::sync::watch;
use tower::ServiceExt;

/// Tokens as the API server would review them: `ns:pod` authenticates as a ServiceAccount of
/// `ns` bound to `pod`; `wrong-audience` is refused.
struct Tokens;

impl Reviewer for Tokens {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, String>> {
        Box::pin(async move {
            if token == "wrong-audience" {
                return Ok(Review::Rejected(
                    "token audiences [\"https://kubernetes.default.svc\"] do not include sideyard".into(),
                ));
            }
            if token == "unreachable" {
                return Err("connection refused".into());
            }
            let (ns, pod) = token.split_once(':').ok_or("not a test token")?;
            Ok(Review::Authenticated {
                username: format!("system:serviceaccount:{ns}:default"),
                pod: Some(BoundPod { name: pod.into(), uid: None }),
            })
        })
    }
}

/// Statuses in memory; `fail` makes writes fail.
#[derive(Default)]
struct Store {
    statuses: Mutex<HashMap<(String, String), ApiKeyBudgetStatus>>,
    fail: std::sync::atomic::AtomicBool,
    /// What the ledger told, as (budget, reason, note).
    told: Mutex<Vec<(String, String, String)>>,
}

impl StatusStore for Store {
    fn load<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ApiKeyBudgetStatus>, String>> {
        Box::pin(async move { Ok(self.statuses.lock().unwrap().get(&(namespace.into(), name.into())).cloned()) })
    }

    fn save<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: ApiKeyBudgetStatus,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("the API server is down".into());
            }
            self.statuses.lock().unwrap().insert((namespace.into(), name.into()), status);
            Ok(())
        })
    }

    fn tell<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        reason: &'a str,
        note: String,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.told.lock().unwrap().push((format!("{namespace}/{name}"), reason.into(), note));
            Ok(())
        })
    }
}

impl Store {
    fn status(&self, name: &str) -> ApiKeyBudgetStatus {
        self.statuses.lock().unwrap().get(&("team-a".to_string(), name.to_string())).cloned().expect("a stored status")
    }
}

fn budget(name: &str, limit: Option<u64>, low: Option<u64>, rate: Option<RateLimitPolicy>) -> Budget {
    Budget {
        namespace: "team-a".into(),
        name: name.into(),
        key_hash: None,
        parent: None,
        top_up: None,
        limit,
        period: Period::Monthly,
        low_balance: low,
        fail_open: false,
        max_debt: None,
        allowed_models: None,
        rate_limit: rate,
        workload_selector: None,
    }
}

struct Ledger {
    service: Arc<FleetService>,
    store: Arc<Store>,
    metrics: Arc<OperatorMetrics>,
}

async fn ledger(leader: bool, store: Arc<Store>, budgets: &[Budget]) -> Ledger {
    let metrics = Arc::new(OperatorMetrics::default());
    let (_, leader_url) = watch::channel(Some("https://10.0.0.7:8444".to_string()));
    let service = FleetService::new(
        format!("leader-{}", budgets.len()),
        Leadership::fixed(leader),
        Arc::new(Tokens),
        store.clone(),
        metrics.clone(),
        leader_url,
    );
    service.sync_namespace("team-a", budgets).await.unwrap();
    tokio::spawn(service.clone().keep_persisted(std::future::pending()));
    Ledger { service, store, metrics }
}

impl Ledger {
    async fn call(&self, token: Option<&str>, path: &str, body: Value) -> (StatusCode, Value, Option<String>) {
        let mut request = Request::post(format!("/ledger/v1/{path}")).header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response =
            router(self.service.clone()).oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let status = response.status();
        let leader = response.headers().get(LEADER_HEADER).map(|v| v.to_str().unwrap().to_string());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), leader)
    }
}

const POD_A: &str = "team-a:pod-a";
const POD_B: &str = "team-a:pod-b";

#[tokio::test(start_paused = true)]
async fn a_lease_is_persisted_before_it_is_answered_and_reports_reach_the_status_at_the_next_write() {
    let l = ledger(true, Arc::default(), &[budget("bot", Some(10_000_000), None, None)]).await;
    let (status, grant, _) =
        l.call(Some(POD_A), "lease", json!({"budget": "bot", "want": {"credit": 8_000_000}})).await;
    assert_eq!(status, StatusCode::OK, "{grant}");
    assert_eq!((grant["mode"].as_str(), grant["granted"]["credit"].as_u64()), (Some("lease"), Some(5_000_000)));
    let stored = l.store.status("bot");
    assert_eq!(
        stored.ledger.outstanding.as_deref(),
        Some("5"),
        "the grant was persisted before the answer: {stored:?}"
    );
    assert_eq!(stored.ledger.leases.len(), 1);
    assert_eq!((stored.ledger.leases[0].holder.as_str(), stored.ledger.leases[0].granted.as_str()), ("pod-a", "5"));

    let lease_id = grant["leaseId"].as_str().unwrap();
    let report = json!({"budget": "bot", "leaseId": lease_id, "used": {"credit": 1_250_000}});
    let (status, figures, _) = l.call(Some(POD_A), "report", report.clone()).await;
    assert_eq!(status, StatusCode::OK, "{figures}");
    assert_eq!(figures["spent"], 1_250_000);
    let (_, again, _) = l.call(Some(POD_A), "report", report).await;
    assert_eq!(again["spent"], 1_250_000, "a repeated report counts once");
    // Use on a live lease is answered at once (the sidecar reports it again, cumulatively, until
    // the lease is done) and written with the budget's next status write.
    let metrics = l.metrics.render();
    assert!(metrics.contains("sideyard_ledger_persist_waits_total{call=\"report\"} 0"), "{metrics}");
    // (The clock is paused: this waits for no real time. A write comes at most two write
    // intervals after the change.)
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let stored = l.store.status("bot");
    assert_eq!(
        (
            stored.ledger.spent.as_deref(),
            stored.ledger.remaining.as_deref(),
            stored.ledger.outstanding.as_deref(),
            stored.ledger.state
        ),
        (Some("1.25"), Some("8.75"), Some("3.75"), Some(BudgetState::Active))
    );
    assert!(stored.ledger.period_start.as_deref().is_some_and(|p| p.ends_with("-01T00:00:00Z")), "{stored:?}");

    let (status, refused, _) =
        l.call(Some(POD_B), "report", json!({"budget": "bot", "leaseId": lease_id, "used": {"credit": 9}})).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_lease")),
        "another pod's lease"
    );
    let metrics = l.metrics.render();
    assert!(metrics.contains("sideyard_ledger_calls_total{call=\"lease\",result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("sideyard_ledger_granted_credits_total 5"), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn callers_without_a_valid_token_of_the_namespace_are_refused() {
    let l = ledger(true, Arc::default(), &[budget("bot", Some(10_000_000), None, None)]).await;
    let lease = json!({"budget": "bot", "want": {"credit": 1}});
    let (status, body, _) = l.call(None, "lease", lease.clone()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    assert!(body["error"]["message"].as_str().unwrap().contains("audience sideyard"), "{body}");

    let (status, body, _) = l.call(Some("wrong-audience"), "lease", lease.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("do not include sideyard"), "{body}");

    let (status, body, _) = l.call(Some(POD_A), "lease", json!({"budget": "team-b/bot", "want": {"credit": 1}})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
    // Its own namespace's budget, named in full, as sidecars name them.
    let (status, body, _) = l.call(Some(POD_A), "lease", json!({"budget": "team-a/bot", "want": {"credit": 1}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A pod of another namespace asks for a budget of the same name: it is not there for it.
    let (status, body, _) = l.call(Some("team-b:pod-x"), "lease", lease.clone()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_budget")));

    let (status, body, _) = l.call(Some("unreachable"), "lease", lease).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("token_review_failed"))
    );

    let metrics = l.metrics.render();
    for (result, n) in [("refused", 2), ("wrong_namespace", 1), ("error", 1)] {
        assert!(
            metrics.contains(&format!("sideyard_ledger_token_reviews_total{{result=\"{result}\"}} {n}")),
            "{metrics}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_does_not_lead_names_the_leader() {
    let l = ledger(false, Arc::default(), &[]).await;
    let (status, body, leader) = l.call(Some(POD_A), "lease", json!({"budget": "bot", "want": {"credit": 1}})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("not_leader")));
    assert_eq!(leader.as_deref(), Some("https://10.0.0.7:8444"));
}

#[tokio::test(start_paused = true)]
async fn a_grant_that_cannot_be_persisted_is_not_answered() {
    let store: Arc<Store> = Arc::default();
    let l = ledger(true, store.clone(), &[budget("bot", Some(10_000_000), None, None)]).await;
    store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body, _) = l.call(Some(POD_A), "lease", json!({"budget": "bot", "want": {"credit": 1_000_000}})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("ledger_unavailable")));
    store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, grant, _) =
        l.call(Some(POD_A), "lease", json!({"budget": "bot", "want": {"credit": 1_000_000}})).await;
    assert_eq!(status, StatusCode::OK, "{grant}");
    // The refused grant's credit stays outstanding until that lease expires: never granted twice.
    assert_eq!(l.store.status("bot").ledger.outstanding.as_deref(), Some("2"));
    assert!(l.metrics.render().contains("sideyard_ledger_persist_failures_total 1"));
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_goes_on_from_the_stored_status_once_the_holders_say_what_they_hold() {
    let store: Arc<Store> = Arc::default();
    let budgets = [budget("bot", Some(10_000_000), None, None)];
    let first = ledger(true, store.clone(), &budgets).await;
    let (_, grant, _) = first.call(Some(POD_A), "lease", json!({"budget": "bot", "want": {"credit": 8_000_000}})).await;
    let lease_id = grant["leaseId"].as_str().unwrap().to_string();
    first
        .call(Some(POD_A), "report", json!({"budget": "bot", "leaseId": lease_id, "used": {"credit": 1_000_000}}))
        .await;
    // (The clock is paused: the next write comes without waiting.)
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let written = store.status("bot");
    assert_eq!(
        (written.ledger.spent.as_deref(), written.ledger.holders.as_slice()),
        (Some("1"), &["pod-a".to_string()][..])
    );

    // The old leader is gone; a new one loads the statuses. What the old one pledged stays out
    // until pod-a says what it holds.
    let second = ledger(true, store.clone(), &[budgets[0].clone(), budget("other", None, None, None)]).await;
    let (status, grant_b, _) =
        second.call(Some(POD_B), "lease", json!({"budget": "bot", "want": {"credit": 8_000_000}})).await;
    assert_eq!(status, StatusCode::OK);
    let pledged = parse_micros(written.ledger.pledged.as_deref().unwrap()).unwrap();
    let proven_free = 10_000_000u64.saturating_sub(1_000_000 + 4_000_000 + pledged);
    assert!(grant_b["granted"]["credit"].as_u64().unwrap() <= proven_free, "{grant_b}");
    let holdings = json!({"budget": "bot", "held": [{"id": lease_id, "kind": "lease", "granted": {"credit": 5_000_000},
        "used": {"credit": 1_000_000}, "window": grant["window"], "expiresAt": grant["expiresAt"]}]});
    let (status, taken, _) = second.call(Some(POD_A), "holdings", holdings).await;
    assert_eq!((status, taken["written"].clone()), (StatusCode::OK, json!([])), "{taken}");
    let (_, grant_b, _) =
        second.call(Some(POD_B), "lease", json!({"budget": "bot", "want": {"credit": 8_000_000}})).await;
    assert_eq!(grant_b["granted"]["credit"], 1_250_000, "10 - 1 spent - 4 still leased to pod-a = 5, shared by two");
    let (status, figures, _) = second
        .call(
            Some(POD_A),
            "report",
            json!({"budget": "bot", "leaseId": lease_id, "used": {"credit": 3_000_000}, "done": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the old leader's lease is reported to the new one: {figures}");
    assert_eq!((figures["spent"].as_u64(), figures["outstanding"].as_u64()), (Some(3_000_000), Some(1_250_000)));
}

#[tokio::test(start_paused = true)]
async fn low_budgets_reserve_per_request_and_rate_limits_hold_across_pods() {
    let rate = RateLimitPolicy { requests_per_minute: Some(3), tokens_per_minute: None };
    let l = ledger(
        true,
        Arc::default(),
        &[budget("low", Some(1_000_000), Some(2_000_000), None), budget("rpm", None, None, Some(rate))],
    )
    .await;
    let (_, grant, _) = l.call(Some(POD_A), "lease", json!({"budget": "low", "want": {"credit": 500_000}})).await;
    assert_eq!((grant["mode"].as_str(), grant["granted"]["credit"].as_u64()), (Some("perRequest"), Some(0)));
    let (status, reserved, _) = l.call(Some(POD_A), "reserve", json!({"budget": "low", "amount": 600_000})).await;
    assert_eq!(status, StatusCode::OK, "{reserved}");
    let (status, refused, _) = l.call(Some(POD_B), "reserve", json!({"budget": "low", "amount": 600_000})).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::PAYMENT_REQUIRED, Some("insufficient_credits"))
    );
    let id = reserved["reservationId"].as_str().unwrap();
    let (_, figures, _) =
        l.call(Some(POD_A), "settle", json!({"budget": "low", "reservationId": id, "cost": 250_000})).await;
    assert_eq!((figures["spent"].as_u64(), figures["outstanding"].as_u64()), (Some(250_000), Some(0)));

    let mut admitted = 0;
    for pod in [POD_A, POD_B, "team-a:pod-c"] {
        let (_, grant, _) = l.call(Some(pod), "lease", json!({"budget": "rpm", "want": {"requests": 10}})).await;
        admitted += grant["granted"]["requests"].as_u64().unwrap();
    }
    assert_eq!(admitted, 3, "three pods share the key's 3 requests a minute");
}

/// A team (no key of its own) above the keys a template issued, one of them with top-up: every
/// level's status, the team's 402 over HTTP, the top-up's Event, and a new leader that reads
/// the template's status back.
#[tokio::test(start_paused = true)]
async fn a_team_and_the_keys_a_template_issued_are_kept_in_their_statuses() {
    let team = budget("team", Some(3_000_000), None, None);
    let issued = |secret: &str| Budget {
        name: format!("bots:{secret}"),
        parent: Some("team".into()),
        top_up: Some(TopUpPolicy { threshold: 1_000_000, amount: 2_000_000, max_per_period: 4_000_000 }),
        ..budget("", Some(2_000_000), None, None)
    };
    let budgets = [team, issued("one"), issued("two")];
    let store = Arc::new(Store::default());
    let l = ledger(true, store.clone(), &budgets).await;
    // 1.5 of 2 would leave 0.5, under the threshold of 1: topped up by 2 first.
    let (status, reserved, _) =
        l.call(Some(POD_A), "reserve", json!({"budget": "bots:one", "amount": 1_500_000})).await;
    assert_eq!(status, StatusCode::OK, "{reserved}");
    assert_eq!(reserved["budget"]["toppedUp"], 2_000_000);
    assert_eq!(reserved["budget"]["parents"][0]["budget"], "team-a/team");
    let id = reserved["reservationId"].as_str().unwrap();
    let (status, _, _) =
        l.call(Some(POD_A), "settle", json!({"budget": "bots:one", "reservationId": id, "cost": 1_500_000})).await;
    assert_eq!(status, StatusCode::OK);
    // Two's own 2 would cover 1.8; the team's 1.5 left does not (nor has it a whole top-up).
    let (status, refused, _) = l.call(Some(POD_B), "reserve", json!({"budget": "bots:two", "amount": 1_800_000})).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{refused}");
    assert_eq!(
        (refused["error"]["refusal"]["budget"].as_str(), refused["error"]["refusal"]["remaining"].as_u64()),
        (Some("team-a/team"), Some(1_500_000))
    );
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("team-a/team")), "{refused}");

    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let template = store.status("bots");
    let keys: Vec<(&str, Option<&str>, Option<&str>)> = template
        .keys
        .iter()
        .map(|k| (k.secret.as_str(), k.ledger.spent.as_deref(), k.ledger.topped_up.as_deref()))
        .collect();
    assert_eq!(keys, [("one", Some("1.5"), Some("2")), ("two", Some("0"), None)], "{template:?}");
    let team = store.status("team");
    assert_eq!(
        (team.ledger.spent.as_deref(), team.ledger.remaining.as_deref(), team.ledger.own_spent.as_deref()),
        (Some("1.5"), Some("1.5"), Some("0")),
        "the team's spend is its keys'"
    );
    let told = store.told.lock().unwrap().clone();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!((told[0].0.as_str(), told[0].1.as_str()), ("team-a/bots", "ToppedUp"));
    assert!(told[0].2.contains("Secret \"one\"") && told[0].2.contains("by 2 "), "{told:?}");
    assert!(l.metrics.render().contains("sideyard_operator_budget_top_ups_total 1"));

    // A new leader goes on from the statuses: the team's spend and one's top-up are kept.
    let next = ledger(true, store.clone(), &budgets).await;
    let (_, holdings, _) = next.call(Some(POD_A), "holdings", json!({"budget": "bots:one", "held": []})).await;
    assert_eq!(holdings["budget"]["toppedUp"], 2_000_000, "{holdings}");
    assert_eq!(holdings["budget"]["parents"][0]["spent"], 1_500_000, "{holdings}");
}
