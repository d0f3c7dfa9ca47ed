//! Relaying a streamed answer to the caller, frame by frame.
//!
//! Upstream chunks are forwarded as they arrive, without copying. Only an incomplete SSE event at
//! the end of a chunk is held back until its end arrives, so that when the upstream breaks, the
//! caller's stream ends on an event boundary followed by a well-formed error event, never on half
//! an event.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use tokio::time::Sleep;

use super::UpstreamBody;
use super::transport::error_chain;
use crate::api::units::format_duration;
use crate::config::Format;
use crate::providers::anthropic::callers::{self, EventStream};
use crate::providers::anthropic::{self, ChunkStream};
use crate::providers::facts::{delta_text, facts, may_end};
use crate::providers::openai::{
    ChunkInfo, chunk_info, mentions_usage, rename_events, stream_error_event, text_chunk_info,
};
use crate::providers::responses::{self, ResponseStream};
use crate::providers::sse;
use crate::providers::{StreamEnd, Usage};
use crate::sidecar::billing::{EventAction, StreamBill};
use crate::sidecar::calls::endpoint::{Endpoint, UpstreamPath};
use crate::sidecar::observe::{End, Exchange};
use crate::sidecar::routing::health::{self, AttemptOutcome};
use crate::sidecar::routing::stats::TargetStats;
use crate::sidecar::snapshot::ServedRoute;
use crate::sidecar::state::TargetState;

/// What a stream has shown so far: when its first output arrived and how many tokens it made.
#[derive(Debug)]
pub struct StreamWatch {
    started: Instant,
    /// The endpoint whose events are watched: the caller's.
    endpoint: Endpoint,
    pub first_token: Option<Duration>,
    usage: Option<Usage>,
    events: u64,
    /// Output bytes of the events read during hold-back, which the bill counts without reading
    /// them again.
    held_output_bytes: u64,
}

impl StreamWatch {
    pub fn new(started: Instant, endpoint: Endpoint) -> Self {
        StreamWatch { started, endpoint, first_token: None, usage: None, events: 0, held_output_bytes: 0 }
    }

    /// What one event in the caller's format carries.
    fn info(&self, payload: &[u8]) -> ChunkInfo {
        match self.endpoint {
            Endpoint::Chat | Endpoint::Embeddings => chunk_info(payload),
            Endpoint::Completions => text_chunk_info(payload),
            Endpoint::Messages => anthropic::event_info(payload),
            Endpoint::Responses => responses::event_info(payload),
        }
    }

    /// Whether events must be read to learn something: until the first output, and in chunks that
    /// carry usage. Other events are only counted.
    fn wants(&self, events: &[u8]) -> bool {
        self.first_token.is_none() || mentions_usage(events)
    }

    fn see(&mut self, info: &ChunkInfo, stats: &TargetStats) {
        if info.has_output && self.first_token.is_none() {
            let after = self.started.elapsed();
            self.first_token = Some(after);
            stats.record_first_token(after, health::now());
        }
        if let Some(usage) = info.usage {
            self.usage = Some(self.usage.map_or(usage, |earlier| earlier.merge(usage)));
        }
    }

    /// Looks at complete events read during hold-back: every one of them is read, since hold-back
    /// lasts until the first output.
    pub fn observe(&mut self, events: &[u8], stats: &TargetStats) {
        for payload in sse::payloads(events) {
            self.events += 1;
            let info = self.info(payload);
            self.held_output_bytes += info.output_bytes;
            self.see(&info, stats);
        }
    }

    /// Records a stream that ended cleanly. Without a usage chunk, its events stand in for tokens.
    fn finish(&self, stats: &TargetStats) {
        let tokens = self.usage.map_or(self.events, |u| u.completion);
        stats.record_done(self.started.elapsed(), self.first_token, Some(tokens), health::now());
    }
}

/// What a stream goes through between the upstream and the rest of the relay, so that the watch,
/// the bill and the rename see events in the caller's format: a translation event by event as
/// they arrive, or, for a Messages stream passed through, a check for its `error` and last event.
pub struct Translator {
    conversion: Conversion,
    done: bool,
}

