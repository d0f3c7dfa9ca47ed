//! The request path: read the few fields routing needs, then for each route of the request
//! (`model`, then `models`) plan its targets and try them, falling back and hedging as the route
//! allows, until one answers.
//!
//! Fallback happens only before anything of the answer has reached the caller: a JSON answer is
//! read whole first, and a stream is held back until its first token (see [`attempt`]).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::endpoint::{Api, Endpoint};
use super::error::{
    ATTEMPTS, AttemptFailure, CONFIG_VERSION, FALLBACK_REASON, HEDGED, ProxyError, TARGET, add_rate_headers,
};
use super::request_log::{self, Outcome};
use crate::api::FallbackReason;
use crate::api::units::format_micros;
use crate::config::Format;
use crate::providers::BYTES_PER_TOKEN;
use crate::providers::facts::{answer_text, facts, input_messages};
use crate::providers::openai::{self, RequestError, parse_chat_request, rename_model};
use crate::providers::responses;
use crate::sidecar::billing::{self, Bill, ServedBudget, StreamBill, caller_key, key_hash};
use crate::sidecar::observe::{Exchange, GENERATION_ID, Recording};
use crate::sidecar::routing::health::{self, AttemptOutcome, Transition};
use crate::sidecar::routing::plan;
use crate::sidecar::shared::Shared;
use crate::sidecar::snapshot::{ServedRoute, ServedTarget, Snapshot};
use crate::sidecar::upstream::attempt::{Answer, Failure, Finished, HealthEffect, Outgoing, attempt};
use crate::sidecar::upstream::relay::SseRelay;

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    converse(shared, request, Endpoint::Chat).await
}

/// `POST /v1/messages`: Anthropic's Messages API, routed the same way.
pub async fn messages(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    converse(shared, request, Endpoint::Messages).await
}

/// `POST /v1/responses`: OpenAI's Responses API, stateless.
pub async fn responses(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    converse(shared, request, Endpoint::Responses).await
}

/// `POST /v1/completions`: OpenAI's legacy completions, for OpenAI-compatible targets.
pub async fn completions(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    converse(shared, request, Endpoint::Completions).await
}

/// `POST /v1/embeddings`, for routes that serve embeddings.
pub async fn embeddings(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    converse(shared, request, Endpoint::Embeddings).await
}

