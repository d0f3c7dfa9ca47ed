//! What happened to each request, for those who watch: the access log ([`access_log`]), the
//! generation store ([`generations`]) and traces ([`traces`]) read one record of each request, an
//! [`Exchange`].
//!
//! A record exists only when an observer is on, so a sidecar without one does nothing more per
//! request than check for it. It is filled along the request's way (the routes and attempts in
//! `calls::proxy`, the answer in `commit`; a call passed through in `calls::passthrough`) and
//! finished exactly once, when the answer has ended: a JSON answer or an error when the handler
//! returns it ([`Recording`]), a stream when its body is dropped (ended, broken, or left by the
//! caller), since only then are its usage and cost known.

pub mod access_log;
pub mod generations;
pub mod traces;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use axum::response::Response;
use http::{HeaderName, HeaderValue};

use self::generations::Generations;
use super::billing::{Settled, caller_key, key_hash};
use super::snapshot::{ServedRoute, ServedTarget};
use crate::api::FallbackReason;
use crate::api::units::prefix;
use crate::providers::Usage;
use crate::providers::facts::Facts;
use crate::traces::{Place, Traces};

/// The response header that names a request's record, for `GET /api/v1/generation?id=`.
pub const GENERATION_ID: HeaderName = HeaderName::from_static("x-sideyard-generation-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What watches the requests; exists only when at least one observer is on.
pub struct Observers {
    pub access_log: bool,
    pub generations: Option<Generations>,
    pub traces: Option<Arc<Traces>>,
    /// Traced requests record their messages and answer text.
    trace_content: bool,
    /// Makes record ids unique across restarts of the sidecar without coordination.
    seed: u64,
    next: AtomicU64,
}

/// What the command line turned on.
#[derive(Clone, Copy, Debug, Default)]
pub struct ObserverOptions {
    pub access_log: bool,
    /// Records the generation store keeps; 0: none.
    pub generations: usize,
    /// Traced requests record their messages and answer text.
    pub trace_content: bool,
}

impl Observers {
    /// The observers `options` and `traces` turn on; `None` when none is.
    pub fn new(options: ObserverOptions, traces: Option<Arc<Traces>>) -> Option<Arc<Observers>> {
        let generations = (options.generations > 0).then(|| Generations::new(options.generations));
        if !options.access_log && generations.is_none() && traces.is_none() {
            return None;
        }
        let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), Instant::now());
        let (access_log, trace_content) = (options.access_log, options.trace_content);
        Some(Arc::new(Observers { access_log, generations, traces, trace_content, seed, next: AtomicU64::new(0) }))
    }

    /// A record of a request (`parts`) that arrived at `arrived`; `routed` for the endpoints the
    /// sidecar routes (a conversation or embeddings), not for calls passed through as they are.
    pub fn start(self: &Arc<Self>, parts: &http::request::Parts, routed: bool, arrived: Instant) -> Box<Exchange> {
        let headers = &parts.headers;
        let n = self.next.fetch_add(1, Relaxed);
        let trace = self.traces.as_ref().map(|t| t.place(headers.get(TRACEPARENT).map(HeaderValue::as_bytes)));
        let trace = trace.filter(|p| p.sampled);
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        Box::new(Exchange {
            observers: self.clone(),
            id: format!("gen-{:016x}{n:08x}", self.seed),
            answer_id: None,
            created: SystemTime::now(),
            started: arrived,
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            routed,
            request_id: text(&REQUEST_ID),
            key_hash: caller_key(headers).map(key_hash),
            model: None,
            budget: None,
            prompt_estimate: 0,
            served: None,
            tries: Vec::new(),
            attempts: 0,
            fallback: None,
            hedged: false,
            streamed: false,
            status: 0,
            first_byte: None,
            duration: Duration::ZERO,
            usage: None,
            estimated: false,
            cost: None,
            finish_reason: None,
            end: End::Answered,
            content: (trace.is_some() && self.trace_content).then(Box::default),
            trace,
        })
    }
}

/// A request's record, finished when the request's handling ends (or is dropped: the caller left)
/// unless a stream took it.
pub struct Recording(pub Option<Box<Exchange>>);

