//! The fleet's budget ledger as the operator's leader serves it to sidecars: who is calling (a
//! projected ServiceAccount token, checked with a TokenReview), which budgets they may touch
//! (their namespace's), and what must be persisted (in `ApiKeyBudget.status`) before a grant is
//! answered. The accounting itself is [`crate::budget::fleet`].
//!
//! Calls (JSON over HTTP/2, see [`crate::budget::protocol`]): `POST /ledger/v1/lease`, `/report`,
//! `/reserve` and `/settle`. A replica that does not lead answers 503 `not_leader`, naming the
//! leader's ledger URL when it knows it.

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use crate::traces::Traces;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use kube::runtime::events::EventType;

use super::events::Events;
use super::inject::TOKEN_AUDIENCE;
use super::leader::Leadership;
use super::metrics::OperatorMetrics;
use crate::api::units::{format_micros, parse_micros};
use crate::api::{
    ApiKeyBudgetStatus, IssuedKey, LEDGER_CONDITION, LedgerBook, LedgerLease, LedgerWrite, SpendInPeriod,
};
use crate::budget::fleet::{FleetLedger, Lease, PeriodSpend, Persist, Persisted, Taken, Terms, TopUp, written_with};
use crate::budget::period::{parse_rfc3339, rfc3339};
use crate::budget::protocol::{
    Allowance, BudgetFigures, Debt, Holdings, LeaseRequest, Refused, Report, ReserveRequest, Settle,
};
use crate::config::{Budget, issued_by, status_owner};

/// The field manager of the ledger's status fields (the reconciler owns the conditions).
pub const FIELD_MANAGER: &str = "sideyard-ledger";
/// How long a checked token is trusted before it is checked again.
const TOKEN_CACHE: Duration = Duration::from_secs(30);
/// Budgets are written at most about this often, however busy.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A sidecar, as its token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    /// The pod: a lease's holder (the user name, for a token bound to no pod).
    pub pod: String,
    /// The pod the token is bound to: whose configuration the stream serves.
    pub bound_pod: Option<BoundPod>,
}

/// The pod a token is bound to, as the TokenReview names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    /// Absent from reviews of older API servers.
    pub uid: Option<String>,
}

/// What a token check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Review {
    /// A valid token for [`TOKEN_AUDIENCE`], of this user, with the pod it was bound to, if any.
    Authenticated { username: String, pod: Option<BoundPod> },
    /// Invalid, expired, or for another audience; the message says which, as far as known.
    Rejected(String),
}

/// Checks tokens: the cluster's TokenReview, or a script in tests.
pub trait Reviewer: Send + Sync + 'static {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, String>>;
}

/// Where budgets' ledger figures are kept: `ApiKeyBudget.status` in a cluster.
pub trait StatusStore: Send + Sync + 'static {
    /// The status of `namespace/name` as stored now, to go on from.
    fn load<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ApiKeyBudgetStatus>, String>>;
    /// Writes the ledger's fields of a status.
    fn save<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: ApiKeyBudgetStatus,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Tells the budget's users what the ledger did to it (an Event in a cluster).
    fn tell<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        reason: &'a str,
        note: String,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// The ledger service: the fleet's books behind the leader check, authentication and
/// persistence.
pub struct FleetService {
    fleet: Mutex<FleetLedger>,
    leadership: Leadership,
    reviewer: Arc<dyn Reviewer>,
    store: Arc<dyn StatusStore>,
    metrics: Arc<OperatorMetrics>,
    /// Checked tokens by their SHA-256, until when they are trusted.
    tokens: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
    /// Flushes started, and the last one completed with the budgets it could not write.
    flushes_started: AtomicU64,
    flushed: watch::Sender<Flushed>,
    wake_flusher: Notify,
    urgent_flush: Notify,
    /// The leader's ledger URL, for the answer of a replica that does not lead.
    leader_url: watch::Receiver<Option<String>>,
    /// This replica's term (its identity and start) and when it began, for the `Ledger`
    /// condition.
    term: String,
    since: Time,
}

#[derive(Clone, Debug, Default)]
struct Flushed {
    number: u64,
    failed: HashSet<String>,
}