/// A request of a routed `endpoint`, answered in the endpoint's format whatever format each target
/// speaks. The routing fields have the same names in every one (`model`, `stream`, `max_tokens`;
/// Anthropic's `fallbacks` is read as `models`).
async fn converse(shared: Arc<Shared>, request: Request, endpoint: Endpoint) -> Response {
    let arrived = Instant::now();
    shared.states.api_calls[Api::Routed(endpoint).index()].inc();
    let caller = endpoint.format();
    let snapshot = shared.snapshot.load_full();
    let (parts, body) = request.into_parts();
    let mut record = Recording(shared.observers.as_ref().map(|o| o.start(&parts, true, arrived)));
    // A request refused before any route took it, logged as it ends.
    let refuse = |record: &mut Recording, error: ProxyError, model: Option<&str>| {
        let response = unrouted_as(&shared, error, caller);
        let outcome = Outcome::refused(&parts.headers, parts.uri.path(), model, response.status().as_u16());
        shared.states.request_log.record(outcome);
        let mut response = response;
        record.answer(&mut response);
        response
    };
    let body = match read_request(&shared, body).await {
        Ok(body) => body,
        Err(error) => return refuse(&mut record, error, None),
    };
    let chat = match parse_chat_request(&body) {
        Ok(chat) => chat,
        Err(e) => return refuse(&mut record, bad_request(e), None),
    };
    if let Some(r) = record.0.as_deref_mut() {
        r.model = Some(chat.model.to_string());
    }
    if caller == Format::Anthropic && chat.max_tokens.is_none() {
        let error = ProxyError::BadRequest { code: "missing_max_tokens", message: "max_tokens: Field required".into() };
        return refuse(&mut record, error, Some(&chat.model));
    }
    if let Some(content) = record.0.as_deref_mut().and_then(|r| r.content.as_deref_mut()) {
        content.ask(input_messages(&body).unwrap_or_default());
    }
    if let Some(r) = record.0.as_deref_mut() {
        r.prompt_estimate = body.len() as u64 / BYTES_PER_TOKEN;
    }

    // The routes to try: `model`, then each of `models` not already in the chain.
    let mut chain: Vec<&Arc<ServedRoute>> = Vec::with_capacity(1 + chat.models.len());
    for name in std::iter::once(&chat.model).chain(&chat.models) {
        let Some(route) = snapshot.route(name) else {
            let error = ProxyError::UnknownModel { model: name.to_string(), known: snapshot.known_models() };
            return refuse(&mut record, error, Some(&chat.model));
        };
        if route.serves != endpoint.serves() {
            let error = ProxyError::WrongEndpoint { model: name.to_string(), serves: route.serves, endpoint };
            return refuse(&mut record, error, Some(&chat.model));
        }
        if !chain.iter().any(|r| Arc::ptr_eq(r, route)) {
            chain.push(route);
        }
    }
    let budget = match authenticate(&parts.headers, &snapshot, &chain, shared.require_key) {
        Ok(budget) => budget,
        Err(e) => return refuse(&mut record, e, Some(&chat.model)),
    };
    if let (Some(r), Some(budget)) = (record.0.as_deref_mut(), &budget) {
        r.budget = Some(budget.id.clone());
    }
    let mut rate = None;
    if let Some(budget) = &budget {
        match billing::admit_rate(budget).await {
            Ok(status) => rate = status,
            Err(refused) => return refuse(&mut record, refused, Some(&chat.model)),
        }
    }

    let out = Outgoing {
        endpoint,
        chat: &chat,
        body: &body,
        caller_headers: &parts.headers,
        force_usage: budget.is_some() && chat.stream,
        arrived,
        trace: record.0.as_ref().and_then(|r| r.trace),
    };
    let mut trail = Trail { record: record.0.take(), ..Trail::default() };
    let mut response = None;
    for (k, route) in chain.iter().enumerate() {
        // An answer from a later route says so in its `model`, as OpenRouter's do.
        let rename = (k > 0).then(|| route.model_json.clone());
        match serve_route(route, &out, budget.as_deref(), &shared, rename, &mut trail).await {
            Ok(answer) | Err(Stop::Passthrough(answer)) => {
                response = Some(answer);
                break;
            }
            Err(Stop::Exhausted) if chat.prefs.allow_fallbacks => continue,
            Err(Stop::Exhausted) => break,
        }
    }
    record.0 = trail.record.take();
    // An answer recorded these as it was committed; a failure records them here.
    if let Some(r) = record.0.as_deref_mut().filter(|r| r.first_byte.is_none()) {
        (r.attempts, r.fallback) = (trail.attempts, trail.fell_back_on());
    }
    // The failures, for the log line: taken from the trail, copied only when it makes the error.
    let (mut response, failures) = match response {
        Some(response) => (response, std::mem::take(&mut trail.failures)),
        None => {
            let failures = trail.failures.clone();
            (trail.into_response(&chat.model, chain[0], caller), failures)
        }
    };
    if let Some(rate) = rate {
        add_rate_headers(response.headers_mut(), rate);
    }
    let status = response.status().as_u16();
    // Asked first: a request served at its first try builds nothing.
    if request_log::wanted(status, &failures) {
        shared.states.request_log.record(Outcome {
            headers: &parts.headers,
            path: parts.uri.path(),
            model: Some(&chat.model),
            route: Some(&chain[0].id),
            target: response.headers().get(TARGET).and_then(|v| v.to_str().ok()),
            failures: &failures,
            status,
        });
    }
    record.answer(&mut response);
    response
}

/// A request's body, up to `--max-request-bytes`.
pub(in crate::sidecar) async fn read_request(shared: &Shared, body: Body) -> Result<Bytes, ProxyError> {
    axum::body::to_bytes(body, shared.limits.max_request_bytes).await.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ProxyError::PayloadTooLarge { limit: shared.limits.max_request_bytes }
        } else {
            ProxyError::BadRequest { code: "invalid_body", message: format!("Could not read the request body: {e}") }
        }
    })
}

/// The caller's budget from its key ([`caller_key`]). Without a known key, the request is
/// refused if any of its routes has a budget, or if the sidecar requires keys.
pub(in crate::sidecar) fn authenticate(
    headers: &HeaderMap,
    snapshot: &Snapshot,
    chain: &[&Arc<ServedRoute>],
    require_key: bool,
) -> Result<Option<Arc<ServedBudget>>, ProxyError> {
    let key = caller_key(headers);
    let budget = key.and_then(|k| snapshot.budget(&key_hash(k)));
    match budget {
        Some(budget) => {
            if let Some(route) = chain.iter().find(|r| !budget.allows(&r.id)) {
                return Err(ProxyError::ModelNotAllowed { model: route.model.clone() });
            }
            Ok(Some(budget.clone()))
        }
        None if require_key || chain.iter().any(|r| r.budgeted) => {
            Err(ProxyError::Unauthorized { missing: key.is_none() })
        }
        None => Ok(None),
    }
}