enum Conversion {
    /// Messages events into chat completion chunks.
    Chunks(ChunkStream),
    /// Chat completion chunks into Messages events.
    Events(EventStream),
    /// Chat completion chunks (or Messages events, through chunks) into Responses events.
    Responses { chunks: Option<ChunkStream>, stream: ResponseStream },
    /// Events passed through as they are (Messages, or Responses), checked for their end.
    Checked(fn(&[u8]) -> StreamEnd),
}

/// A provider's error event, or an event that cannot be translated: the stream ends on it.
pub struct Fault {
    /// The provider's error type, such as `overloaded_error`.
    pub kind: String,
    pub message: String,
}

impl Translator {
    /// What a stream from an upstream of format `upstream`, reached at `path`, needs to reach a
    /// caller of `endpoint`; `None` for chat completions passed through, which need nothing.
    pub fn between(
        upstream: Format,
        endpoint: Endpoint,
        path: UpstreamPath,
        model: &str,
        usage_chunk: bool,
    ) -> Option<Box<Translator>> {
        let conversion = match (endpoint, path, upstream, endpoint.format()) {
            (Endpoint::Responses, UpstreamPath::Under(_), ..) => Conversion::Checked(responses::event_end),
            (Endpoint::Responses, _, Format::OpenAi, _) => {
                Conversion::Responses { chunks: None, stream: ResponseStream::new(model, unix_now()) }
            }
            (Endpoint::Responses, _, Format::Anthropic, _) => Conversion::Responses {
                chunks: Some(ChunkStream::new(model, unix_now())),
                stream: ResponseStream::new(model, unix_now()),
            },
            (.., Format::OpenAi, Format::OpenAi) => return None,
            (.., Format::Anthropic, Format::OpenAi) => {
                let chunks = ChunkStream::new(model, unix_now());
                Conversion::Chunks(if usage_chunk { chunks } else { chunks.without_usage_chunk() })
            }
            (.., Format::OpenAi, Format::Anthropic) => Conversion::Events(EventStream::new(model)),
            (.., Format::Anthropic, Format::Anthropic) => Conversion::Checked(anthropic::event_end),
        };
        Some(Box::new(Translator { conversion, done: false }))
    }

    /// Translates complete events. On a fault, the events before it come with it.
    pub fn events(&mut self, events: Bytes) -> Result<Bytes, (Bytes, Fault)> {
        let mut out = Vec::new();
        for range in sse::events(&events) {
            if self.done {
                break;
            }
            let event = &events[range.clone()];
            let end = match &mut self.conversion {
                Conversion::Chunks(stream) => stream.event(event, &mut out),
                Conversion::Events(stream) => stream.event(event, &mut out),
                Conversion::Responses { chunks: None, stream } => stream.event(event, &mut out),
                Conversion::Responses { chunks: Some(chunks), stream } => {
                    let mut chat = Vec::new();
                    match chunks.event(event, &mut chat) {
                        StreamEnd::Error { kind, message } => StreamEnd::Error { kind, message },
                        _ => sse::events(&chat)
                            .map(|r| stream.event(&chat[r], &mut out))
                            .find(|end| *end != StreamEnd::Open)
                            .unwrap_or(StreamEnd::Open),
                    }
                }
                Conversion::Checked(end_of) => match end_of(event) {
                    StreamEnd::Error { kind, message } => {
                        self.done = true;
                        return Err((events.slice(..range.start), Fault { kind, message }));
                    }
                    end => end,
                },
            };
            match end {
                StreamEnd::Open => {}
                StreamEnd::Done => self.done = true,
                StreamEnd::Error { kind, message } => {
                    self.done = true;
                    return Err((Bytes::from(out), Fault { kind, message }));
                }
            }
        }
        match self.conversion {
            Conversion::Checked(_) => Ok(events),
            _ => Ok(Bytes::from(out)),
        }
    }
}