impl Recording {
    /// The response, its status recorded and the record named in a header.
    pub fn respond(&mut self, mut response: Response) -> Response {
        self.answer(&mut response);
        response
    }

    /// Records the response's status, and names the record in a header.
    #[inline]
    pub fn answer(&mut self, response: &mut Response) {
        if let Some(r) = self.0.as_deref_mut() {
            r.status = response.status().as_u16();
            if let Some(id) = r.header() {
                response.headers_mut().insert(GENERATION_ID, id);
            }
        }
    }
}

impl Drop for Recording {
    #[inline]
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.finish();
        }
    }
}

/// How a request's answer ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Answered whole: a JSON answer, an error, or a stream to its last event.
    Answered,
    /// A stream that broke after it started, ended with an error event of this code.
    Broken(String),
    /// A metered stream stopped because the budget ran out.
    OutOfCredit,
    /// The caller closed the stream before its end.
    CallerLeft,
}

impl End {
    pub fn as_str(&self) -> &str {
        match self {
            End::Answered => "answered",
            End::Broken(code) => code,
            End::OutOfCredit => "insufficient_credits",
            End::CallerLeft => "caller_left",
        }
    }
}

/// One attempt of a request: where it went, when, and why it failed if it did.
pub struct Try {
    pub route: Arc<ServedRoute>,
    pub target: usize,
    /// Since the request arrived.
    pub started: Duration,
    pub ended: Option<Duration>,
    /// Why it failed, and the upstream's status when it answered; `None` for the one that answered.
    pub failure: Option<(FallbackReason, Option<u16>)>,
    pub hedge: bool,
    /// Dropped unfinished: another attempt answered first.
    pub cancelled: bool,
}

impl Try {
    pub fn target(&self) -> &ServedTarget {
        &self.route.targets[self.target]
    }
}

/// The record of one request. Never holds the caller's key (only its hash, to scope lookups), nor
/// its prompt or answer unless traces record them (`content`, `--trace-content`).
pub struct Exchange {
    observers: Arc<Observers>,
    pub id: String,
    /// The answer's own `id`, which a lookup may also use.
    pub answer_id: Option<String>,
    pub created: SystemTime,
    pub started: Instant,
    pub method: http::Method,
    pub path: String,
    /// A conversation or embeddings, routed; `false`: a call passed through as it is.
    pub routed: bool,
    pub request_id: Option<String>,
    pub key_hash: Option<[u8; 32]>,
    /// The model asked for.
    pub model: Option<String>,
    /// The caller's budget, `namespace/name`.
    pub budget: Option<String>,
    /// Prompt tokens estimated from the body, for an answer without usage.
    pub prompt_estimate: u64,
    /// The route and target that answered, or that the last attempt went to.
    pub served: Option<(Arc<ServedRoute>, usize)>,
    pub tries: Vec<Try>,
    pub attempts: usize,
    /// The reason of the last failure the answer fell back from.
    pub fallback: Option<FallbackReason>,
    pub hedged: bool,
    pub streamed: bool,
    pub status: u16,
    /// When the response headers went to the caller: for a stream, at its first token.
    pub first_byte: Option<Duration>,
    pub duration: Duration,
    pub usage: Option<Usage>,
    /// The usage was estimated from the answer's size: the provider reported none.
    pub estimated: bool,
    /// Micro-units.
    pub cost: Option<u64>,
    pub finish_reason: Option<String>,
    pub end: End,
    /// The request's span, when it is traced; its attempts' spans are derived from it.
    pub trace: Option<Place>,
    /// The messages and the answer's text, when traces record them (`--trace-content`).
    pub content: Option<Box<Content>>,
}

/// What a traced request said and was answered, each at most [`Content::MAX_BYTES`].
#[derive(Default)]
pub struct Content {
    pub input: String,
    pub output: String,
}

impl Content {
    pub const MAX_BYTES: usize = 64 * 1024;

    /// Appends answer text, up to the bound.
    pub fn answer(&mut self, text: &str) {
        let room = Self::MAX_BYTES.saturating_sub(self.output.len());
        self.output.push_str(prefix(text, room));
    }