/// Why a route did not answer.
enum Stop {
    /// A failure that does not fall back, with the upstream's own answer to pass on.
    Passthrough(Response),
    /// Every attempt failed, or no target could take the request; the next route may.
    Exhausted,
}

/// What a request has been through so far, across its routes: the failed attempts, the
/// constraints that excluded targets, and where the last attempt went.
#[derive(Default)]
struct Trail<'a> {
    failures: Vec<AttemptFailure>,
    /// Constraints that excluded targets, in the order met, without repeats.
    excluded: Vec<&'static str>,
    attempts: usize,
    /// The route and target of the last attempt, which error responses are counted on.
    last: Option<(&'a ServedRoute, usize)>,
    /// The request's record, until an answer's stream takes it.
    record: Record,
}

/// A request's record, when something observes requests.
type Record = Option<Box<Exchange>>;

impl Trail<'_> {
    #[inline]
    fn tried(&mut self, route: &Arc<ServedRoute>, index: Option<usize>, hedge: bool) {
        if let (Some(r), Some(index)) = (self.record.as_deref_mut(), index) {
            r.tried(route, index, hedge);
        }
    }

    fn exclude(&mut self, by: &[&'static str]) {
        for b in by {
            if !self.excluded.contains(b) {
                self.excluded.push(b);
            }
        }
    }

    /// The reason of the last failure the request fell back from, if it fell back at all.
    fn fell_back_on(&self) -> Option<FallbackReason> {
        self.failures.iter().rev().nth(1).map(|f| f.kind)
    }

    fn into_response(self, model: &str, first: &ServedRoute, caller: Format) -> Response {
        let attempts = self.attempts;
        let fell_back_on = self.fell_back_on();
        let error = if self.failures.is_empty() {
            ProxyError::NoTarget { model: model.to_string(), excluded_by: self.excluded }
        } else {
            ProxyError::AttemptsFailed { model: model.to_string(), attempts: self.failures, excluded_by: self.excluded }
        };
        match self.last {
            Some((route, index)) => {
                finish(error.into_response_as(caller), &route.targets[index], attempts, fell_back_on)
            }
            None => {
                first.state.requests.inc(error.status().as_u16());
                error.into_response_as(caller)
            }
        }
    }
}

type Running<'a> = Pin<Box<dyn Future<Output = Finished> + Send + 'a>>;

/// The attempts of one route: its plan, and the ones in flight (two while hedging).
struct RouteAttempts<'a> {
    route: &'a Arc<ServedRoute>,
    out: &'a Outgoing<'a>,
    shared: &'a Shared,
    queue: std::vec::IntoIter<usize>,
    panic: bool,
    started: usize,
    /// The request's attempts before this route's.
    before: usize,
    running: Vec<Running<'a>>,
}

impl<'a> RouteAttempts<'a> {
    /// Starts the next planned target that may take a request now; `None` when none is left or
    /// `maxAttempts` is reached.
    fn start_next(&mut self) -> Option<usize> {
        while self.started < self.route.fallback.max_attempts as usize {
            let index = self.queue.next()?;
            let health = &self.route.targets[index].state.health;
            let probe = if self.panic {
                health.force_probe();
                true
            } else {
                match health.acquire(health::now()) {
                    Some(probe) => probe,
                    // Ejected since the plan was made, or another request holds its probe.
                    None => continue,
                }
            };
            let number = self.before + self.started;
            self.started += 1;
            self.running.push(Box::pin(attempt(self.route, index, probe, self.out, self.shared, number)));
            return Some(index);
        }
        None
    }

    /// The next attempt to finish. Only called with attempts running.
    async fn next_finished(&mut self) -> Finished {
        poll_fn(|cx| {
            for i in 0..self.running.len() {
                if let Poll::Ready(finished) = self.running[i].as_mut().poll(cx) {
                    drop(self.running.swap_remove(i));
                    return Poll::Ready(finished);
                }
            }
            Poll::Pending
        })
        .await
    }
}