/// Seconds since 1970, for the `created` of chunks the sidecar writes.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The body of a streamed response: what hold-back already read, then the upstream's events, then
/// either its clean end or one terminal error event.
pub struct SseRelay {
    inner: UpstreamBody,
    framer: sse::Framer,
    prefix: Option<Bytes>,
    watch: StreamWatch,
    deadline: Pin<Box<Sleep>>,
    route: Arc<ServedRoute>,
    target: usize,
    total: Duration,
    /// Set when the answer comes from another route than the one asked for (`models` fallback):
    /// each event's `model` is renamed to this JSON string.
    rename: Option<String>,
    /// The stream's bill: present when it is metered or the caller wants its cost.
    bill: Option<StreamBill>,
    translator: Option<Box<Translator>>,
    done: bool,
    /// The request's record, finished when the stream is dropped.
    record: Option<Box<Exchange>>,
    /// When the request arrived, which the GenAI durations count from.
    arrived: Instant,
}

/// A stream that has been committed to the caller.
pub struct Committed {
    pub body: UpstreamBody,
    pub framer: sse::Framer,
    pub prefix: Bytes,
    pub watch: StreamWatch,
    pub started: Instant,
    /// When the request arrived.
    pub arrived: Instant,
    /// For an upstream of another wire format; `prefix` is already translated.
    pub translator: Option<Box<Translator>>,
}

impl SseRelay {
    pub fn new(
        stream: Box<Committed>,
        route: Arc<ServedRoute>,
        target: usize,
        total: Duration,
        rename: Option<String>,
        bill: Option<StreamBill>,
        record: Option<Box<Exchange>>,
    ) -> Self {
        let deadline = Box::pin(tokio::time::sleep_until((stream.started + total).into()));
        let mut bill = bill;
        if let Some(bill) = &mut bill {
            bill.count_output(stream.watch.held_output_bytes);
        }
        SseRelay {
            record,
            arrived: stream.arrived,
            inner: stream.body,
            framer: stream.framer,
            prefix: (!stream.prefix.is_empty()).then_some(stream.prefix),
            watch: stream.watch,
            deadline,
            route,
            target,
            total,
            rename,
            bill,
            translator: stream.translator,
            done: false,
        }
    }

    fn state(&self) -> &TargetState {
        &self.route.targets[self.target].state
    }

    /// Ends the stream with an error event; the partial event held back is dropped.
    fn fail(&mut self, code: &str, message: String) -> Bytes {
        self.done = true;
        let route = self.route.clone();
        let target = &route.targets[self.target];
        target.state.stream_errors.inc();
        target.state.duration.observe(self.watch.started.elapsed());
        target.state.health.record(AttemptOutcome::Failure, false, &self.route.health, health::now());
        tracing::warn!(route = %self.route.id, upstream_target = %target.name, %code, detail = %message, "stream broke after the answer started");
        if let Some(r) = self.record.as_deref_mut() {
            r.end = End::Broken(code.to_string());
        }
        self.settle();
        self.error_event("upstream_error", code, &message)
    }

    /// The terminal error event in the caller's format: OpenRouter's error chunk, or Anthropic's
    /// `error` event typed as Anthropic would type the failure.
    fn error_event(&self, kind: &str, code: &str, message: &str) -> Bytes {
        if self.watch.endpoint == Endpoint::Responses {
            return responses::failed_event(code, message, &self.route.model);
        }
        match self.watch.endpoint.format() {
            Format::OpenAi => {
                let target = &self.route.targets[self.target];
                stream_error_event(&self.route.model, &target.provider, kind, code, message, unix_now())
            }
            Format::Anthropic => {
                let kind = match code {
                    "upstream_timeout" => "timeout_error",
                    "insufficient_credits" => "billing_error",
                    code if anthropic::is_error_type(code) => code,
                    _ => "api_error",
                };
                callers::error_event(kind, message)
            }
        }
    }

    fn settle(&mut self) {
        if let Some(bill) = &mut self.bill {
            bill.settle();
        }
    }

    /// Settles a stream that ended cleanly and counts it in the GenAI metrics, with its usage as
    /// billed, else as reported, else its events as output tokens.
    fn answered(&mut self) {
        let settled = self.bill.as_mut().and_then(StreamBill::settle);
        let (input, output) = match settled.map(|s| s.usage).or(self.watch.usage) {
            Some(usage) => (Some(usage.prompt), usage.completion),
            None => (None, self.watch.events),
        };
        let first_chunk = self.watch.first_token.map(|t| self.watch.started.duration_since(self.arrived) + t);
        let genai = &self.route.targets[self.target].state.genai;
        genai.answered(input, output, self.arrived.elapsed(), first_chunk);
    }