/// An error answer: a status and a code a client can act on.
#[derive(Debug)]
pub struct LedgerError {
    status: StatusCode,
    code: &'static str,
    message: String,
    leader: Option<String>,
    /// The ledger's refusal, for the client to act on (`error.refusal`).
    refused: Option<Refused>,
}

impl LedgerError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        LedgerError { status, code, message: message.into(), leader: None, refused: None }
    }
}

impl IntoResponse for LedgerError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"error": {"message": self.message, "code": self.code}});
        if let Some(refused) = &self.refused {
            body["error"]["refusal"] = serde_json::to_value(refused).unwrap_or_default();
        }
        let mut response =
            (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        if let Some(url) = self.leader.and_then(|u| HeaderValue::from_str(&u).ok()) {
            response.headers_mut().insert(LEADER_HEADER, url);
        }
        response
    }
}

/// Names the leader's ledger URL on a follower's answer.
pub const LEADER_HEADER: &str = "x-sideyard-ledger-leader";

fn refusal(refused: Refused) -> LedgerError {
    let (status, code, message) = match &refused {
        Refused::InsufficientCredits { remaining, budget } => (
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_credits",
            match budget {
                None => format!("not enough credit: {} remain unleased", format_micros(*remaining)),
                Some(budget) => format!(
                    "not enough credit in {budget}, a budget above this key's: {} remain unleased",
                    format_micros(*remaining)
                ),
            },
        ),
        Refused::RateLimited { limit, reset } => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("the key's limit of {limit} per minute is used up; {reset} s to the next window"),
        ),
        Refused::UnknownBudget => (
            StatusCode::NOT_FOUND,
            "unknown_budget",
            "no such ApiKeyBudget in the caller's namespace (or not compiled yet)".into(),
        ),
        Refused::UnknownLease => (StatusCode::NOT_FOUND, "unknown_lease", "no such lease of the caller's".into()),
        Refused::TakingOver => (
            StatusCode::SERVICE_UNAVAILABLE,
            "taking_over",
            "this ledger has just taken over: what the last one may have had out is counted once every pod has said what it holds; try again in a few seconds".into(),
        ),
    };
    LedgerError { refused: Some(refused), ..LedgerError::new(status, code, message) }
}

impl FleetService {
    pub fn new(
        id_prefix: String,
        leadership: Leadership,
        reviewer: Arc<dyn Reviewer>,
        store: Arc<dyn StatusStore>,
        metrics: Arc<OperatorMetrics>,
        leader_url: watch::Receiver<Option<String>>,
    ) -> Arc<Self> {
        Arc::new(FleetService {
            term: id_prefix.clone(),
            since: Time(Timestamp::now()),
            fleet: Mutex::new(FleetLedger::new(id_prefix)),
            leadership,
            reviewer,
            store,
            metrics,
            tokens: Mutex::default(),
            flushes_started: AtomicU64::new(0),
            flushed: watch::channel(Flushed::default()).0,
            wake_flusher: Notify::new(),
            urgent_flush: Notify::new(),
            leader_url,
        })
    }

    /// The budgets of `namespace` the ledger serves, as compiled: new ones start from their
    /// stored status, changed terms apply at once, removed ones go (their names are returned).
    pub async fn sync_namespace(&self, namespace: &str, budgets: &[Budget]) -> Result<Vec<String>, String> {
        let now = now_ms();
        let known: HashSet<String> = {
            let fleet = lock(&self.fleet);
            budgets.iter().map(|b| b.id()).filter(|id| fleet.figures(id, now).is_some()).collect()
        };
        let mut entries = Vec::with_capacity(budgets.len());
        // Keys a template issued are kept in its status: read once for all of them.
        let mut loaded: HashMap<&str, Option<ApiKeyBudgetStatus>> = HashMap::new();
        for budget in budgets {
            let id = budget.id();
            let persisted = if known.contains(&id) {
                None
            } else {
                let owner = status_owner(&budget.name);
                if !loaded.contains_key(owner) {
                    loaded.insert(owner, self.store.load(&budget.namespace, owner).await?);
                }
                Some(persisted_of(loaded.get(owner).and_then(Option::as_ref), &budget.name))
            };
            entries.push((id, Terms::from(budget), persisted));
        }
        let dropped = lock(&self.fleet).set_namespace(namespace, entries, now);
        // An issued key has no status of its own to retire.
        Ok(dropped
            .into_iter()
            .filter_map(|id| id.split_once('/').map(|(_, name)| name.to_string()))
            .filter(|name| issued_by(name).is_none())
            .collect())
    }