async fn serve_route<'a>(
    route: &'a Arc<ServedRoute>,
    out: &'a Outgoing<'a>,
    budget: Option<&ServedBudget>,
    shared: &'a Shared,
    rename: Option<String>,
    trail: &mut Trail<'a>,
) -> Result<Response, Stop> {
    let (chat, body) = (out.chat, out.body);
    let now = health::now();
    let tick = route.ticks.fetch_add(1, Ordering::Relaxed);
    // What the answer may generate: nothing for embeddings.
    let completion = match chat.max_tokens {
        _ if !out.endpoint.generates() => 0,
        Some(max_tokens) => max_tokens,
        None => u64::from(route.reserved_completion_tokens),
    };
    let need_tokens = (body.len() as u64 / BYTES_PER_TOKEN).saturating_add(chat.max_tokens.unwrap_or(0));
    let plan = {
        let candidates: Vec<plan::Candidate<'_>> = route.targets.iter().map(|t| t.candidate(now)).collect();
        plan::plan(route.strategy, &route.schedule, &candidates, &chat.prefs, need_tokens, tick)
    };
    let mut plan = match plan {
        Ok(plan) => plan,
        Err(excluded) => {
            route.state.count_excluded(&excluded.by);
            trail.exclude(&excluded.by);
            return Err(Stop::Exhausted);
        }
    };
    // Targets whose API has no such endpoint (legacy completions on Anthropic's) are passed over.
    if out.endpoint != Endpoint::Chat && out.endpoint != Endpoint::Messages {
        let first = plan.order.first().copied();
        plan.order
            .retain(|&i| out.endpoint.upstream(route.targets[i].format, route.targets[i].native_responses).is_some());
        if let (Some(first), true) = (first, plan.order.is_empty()) {
            let failure = Failure::unsupported(route, &route.targets[first], out.endpoint);
            route.state.requests.inc(StatusCode::BAD_REQUEST.as_u16());
            return Err(failure.passthrough.map_or(Stop::Exhausted, Stop::Passthrough));
        }
    }
    let reservation = match budget {
        Some(budget) => {
            let tries = plan.order.iter().take(route.fallback.max_attempts as usize);
            let prices = tries.map(|&i| &route.targets[i].prices);
            match billing::reserve(budget, prices, body.len() as u64, completion).await {
                Ok(reservation) => Some(reservation),
                Err(refused) => {
                    route.state.requests.inc(refused.status().as_u16());
                    return Err(Stop::Passthrough(refused.into_response_as(out.endpoint.format())));
                }
            }
        }
        None => None,
    };
    if plan.panic {
        route.state.panics.inc();
        let target = &route.targets[plan.order[0]];
        tracing::warn!(route = %route.id, upstream_target = %target.name, "every target is ejected or cooling down; trying the one that recovers soonest");
    }
    let mut run = RouteAttempts {
        route,
        out,
        shared,
        panic: plan.panic,
        queue: plan.order.into_iter(),
        started: 0,
        before: trail.attempts,
        running: Vec::with_capacity(2),
    };
    let first = run.start_next();
    trail.attempts += run.started;
    trail.tried(route, first, false);
    if first.is_none() {
        route.state.count_excluded(&["health"]);
        trail.exclude(&["health"]);
        return Err(Stop::Exhausted);
    }

    let hedge_at = route.hedge_after.map(|after| tokio::time::Instant::now() + after);
    let mut hedged = false;
    let mut hedge_target: Option<usize> = None;
    loop {
        let can_hedge = hedge_at.is_some() && !hedged && run.running.len() == 1 && run.queue.len() > 0;
        let finished = tokio::select! {
            finished = run.next_finished() => finished,
            _ = tokio::time::sleep_until(hedge_at.unwrap_or_else(tokio::time::Instant::now)), if can_hedge => {
                hedged = true;
                let before = run.started;
                hedge_target = run.start_next();
                trail.attempts += run.started - before;
                trail.tried(route, hedge_target, true);
                if let Some(index) = hedge_target {
                    route.state.hedges_started.inc();
                    tracing::debug!(route = %route.id, upstream_target = %route.targets[index].name, "no first token yet; hedging");
                }
                continue;
            }
        };
        let Finished { index, probe, result } = finished;
        let target = &route.targets[index];
        trail.last = Some((route, index));
        match result {
            Ok(answer) => {
                record_health(route, target, AttemptOutcome::Success, probe);
                target.state.count_outcome(None);
                if let Some(hedge) = hedge_target {
                    let counter = if hedge == index { &route.state.hedges_won } else { &route.state.hedges_lost };
                    counter.inc();
                }
                // Dropping the other attempt closes its connection.
                run.running.clear();
                let fallback = trail.failures.last().map(|f| f.kind);
                if let Some(r) = trail.record.as_deref_mut() {
                    r.answered(route, index, matches!(answer, Answer::Stream { .. }));
                    (r.attempts, r.fallback, r.hedged) = (trail.attempts, fallback, hedge_target.is_some());
                }
                let bill =
                    Bill { reservation, prices: target.prices, prompt_estimate: body.len() as u64 / BYTES_PER_TOKEN };
                let response = commit(answer, route, index, rename, bill, out, &mut trail.record);
                let mut response = finish(response, target, trail.attempts, fallback);
                if hedge_target == Some(index) {
                    response.headers_mut().insert(HEDGED, HeaderValue::from_static("won"));
                }
                return Ok(response);
            }
            Err(failure) => {
                let kind = failure.record.kind;
                target.state.count_outcome(Some(kind));
                match failure.health {
                    HealthEffect::Failure => record_health(route, target, AttemptOutcome::Failure, probe),
                    HealthEffect::Answered => record_health(route, target, AttemptOutcome::Success, probe),
                    HealthEffect::Untouched => record_health(route, target, AttemptOutcome::Cancelled, probe),
                    HealthEffect::CoolDown(wait) => {
                        target.state.health.cool_down(health::now().saturating_add(health::ticks(wait)));
                        target.state.cooldowns.inc();
                        record_health(route, target, AttemptOutcome::Cancelled, probe);
                    }
                    HealthEffect::Eject => refused_credentials(route, target, failure.record.status, probe),
                }
                let when = route.fallback.when;
                let falls_back = kind.listed_in(|r| when.contains(r));
                tracing::debug!(route = %route.id, upstream_target = %target.name, reason = kind.as_str(), detail = %failure.record.message, falls_back, "attempt failed");
                let mut record = failure.record;
                if kind == FallbackReason::TooManyRequests && record.retry_after.is_none() {
                    record.retry_after = target.state.health.cooling_for(health::now());
                }
                if let Some(r) = trail.record.as_deref_mut() {
                    r.tried_out(route, index, Some((kind, record.status)));
                    r.hedged |= hedge_target.is_some();
                }
                trail.failures.push(record);
                if !falls_back && run.running.is_empty() {
                    // The caller gets this failure as it is: an upstream's own error answer passes
                    // through; a failure without one becomes a proxy error.
                    let fell_back_on = trail.fell_back_on();
                    return match failure.passthrough {
                        Some(response) => {
                            Err(Stop::Passthrough(finish(response, target, trail.attempts, fell_back_on)))
                        }
                        None => Err(Stop::Exhausted),
                    };
                }
                if !run.running.is_empty() {
                    // A hedged attempt is still running; it may yet answer.
                    continue;
                }
                let before = run.started;
                let next = run.start_next();
                trail.attempts += run.started - before;
                trail.tried(route, next, false);
                if next.is_none() {
                    return Err(Stop::Exhausted);
                }
                target.state.fallbacks[kind.index()].inc();
            }
        }
    }
}