    /// Complete events on their way out: watched (unless `watched` already), billed, and renamed if
    /// needed. A metered stream that runs out of credit gets the terminal error event after them.
    fn forward(&mut self, events: Bytes, watched: bool) -> Bytes {
        let route = self.route.clone();
        let stats = &route.targets[self.target].state.stats;
        let read_all = self.bill.as_ref().is_some_and(StreamBill::is_metered);
        // What hold-back read needs reading again only for a usage chunk the bill must rewrite.
        let read = if watched { mentions_usage(&events) } else { read_all || self.watch.wants(&events) };
        let mut out = events.clone();
        if read {
            // Rebuilt only from the first event that changes.
            let mut rebuilt: Option<BytesMut> = None;
            for range in sse::events(&events) {
                let event = &events[range.clone()];
                let mut action = EventAction::Keep;
                // Of the events hold-back read, only one with usage is read again.
                let reread = !watched || mentions_usage(event);
                for payload in sse::payloads(event).filter(|_| reread) {
                    let mut info = self.watch.info(payload);
                    if watched {
                        // Its output is in the bill already (`held_output_bytes`).
                        info.output_bytes = 0;
                    } else {
                        self.watch.events += 1;
                        self.watch.see(&info, stats);
                    }
                    if let Some(bill) = &mut self.bill {
                        action = bill.see(payload, &info);
                    }
                }
                match action {
                    EventAction::Keep => {
                        if let Some(r) = &mut rebuilt {
                            r.extend_from_slice(event);
                        }
                    }
                    EventAction::Drop => {
                        rebuilt.get_or_insert_with(|| BytesMut::from(&events[..range.start]));
                    }
                    EventAction::Replace(json) => {
                        let r = rebuilt.get_or_insert_with(|| BytesMut::from(&events[..range.start]));
                        // A Messages event keeps its name.
                        for line in event.split(|&b| b == b'\n').filter(|l| l.starts_with(b"event:")) {
                            r.extend_from_slice(line);
                            r.extend_from_slice(b"\n");
                        }
                        r.extend_from_slice(b"data: ");
                        r.extend_from_slice(&json);
                        r.extend_from_slice(b"\n\n");
                    }
                }
            }
            if let Some(r) = rebuilt {
                out = r.freeze();
            }
        } else if !watched {
            self.watch.events += sse::payloads(&events).count() as u64;
        }
        if let Some(model) = &self.rename {
            out = match self.watch.endpoint {
                Endpoint::Responses => responses::rename_events(&out, model),
                Endpoint::Messages => Bytes::from(anthropic::rename_events(&out, model)),
                _ => rename_events(&out, model),
            };
        }
        if let Some(r) = self.record.as_deref_mut() {
            learn(r, &out);
        }
        if let Some(bill) = &mut self.bill
            && bill.keep_up().is_err()
        {
            let cut = self.out_of_credit();
            let mut both = BytesMut::from(&out[..]);
            both.extend_from_slice(&cut);
            return both.freeze();
        }
        out
    }

    /// Complete events of the upstream's format as chat completion chunks. `Err` with the stream's
    /// last bytes when the provider's error event ends it.
    fn translate(&mut self, events: Bytes) -> Result<Bytes, Bytes> {
        let Some(translator) = &mut self.translator else { return Ok(events) };
        match translator.events(events) {
            Ok(chunks) => Ok(chunks),
            Err((chunks, fault)) => {
                let head = if chunks.is_empty() { chunks } else { self.forward(chunks, false) };
                if self.done {
                    // The budget ran out on the chunks before the fault; that ended the stream.
                    return Err(head);
                }
                let message = format!("the provider ended the stream with {}: {}", fault.kind, fault.message);
                let tail = self.fail(&fault.kind, message);
                let mut both = BytesMut::from(&head[..]);
                both.extend_from_slice(&tail);
                Err(both.freeze())
            }
        }
    }