    /// Writes changed budgets to their status, at most once per `FLUSH_INTERVAL` (1 s), and tells
    /// the calls waiting for their grants to be persisted. Runs until `shutdown`.
    pub async fn keep_persisted(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = self.wake_flusher.notified() => {}
                () = tokio::time::sleep(FLUSH_INTERVAL) => {}
                () = &mut shutdown => return,
            }
            let started = Instant::now();
            let now = now_ms();
            let (number, dirty, top_ups) = {
                let mut fleet = lock(&self.fleet);
                fleet.sweep(now);
                (self.flushes_started.fetch_add(1, Ordering::SeqCst) + 1, fleet.take_dirty(now), fleet.take_top_ups())
            };
            let mut failed = HashSet::new();
            // One write per status: a budget's own, or a template's with every key it issued.
            let mut statuses: Vec<(String, Vec<Taken>)> = Vec::new();
            for book in dirty {
                let owner = written_with(&book.0).to_string();
                match statuses.last_mut() {
                    Some((last, books)) if *last == owner => books.push(book),
                    _ => statuses.push((owner, vec![book])),
                }
            }
            for (owner, books) in &statuses {
                let Some((namespace, name)) = owner.split_once('/') else { continue };
                let outstanding = books.iter().map(|(_, _, f)| f.outstanding).fold(0, u64::saturating_add);
                let status = status_of(books, self.condition(outstanding));
                match self.store.save(namespace, name, status).await {
                    Ok(()) => {
                        self.metrics.status_writes.inc();
                        let mut fleet = lock(&self.fleet);
                        for (id, persisted, _) in books {
                            fleet.confirm(id, persisted);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(budget = %owner, error = %e, "cannot write the budget's ledger status; grants wait for it");
                        self.metrics.ledger_persist_failures.inc();
                        let mut fleet = lock(&self.fleet);
                        for (id, _, _) in books {
                            fleet.mark_dirty(id);
                            failed.insert(id.clone());
                        }
                    }
                }
            }
            for top_up in top_ups {
                self.tell_top_up(&top_up).await;
            }
            self.flushed.send_replace(Flushed { number, failed });
            // At most a write a second per budget, but for a new sidecar's first calls.
            tokio::select! {
                () = tokio::time::sleep_until(started + FLUSH_INTERVAL) => {}
                () = self.urgent_flush.notified() => {}
            }
        }
    }

    /// Logs, counts and tells (as an Event on the budget) a top-up of its limit.
    async fn tell_top_up(&self, top_up: &TopUp) {
        let (added, this_period) = (format_micros(top_up.added), format_micros(top_up.this_period));
        tracing::info!(budget = %top_up.budget, %added, %this_period, "budget topped up from its parent");
        self.metrics.top_ups.inc();
        let Some((namespace, name)) = top_up.budget.split_once('/') else { return };
        // A key a template issued is told of on the template, naming its Secret.
        let (object, key) = match issued_by(name) {
            Some((template, secret)) => (template, format!("the key of Secret {secret:?}")),
            None => (name, "the key".to_string()),
        };
        let note = format!("{key} was topped up by {added} from its parent's credit ({this_period} this period)");
        if let Err(e) = self.store.tell(namespace, object, "ToppedUp", note).await {
            tracing::warn!(budget = %top_up.budget, error = %e, "cannot post the top-up's Event");
        }
    }

    /// The `Ledger` condition of a budget this replica's ledger keeps.
    fn condition(&self, outstanding: u64) -> Condition {
        Condition {
            type_: LEDGER_CONDITION.into(),
            status: "True".into(),
            reason: "Serving".into(),
            message: format!(
                "kept by the ledger of operator replica {}; {} outstanding in leases and reservations",
                self.term,
                format_micros(outstanding)
            ),
            last_transition_time: self.since.clone(),
            observed_generation: None,
        }
    }

    /// Waits until what was changed in `budget` before `since` (a [`FleetService::flushes_started`]
    /// reading taken with the change) is written.
    /// `urgent`: for a sidecar the written status does not name yet, the write is not held back
    /// until the write interval has passed (a pod's first calls, at its start).
    async fn persisted(&self, budget: &str, since: u64, urgent: bool) -> Result<(), LedgerError> {
        self.wake_flusher.notify_one();
        if urgent {
            self.urgent_flush.notify_one();
        }
        let mut flushed = self.flushed.subscribe();
        let wait = flushed.wait_for(|f| f.number > since);
        match tokio::time::timeout(FLUSH_INTERVAL * 10, wait).await {
            Ok(Ok(f)) if !f.failed.contains(budget) => Ok(()),
            _ => Err(LedgerError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                "the ledger could not persist the budget's status; try again shortly",
            )),
        }
    }

    /// The caller, from `Authorization: Bearer <token>`.
    async fn identify(&self, headers: &HeaderMap) -> Result<Caller, LedgerError> {
        let unauthorized = |message: String| {
            self.metrics.token_review("refused");
            LedgerError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("no token: send the pod's projected ServiceAccount token (audience sideyard) as Authorization: Bearer".into()))?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((caller, until)) = lock(&self.tokens).get(&key)
            && Instant::now() < *until
        {
            return Ok(caller.clone());
        }
        let review = self.reviewer.review(token).await.map_err(|e| {
            self.metrics.token_review("error");
            LedgerError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "token_review_failed",
                format!("cannot check the token: {e}"),
            )
        })?;
        let (username, pod) = match review {
            Review::Authenticated { username, pod } => (username, pod),
            Review::Rejected(reason) => return Err(unauthorized(format!("the token was refused: {reason}"))),
        };
        let Some((namespace, _account)) =
            username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'))
        else {
            return Err(unauthorized(format!("{username} is not a ServiceAccount")));
        };
        let caller = Caller {
            namespace: namespace.to_string(),
            pod: pod.as_ref().map_or_else(|| username.clone(), |p| p.name.clone()),
            bound_pod: pod,
        };
        self.metrics.token_review("authenticated");
        let mut tokens = lock(&self.tokens);
        let now = Instant::now();
        tokens.retain(|_, (_, until)| now < *until);
        tokens.insert(key, (caller.clone(), now + TOKEN_CACHE));
        Ok(caller)
    }

    /// The leader check, then the caller: what every call to the ledger's listener starts with.
    pub(super) async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, LedgerError> {
        if !self.leadership.is_leader() {
            let leader = self.leader_url.borrow().clone();
            let message = match &leader {
                Some(url) => format!("this replica does not lead; the ledger is at {url}"),
                None => "this replica does not lead, and the leader is not known yet; try again shortly".into(),
            };
            return Err(LedgerError {
                leader,
                ..LedgerError::new(StatusCode::SERVICE_UNAVAILABLE, "not_leader", message)
            });
        }
        self.identify(headers).await
    }

    /// [`FleetService::authenticate`], and the budget's id, shared by every ledger call.
    async fn admit(&self, headers: &HeaderMap, budget: &str) -> Result<(Caller, String), LedgerError> {
        let caller = self.authenticate(headers).await?;
        // `namespace/name`, or a name of the caller's namespace.
        let (namespace, name) = budget.split_once('/').unwrap_or((caller.namespace.as_str(), budget));
        if namespace != caller.namespace {
            self.metrics.token_review("wrong_namespace");
            return Err(LedgerError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "the token is of namespace {}: a sidecar touches the budgets of its own namespace only, not {namespace}'s",
                    caller.namespace
                ),
            ));
        }
        let id = format!("{namespace}/{name}");
        Ok((caller, id))
    }
}

/// Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The routes of the ledger.
pub fn router(service: Arc<FleetService>) -> Router {
    Router::new()
        .route("/ledger/v1/lease", post(lease))
        .route("/ledger/v1/report", post(report))
        .route("/ledger/v1/reserve", post(reserve))
        .route("/ledger/v1/settle", post(settle))
        .route("/ledger/v1/debt", post(debt))
        .route("/ledger/v1/holdings", post(holdings))
        .with_state(service)
}

fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, LedgerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| LedgerError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("invalid request body: {e}")))
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], serde_json::to_string(value).unwrap_or_default()).into_response()
}

/// One ledger call: its body read, the caller admitted, `apply` run on the caller's budget, and
/// the answer sent, once the budget's status holds what changed when `apply` says it must
/// (refusals change nothing and are answered at once); counted by its result.
async fn call<R, T>(
    service: Arc<FleetService>,
    name: &'static str,
    headers: HeaderMap,
    bytes: Bytes,
    budget: fn(&R) -> &str,
    apply: impl FnOnce(&mut FleetLedger, &str, &str, &R, u64) -> Result<(T, Persist), Refused>,
) -> Response
where
    R: serde::de::DeserializeOwned,
    T: serde::Serialize,
{
    let start = SystemTime::now();
    let mut traced: Vec<KeyValue> = Vec::new();
    let result = async {
        let request: R = body(&bytes)?;
        let (caller, id) = service.admit(&headers, budget(&request)).await?;
        if Traces::global().is_some() {
            traced.push(KeyValue::new("sideyard.budget", id.clone()));
            traced.push(KeyValue::new("k8s.pod.name", caller.pod.clone()));
        }
        let (answer, persist, since) = {
            let mut fleet = lock(&service.fleet);
            let (answer, persist) = apply(&mut fleet, &id, &caller.pod, &request, now_ms()).map_err(refusal)?;
            (answer, persist, service.flushes_started.load(Ordering::SeqCst))
        };
        if persist.waits() {
            service.metrics.ledger_persist_wait(name);
            service.persisted(&id, since, persist == Persist::NewHolder).await?;
        }
        Ok::<_, LedgerError>(answer)
    }
    .await;
    let code = result.as_ref().map_or_else(|e| e.code, |_| "ok");
    service.metrics.ledger_call(name, code);
    if let Some(traces) = Traces::global() {
        traced.push(KeyValue::new("sideyard.ledger.call", name));
        traced.push(KeyValue::new("sideyard.result", code));
        let error = result.as_ref().err().map(|e| e.code.to_string());
        let parent = headers.get("traceparent").map(http::HeaderValue::as_bytes);
        traces.record(parent, SpanKind::Server, format!("ledger {name}"), start, traced, error);
    }
    match result {
        Ok(answer) => json(&answer),
        Err(e) => e.into_response(),
    }
}