pub(in crate::sidecar) fn record_health(
    route: &ServedRoute,
    target: &ServedTarget,
    outcome: AttemptOutcome,
    probe: bool,
) {
    match target.state.health.record(outcome, probe, &route.health, health::now()) {
        Some(Transition::Ejected { duration }) => {
            target.state.ejections.inc();
            tracing::warn!(route = %route.id, upstream_target = %target.name, ejected_for = ?duration, "target ejected after failures");
        }
        Some(Transition::Recovered) => {
            tracing::info!(route = %route.id, upstream_target = %target.name, "target recovered");
        }
        None => {}
    }
}

/// A provider refused the target's own credentials: the target is ejected for `maxEjection`,
/// with one warning per ejection that names the route, target and status (never the key).
pub(in crate::sidecar) fn refused_credentials(
    route: &ServedRoute,
    target: &ServedTarget,
    status: Option<u16>,
    probe: bool,
) {
    let max = route.health.max_ejection;
    if target.state.health.eject_for(max, probe, health::now()).is_some() {
        target.state.ejections.inc();
        tracing::warn!(
            route = %route.id,
            upstream_target = %target.name,
            status = status.unwrap_or_default(),
            ejected_for = %crate::api::units::format_duration(max),
            "the provider refused the target's credentials; target ejected: check its credentials (secret or env)"
        );
    }
}