    /// Whether a translated stream ended without its last event: the provider's stream broke.
    fn cut_short(&self) -> bool {
        self.translator.as_ref().is_some_and(|t| !t.done)
    }

    /// Ends a metered stream whose budget ran out mid-answer, with a typed error event.
    fn out_of_credit(&mut self) -> Bytes {
        self.done = true;
        let route = self.route.clone();
        let target = &route.targets[self.target];
        target.state.duration.observe(self.watch.started.elapsed());
        tracing::info!(route = %self.route.id, upstream_target = %target.name, "stream stopped: the key's budget ran out");
        if let Some(r) = self.record.as_deref_mut() {
            r.end = End::OutOfCredit;
        }
        self.settle();
        let message = "The API key's budget ran out while this answer was streaming.";
        self.error_event("insufficient_credits", "insufficient_credits", message)
    }
}

/// What events in the caller's format tell a record: the answer's id, and why it ended.
fn learn(record: &mut Exchange, events: &[u8]) {
    for payload in sse::payloads(events) {
        if record.answer_id.is_none() || may_end(payload) {
            record.learn(facts(payload));
        }
        if let Some(content) = record.content.as_deref_mut() {
            let mut text = String::new();
            delta_text(payload, &mut text);
            content.answer(&text);
        }
    }
}

impl Drop for SseRelay {
    /// Finishes the record: the bill settles first, so the record has what the stream cost.
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else { return };
        if !self.done {
            record.end = End::CallerLeft;
        }
        match self.bill.as_mut().and_then(StreamBill::settle) {
            Some(settled) => record.settled(settled),
            None => record.unbilled(self.watch.usage, self.watch.events),
        }
        record.finish();
    }
}

impl Body for SseRelay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            // Hold-back's watch has seen these events; the bill has not.
            return Poll::Ready(Some(Ok(Frame::data(this.forward(prefix, true)))));
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.deadline.as_mut().poll(cx).is_ready() {
                let message =
                    format!("the upstream did not finish within the total timeout of {}", format_duration(this.total));
                return Poll::Ready(Some(Ok(Frame::data(this.fail("upstream_timeout", message)))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers have no place in an SSE response; only data is relayed.
                    if let Ok(data) = frame.into_data()
                        && let Some(complete) = this.framer.push(data)
                    {
                        let chunks = match this.translate(complete) {
                            // Events without a chunk equivalent (`ping`) send nothing.
                            Ok(chunks) if chunks.is_empty() => continue,
                            Ok(chunks) => chunks,
                            Err(last) => return Poll::Ready(Some(Ok(Frame::data(last)))),
                        };
                        return Poll::Ready(Some(Ok(Frame::data(this.forward(chunks, false)))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let message = format!("the upstream connection broke mid-stream: {}", error_chain(&*e));
                    return Poll::Ready(Some(Ok(Frame::data(this.fail("upstream_disconnected", message)))));
                }
                Poll::Ready(None) => {
                    let rest = match this.framer.finish().map(|rest| sse::terminated(&rest)) {
                        None => None,
                        Some(Some(whole)) => match this.translate(whole) {
                            Ok(chunks) => Some(this.forward(chunks, false)),
                            Err(last) => return Poll::Ready(Some(Ok(Frame::data(last)))),
                        },
                        // Ended in the middle of an event: a broken stream, whatever the framing said.
                        Some(None) => {
                            let message = "the upstream's stream ended in the middle of an event".to_string();
                            return Poll::Ready(Some(Ok(Frame::data(this.fail("upstream_disconnected", message)))));
                        }
                    };
                    if this.cut_short() && !this.done {
                        let message = "the provider's stream ended before its last event".to_string();
                        let tail = this.fail("upstream_disconnected", message);
                        let last = match rest {
                            Some(rest) => [rest, tail].concat().into(),
                            None => tail,
                        };
                        return Poll::Ready(Some(Ok(Frame::data(last))));
                    }
                    this.done = true;
                    let state = this.state();
                    state.duration.observe(this.watch.started.elapsed());
                    this.watch.finish(&state.stats);
                    this.answered();
                    return Poll::Ready(rest.map(|rest| Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.prefix.is_none()
    }
}