async fn lease(State(service): State<Arc<FleetService>>, headers: HeaderMap, bytes: Bytes) -> Response {
    let metrics = service.metrics.clone();
    call(
        service,
        "lease",
        headers,
        bytes,
        |r: &LeaseRequest| &r.budget,
        |fleet, id, pod, r, now| {
            let (grant, persist) = fleet.lease_persisting(id, pod, r, now)?;
            metrics.leased(grant.granted.credit);
            Ok((grant, persist))
        },
    )
    .await
}

async fn report(State(service): State<Arc<FleetService>>, headers: HeaderMap, bytes: Bytes) -> Response {
    call(
        service,
        "report",
        headers,
        bytes,
        |r: &Report| &r.budget,
        // The sidecar keeps what it reported until an answer says a write holds it.
        |fleet, id, pod, r, now| fleet.report(id, pod, r, now).map(|figures| (figures, Persist::Eventually)),
    )
    .await
}

async fn reserve(State(service): State<Arc<FleetService>>, headers: HeaderMap, bytes: Bytes) -> Response {
    call(
        service,
        "reserve",
        headers,
        bytes,
        |r: &ReserveRequest| &r.budget,
        |fleet, id, pod, r, now| fleet.reserve_persisting(id, pod, r.amount, now),
    )
    .await
}

async fn settle(State(service): State<Arc<FleetService>>, headers: HeaderMap, bytes: Bytes) -> Response {
    call(
        service,
        "settle",
        headers,
        bytes,
        |r: &Settle| &r.budget,
        |fleet, id, pod, r, now| {
            fleet.settle(id, pod, &r.reservation_id, r.cost, r.tokens, now).map(|f| (f, Persist::Eventually))
        },
    )
    .await
}

async fn debt(State(service): State<Arc<FleetService>>, headers: HeaderMap, bytes: Bytes) -> Response {
    call(
        service,
        "debt",
        headers,
        bytes,
        |r: &Debt| &r.budget,
        |fleet, id, pod, r, now| fleet.debt(id, pod, r, now).map(|f| (f, Persist::Eventually)),
    )
    .await
}