/// The caller's response for an attempt that answered, billed: a JSON answer is settled now and
/// carries its `usage.cost`; a stream is billed as it goes, and takes the request's record.
fn commit(
    answer: Answer,
    route: &Arc<ServedRoute>,
    index: usize,
    rename: Option<String>,
    bill: Bill,
    out: &Outgoing<'_>,
    record: &mut Record,
) -> Response {
    let chat = out.chat;
    match answer {
        Answer::Json { mut parts, body, info } => {
            let settled = bill.settle(info.usage, info.output_bytes);
            let genai = &route.targets[index].state.genai;
            genai.answered(Some(settled.usage.prompt), settled.usage.completion, out.arrived.elapsed(), None);
            if let Some(r) = record.as_deref_mut() {
                r.settled(settled);
                r.learn(facts(&body));
                if let Some(content) = r.content.as_deref_mut() {
                    content.answer(&answer_text(&body));
                }
            }
            let body = info.with_cost(&body, &format_micros(settled.cost));
            let body = match &rename {
                Some(model) => rename_model(&body, model).unwrap_or(body),
                None => body,
            };
            // The server sets Content-Length from the body.
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(body))
        }
        Answer::Stream { mut parts, stream } => {
            // The stream takes the record; its response names it now.
            if let Some(r) = record.as_deref_mut() {
                r.status = parts.status.as_u16();
                if let Some(id) = r.header() {
                    parts.headers.insert(GENERATION_ID, id);
                }
            }
            let metered = bill.reservation.is_some();
            // Without max_tokens, a metered stream reserves more as it outgrows its reservation.
            let extendable =
                (metered && chat.max_tokens.is_none()).then_some(u64::from(route.reserved_completion_tokens));
            // Messages streams always end with their usage, which then carries the cost.
            let wants_usage = chat.include_usage || matches!(out.endpoint, Endpoint::Messages | Endpoint::Responses);
            let price_event = match out.endpoint {
                Endpoint::Responses => responses::with_cost,
                _ => openai::with_cost,
            };
            let stream_bill =
                (metered || wants_usage).then(|| StreamBill::new(bill, wants_usage, extendable, price_event));
            let total = route.targets[index].timeouts.total;
            let relay = SseRelay::new(stream, route.clone(), index, total, rename, stream_bill, record.take());
            Response::from_parts(parts, Body::new(relay))
        }
    }
}

/// Adds the routing headers and counts the response.
pub(in crate::sidecar) fn finish(
    mut response: Response,
    target: &ServedTarget,
    attempts: usize,
    fallback: Option<FallbackReason>,
) -> Response {
    target.state.requests.inc(response.status().as_u16());
    let headers = response.headers_mut();
    headers.insert(TARGET, target.name_header.clone());
    headers.insert(ATTEMPTS, small_number(attempts));
    if let Some(version) = &target.config_version {
        headers.insert(CONFIG_VERSION, version.clone());
    }
    if let Some(reason) = fallback {
        headers.insert(FALLBACK_REASON, HeaderValue::from_static(reason.as_str()));
    }
    response
}

/// A header value for a small count, without allocating for the common ones.
fn small_number(n: usize) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match DIGITS.get(n) {
        Some(digit) => HeaderValue::from_static(digit),
        None => HeaderValue::from(n),
    }
}

pub fn unrouted(shared: &Shared, error: ProxyError) -> Response {
    unrouted_as(shared, error, Format::OpenAi)
}

/// A request answered before any route took it, in the caller's format.
pub fn unrouted_as(shared: &Shared, error: ProxyError, caller: Format) -> Response {
    shared.states.unrouted.inc(error.status().as_u16());
    error.into_response_as(caller)
}

pub(in crate::sidecar) fn bad_request(e: RequestError) -> ProxyError {
    let (code, message) = match e {
        RequestError::InvalidJson(detail) => ("invalid_json", format!("The request body is not valid JSON: {detail}")),
        RequestError::MissingModel => ("missing_model", "The request body must have a \"model\" field.".into()),
        RequestError::InvalidModel => ("invalid_model", "The \"model\" field must be a string.".into()),
        RequestError::InvalidField(field, detail) => ("invalid_parameter", format!("{field}: {detail}")),
        RequestError::WrongType { field, detail } => {
            ("invalid_parameter", format!("The field {field} has the wrong type: {detail}."))
        }
    };
    ProxyError::BadRequest { code, message }
}