    /// The request's messages, up to the bound.
    pub fn ask(&mut self, messages: String) {
        let kept = prefix(&messages, Self::MAX_BYTES).len();
        let mut messages = messages;
        messages.truncate(kept);
        self.input = messages;
    }
}

impl Exchange {
    /// An attempt started now.
    pub fn tried(&mut self, route: &Arc<ServedRoute>, target: usize, hedge: bool) {
        let started = self.started.elapsed();
        self.tries.push(Try {
            route: route.clone(),
            target,
            started,
            ended: None,
            failure: None,
            hedge,
            cancelled: false,
        });
    }

    /// The attempt at `target` of `route` ended now, failed if `failure`.
    pub fn tried_out(
        &mut self,
        route: &Arc<ServedRoute>,
        target: usize,
        failure: Option<(FallbackReason, Option<u16>)>,
    ) {
        let ended = self.started.elapsed();
        let open = self
            .tries
            .iter_mut()
            .rev()
            .find(|t| t.ended.is_none() && t.target == target && Arc::ptr_eq(&t.route, route));
        if let Some(t) = open {
            t.ended = Some(ended);
            t.failure = failure;
        }
        self.served = Some((route.clone(), target));
    }

    /// The attempt at `target` of `route` answered now; a stream's attempt goes on until it ends.
    pub fn answered(&mut self, route: &Arc<ServedRoute>, target: usize, stream: bool) {
        let now = self.started.elapsed();
        self.first_byte = Some(now);
        self.streamed = stream;
        // A hedge that lost is closed as the answer wins.
        for t in
            self.tries.iter_mut().filter(|t| t.ended.is_none() && !(t.target == target && Arc::ptr_eq(&t.route, route)))
        {
            (t.ended, t.cancelled) = (Some(now), true);
        }
        if stream {
            self.served = Some((route.clone(), target));
        } else {
            self.tried_out(route, target, None);
        }
    }

    /// The answer's facts, once read.
    pub fn learn(&mut self, facts: Facts) {
        if self.answer_id.is_none() {
            self.answer_id = facts.id;
        }
        if facts.finish_reason.is_some() {
            self.finish_reason = facts.finish_reason;
        }
    }

    /// What the answer was billed at.
    pub fn settled(&mut self, settled: Settled) {
        self.usage = Some(settled.usage);
        self.estimated = settled.estimated;
        self.cost = Some(settled.cost);
    }

    /// A stream that no bill followed: its usage if it reported one (else its events stand in for
    /// completion tokens), priced at the target's prices.
    pub fn unbilled(&mut self, usage: Option<Usage>, events: u64) {
        self.estimated = usage.is_none();
        let usage = usage.unwrap_or(Usage { prompt: self.prompt_estimate, completion: events, ..Usage::default() });
        let prices = self.target().map(|t| t.prices).unwrap_or_default();
        self.cost = Some(crate::budget::cost(&usage, &prices));
        self.usage = Some(usage);
    }

    /// The header that names this record.
    pub fn header(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.id).ok()
    }

    pub fn target(&self) -> Option<&ServedTarget> {
        self.served.as_ref().map(|(route, i)| &route.targets[*i])
    }

    pub fn route(&self) -> Option<&ServedRoute> {
        self.served.as_ref().map(|(route, _)| &**route)
    }

    /// Hands the record to every observer; its attempt still open (a stream's) ends now.
    #[cold]
    pub fn finish(mut self: Box<Self>) {
        self.duration = self.started.elapsed();
        if self.status == 0 {
            // Dropped before it was answered: nginx's "client closed request".
            (self.status, self.end) = (499, End::CallerLeft);
        }
        let duration = self.duration;
        for t in self.tries.iter_mut().filter(|t| t.ended.is_none()) {
            t.ended = Some(duration);
        }
        let observers = self.observers.clone();
        if observers.access_log {
            access_log::write(&self);
        }
        if let (Some(traces), Some(place)) = (&observers.traces, self.trace) {
            traces::export(&self, place, traces);
        }
        if let Some(generations) = &observers.generations {
            generations.keep(self);
        }
    }
}