async fn holdings(State(service): State<Arc<FleetService>>, headers: HeaderMap, bytes: Bytes) -> Response {
    call(
        service,
        "holdings",
        headers,
        bytes,
        |r: &Holdings| &r.budget,
        |fleet, id, pod, r, now| fleet.holdings(id, pod, r, now).map(|f| (f, Persist::Eventually)),
    )
    .await
}

/// The ledger's fields of a budget's status. `books` are what one status holds: a budget's own
/// book, or the books of the keys a template issued (`namespace/template:secret`).
pub fn status_of(books: &[Taken], condition: Condition) -> ApiKeyBudgetStatus {
    let mut status = ApiKeyBudgetStatus { conditions: vec![condition], ..ApiKeyBudgetStatus::default() };
    for (id, persisted, figures) in books {
        let book = book_of(persisted, figures);
        match id.split_once('/').and_then(|(_, name)| issued_by(name)) {
            Some((_, secret)) => status.keys.push(IssuedKey { secret: secret.to_string(), ledger: book }),
            None => status.ledger = book,
        }
    }
    status
}

/// What the status keeps of one book.
fn book_of(persisted: &Persisted, figures: &BudgetFigures) -> LedgerBook {
    LedgerBook {
        spent: Some(format_micros(figures.spent)),
        own_spent: (figures.spent != persisted.spent).then(|| format_micros(persisted.spent)),
        remaining: figures.remaining.map(format_micros),
        period_start: Some(rfc3339(persisted.period_start)),
        state: Some(figures.state),
        outstanding: Some(format_micros(figures.outstanding)),
        leases: persisted
            .leases
            .iter()
            .map(|l| LedgerLease {
                id: l.id.clone(),
                holder: l.holder.clone(),
                granted: format_micros(l.granted.credit),
                used: format_micros(l.used.credit),
                granted_requests: l.granted.requests,
                granted_tokens: l.granted.tokens,
                used_requests: l.used.requests,
                used_tokens: l.used.tokens,
                window: l.window,
                expires_at_millis: l.expires_at,
                done: l.done,
            })
            .collect(),
        pledged: Some(format_micros(persisted.pledged)),
        holders: persisted.holders.clone(),
        ledger_writes: persisted.writes.iter().map(|&(term, version)| LedgerWrite { term, version }).collect(),
        spent_in: persisted
            .spent_in
            .iter()
            .map(|s| SpendInPeriod { period: s.period, start: rfc3339(s.start), spent: format_micros(s.spent) })
            .collect(),
        topped_up: (persisted.topped_up > 0).then(|| format_micros(persisted.topped_up)),
    }
}

/// Says in a budget's status that the fleet's ledger no longer keeps it (`reason`, `message`),
/// when its `Ledger` condition still says it does. The ledger's figures stay as last written:
/// leases already granted stay true until they expire, and a ledger that keeps the budget again
/// goes on from them.
pub async fn retire(
    store: &dyn StatusStore,
    namespace: &str,
    name: &str,
    reason: &str,
    message: &str,
) -> Result<(), String> {
    let Some(status) = store.load(namespace, name).await? else { return Ok(()) };
    if !status.kept_by_ledger() {
        return Ok(());
    }
    let condition = Condition {
        type_: LEDGER_CONDITION.into(),
        status: "False".into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: None,
    };
    // Only the ledger's fields: the others are the controller's.
    let status =
        ApiKeyBudgetStatus { observed_generation: None, config_version: None, conditions: vec![condition], ..status };
    store.save(namespace, name, status).await
}

