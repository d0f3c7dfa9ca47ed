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

use super::health::{self, Outcome};
use super::metrics::TargetState;
use super::state::RouteRt;
use super::stats::TargetStats;
use super::upstream::{UpstreamBody, error_chain};
use crate::api::units::format_duration;
use crate::providers::openai::{chunk_info, rename_events, sse_payloads, stream_error_event};

/// Past this size an unterminated event is forwarded anyway: an upstream that never ends its
/// events must not make the sidecar buffer without bound.
const MAX_PENDING: usize = 1 << 20;

/// Splits a byte stream at SSE event boundaries (a blank line).
#[derive(Debug, Default)]
pub struct SseFramer {
    pending: BytesMut,
}

impl SseFramer {
    /// Takes the next chunk; returns the bytes that end on an event boundary, if any.
    pub fn push(&mut self, data: Bytes) -> Option<Bytes> {
        if self.pending.is_empty() {
            return match last_boundary(&data) {
                Some(end) if end == data.len() => Some(data),
                Some(end) => {
                    self.pending.extend_from_slice(&data[end..]);
                    Some(data.slice(..end))
                }
                None if data.len() > MAX_PENDING => Some(data),
                None => {
                    self.pending.extend_from_slice(&data);
                    None
                }
            };
        }
        self.pending.extend_from_slice(&data);
        match last_boundary(&self.pending) {
            Some(end) => Some(self.pending.split_to(end).freeze()),
            None if self.pending.len() > MAX_PENDING => Some(self.pending.split().freeze()),
            None => None,
        }
    }

    /// At a clean end of the stream: whatever is left, as the upstream sent it.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }
}

/// The index just past the last blank line (`\n\n` or `\n\r\n`).
fn last_boundary(data: &[u8]) -> Option<usize> {
    let mut i = data.len();
    while i >= 2 {
        if data[i - 1] == b'\n' && (data[i - 2] == b'\n' || (i >= 3 && data[i - 2] == b'\r' && data[i - 3] == b'\n')) {
            return Some(i);
        }
        i -= 1;
    }
    None
}

/// What a stream has shown so far: when its first output arrived and how many tokens it made.
#[derive(Debug)]
pub struct StreamWatch {
    started: Instant,
    pub first_token: Option<Duration>,
    completion_tokens: Option<u64>,
    events: u64,
}

impl StreamWatch {
    pub fn new(started: Instant) -> Self {
        StreamWatch { started, first_token: None, completion_tokens: None, events: 0 }
    }

    /// Looks at complete events on their way to the caller. Until the first output only, and then
    /// only in chunks that mention usage, are events parsed; the rest is counted, not read.
    pub fn observe(&mut self, events: &[u8], stats: &TargetStats) {
        let parse = self.first_token.is_none() || events.windows(7).any(|w| w == b"\"usage\"");
        for payload in sse_payloads(events) {
            self.events += 1;
            if !parse {
                continue;
            }
            let info = chunk_info(payload);
            if info.has_output && self.first_token.is_none() {
                let after = self.started.elapsed();
                self.first_token = Some(after);
                stats.record_first_token(after, health::now());
            }
            if info.completion_tokens.is_some() {
                self.completion_tokens = info.completion_tokens;
            }
        }
    }

    /// Records a stream that ended cleanly. Without a usage chunk, its events stand in for tokens.
    fn finish(&self, stats: &TargetStats) {
        let tokens = self.completion_tokens.unwrap_or(self.events);
        stats.record_done(self.started.elapsed(), self.first_token, Some(tokens), health::now());
    }
}

/// The body of a streamed response: what hold-back already read, then the upstream's events, then
/// either its clean end or one terminal error event.
pub struct SseRelay {
    inner: UpstreamBody,
    framer: SseFramer,
    prefix: Option<Bytes>,
    watch: StreamWatch,
    deadline: Pin<Box<Sleep>>,
    route: Arc<RouteRt>,
    target: usize,
    total: Duration,
    /// Set when the answer comes from another route than the one asked for (`models` fallback):
    /// each event's `model` is renamed to this JSON string.
    rename: Option<String>,
    done: bool,
}

/// A stream that has been committed to the caller.
pub struct Committed {
    pub body: UpstreamBody,
    pub framer: SseFramer,
    pub prefix: Bytes,
    pub watch: StreamWatch,
    pub started: Instant,
}

impl SseRelay {
    pub fn new(stream: Committed, route: Arc<RouteRt>, target: usize, total: Duration, rename: Option<String>) -> Self {
        let deadline = Box::pin(tokio::time::sleep_until((stream.started + total).into()));
        SseRelay {
            inner: stream.body,
            framer: stream.framer,
            prefix: (!stream.prefix.is_empty()).then_some(stream.prefix),
            watch: stream.watch,
            deadline,
            route,
            target,
            total,
            rename,
            done: false,
        }
    }

    fn state(&self) -> &TargetState {
        &self.route.targets[self.target].state
    }

    /// Ends the stream with an error event; the partial event held back is dropped.
    fn fail(&mut self, code: &str, message: String) -> Bytes {
        self.done = true;
        let target = &self.route.targets[self.target];
        target.state.stream_errors.inc();
        target.state.duration.observe(self.watch.started.elapsed());
        target.state.health.record(Outcome::Failure, false, &self.route.health, health::now());
        tracing::warn!(route = %self.route.id, target = %target.name, %code, %message, "stream broke after the answer started");
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        stream_error_event(&self.route.model, &target.provider, code, &message, created)
    }

    /// Bytes on their way out: watched, and renamed if needed.
    fn forward(&mut self, events: Bytes) -> Bytes {
        let route = self.route.clone();
        self.watch.observe(&events, &route.targets[self.target].state.stats);
        match &self.rename {
            Some(model) => rename_events(&events, model),
            None => events,
        }
    }
}

impl Body for SseRelay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            let prefix = match &this.rename {
                Some(model) => rename_events(&prefix, model),
                None => prefix,
            };
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
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
                        return Poll::Ready(Some(Ok(Frame::data(this.forward(complete)))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let message = format!("the upstream connection broke mid-stream: {}", error_chain(&*e));
                    return Poll::Ready(Some(Ok(Frame::data(this.fail("upstream_disconnected", message)))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let state = this.state();
                    state.duration.observe(this.watch.started.elapsed());
                    this.watch.finish(&state.stats);
                    return Poll::Ready(this.framer.finish().map(|rest| Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.prefix.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(f: &mut SseFramer, s: &'static str) -> Option<String> {
        f.push(Bytes::from_static(s.as_bytes())).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn forwards_whole_events_and_holds_partial_ones() {
        let mut f = SseFramer::default();
        assert_eq!(push(&mut f, "data: 1\n\n"), Some("data: 1\n\n".into()));
        assert_eq!(push(&mut f, "data: 2\n\ndata: 3"), Some("data: 2\n\n".into()));
        assert_eq!(push(&mut f, "\n"), None);
        assert_eq!(push(&mut f, "\ndata: 4\r\n\r\n"), Some("data: 3\n\ndata: 4\r\n\r\n".into()));
        assert_eq!(push(&mut f, "data: [DONE]"), None);
        assert_eq!(f.finish().map(|b| b.to_vec()), Some(b"data: [DONE]".to_vec()));
        assert_eq!(f.finish(), None);
    }

    #[test]
    fn does_not_buffer_without_bound() {
        let mut f = SseFramer::default();
        let big = Bytes::from(vec![b'x'; MAX_PENDING + 1]);
        assert_eq!(f.push(big.clone()).map(|b| b.len()), Some(big.len()));
    }
}