/// What a new leader goes on from: the book of budget `name` (a key a template issued included)
/// in a stored status read back. Figures it cannot read count as nothing spent and no lease (they
/// were written by this code).
pub fn persisted_of(status: Option<&ApiKeyBudgetStatus>, name: &str) -> Persisted {
    let book = match (status, issued_by(name)) {
        (None, _) => None,
        (Some(status), None) => Some(&status.ledger),
        (Some(status), Some((_, secret))) => status.keys.iter().find(|k| k.secret == secret).map(|k| &k.ledger),
    };
    let Some(book) = book else { return Persisted::default() };
    let micros = |s: &Option<String>| s.as_deref().and_then(|s| parse_micros(s).ok()).unwrap_or(0);
    let leases = book
        .leases
        .iter()
        .map(|l| Lease {
            id: l.id.clone(),
            holder: l.holder.clone(),
            granted: Allowance {
                credit: parse_micros(&l.granted).unwrap_or(0),
                requests: l.granted_requests,
                tokens: l.granted_tokens,
            },
            used: Allowance {
                credit: parse_micros(&l.used).unwrap_or(0),
                requests: l.used_requests,
                tokens: l.used_tokens,
            },
            window: l.window,
            expires_at: l.expires_at_millis,
            done: l.done,
        })
        .collect();
    let period_start = book.period_start.as_deref().and_then(parse_rfc3339).unwrap_or(0);
    Persisted {
        // `spent` counts the budgets below too; its own is apart when they differ.
        spent: micros(if book.own_spent.is_some() { &book.own_spent } else { &book.spent }),
        period_start,
        spent_in: book
            .spent_in
            .iter()
            .filter_map(|s| {
                Some(PeriodSpend {
                    period: s.period,
                    start: parse_rfc3339(&s.start)?,
                    spent: parse_micros(&s.spent).ok()?,
                })
            })
            .collect(),
        topped_up: micros(&book.topped_up),
        leases,
        pledged: micros(&book.pledged),
        holders: book.holders.clone(),
        writes: book.ledger_writes.iter().map(|w| (w.term, w.version)).collect(),
    }
}

/// The cluster's token check: a TokenReview for [`TOKEN_AUDIENCE`].
pub struct KubeReviewer(pub kube::Client);

impl Reviewer for KubeReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, String>> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![TOKEN_AUDIENCE.into()]) },
                ..Default::default()
            };
            let api = kube::Api::<TokenReview>::all(self.0.clone());
            let reviewed = api.create(&kube::api::PostParams::default(), &review).await.map_err(|e| e.to_string())?;
            let status = reviewed.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                let reason = status.error.unwrap_or_else(|| "not authenticated".into());
                return Ok(Review::Rejected(reason));
            }
            if !status.audiences.unwrap_or_default().iter().any(|a| a == TOKEN_AUDIENCE) {
                return Ok(Review::Rejected(format!("the token is not for the audience {TOKEN_AUDIENCE}")));
            }
            let user = status.user.unwrap_or_default();
            let extra = |key: &str| user.extra.as_ref().and_then(|e| e.get(key)).and_then(|v| v.first()).cloned();
            let pod = extra("authentication.kubernetes.io/pod-name")
                .map(|name| BoundPod { name, uid: extra("authentication.kubernetes.io/pod-uid") });
            Ok(Review::Authenticated { username: user.username.unwrap_or_default(), pod })
        })
    }
}

/// The cluster's status store: `ApiKeyBudget.status`, written by server-side apply with the
/// ledger's own field manager; what it tells, as Events.
pub struct KubeStatusStore {
    client: kube::Client,
    events: Events,
}

impl KubeStatusStore {
    /// `instance`: the replica, as its Events name it.
    pub fn new(client: kube::Client, instance: impl Into<String>) -> Self {
        KubeStatusStore { events: Events::new(client.clone(), FIELD_MANAGER, instance), client }
    }
}

impl StatusStore for KubeStatusStore {
    fn load<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ApiKeyBudgetStatus>, String>> {
        Box::pin(async move {
            let api = kube::Api::<crate::api::ApiKeyBudget>::namespaced(self.client.clone(), namespace);
            match api.get_status(name).await {
                Ok(budget) => Ok(budget.status),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn save<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: ApiKeyBudgetStatus,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let api = kube::Api::<crate::api::ApiKeyBudget>::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({
                "apiVersion": crate::api::API_VERSION,
                "kind": "ApiKeyBudget",
                "status": status,
            });
            let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
            api.patch_status(name, &params, &kube::api::Patch::Apply(&patch))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
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
            let regarding = ObjectReference {
                api_version: Some(crate::api::API_VERSION.into()),
                kind: Some("ApiKeyBudget".into()),
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..ObjectReference::default()
            };
            self.events.publish(&regarding, EventType::Normal, reason, &note).await.map_err(|e| e.to_string())
        })
    }
}
