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

use super::state::RouteRt;
use super::upstream::{UpstreamBody, error_chain};
use crate::api::units::format_duration;
use crate::providers::openai::stream_error_event;

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

/// The body of a streamed response: the upstream's events, then either its clean end or one
/// terminal error event.
pub struct SseRelay {
    inner: UpstreamBody,
    framer: SseFramer,
    deadline: Pin<Box<Sleep>>,
    route: Arc<RouteRt>,
    target: usize,
    started: Instant,
    total: Duration,
    done: bool,
}

impl SseRelay {
    pub fn new(inner: UpstreamBody, route: Arc<RouteRt>, target: usize, started: Instant, total: Duration) -> Self {
        let deadline = Box::pin(tokio::time::sleep_until((started + total).into()));
        SseRelay { inner, framer: SseFramer::default(), deadline, route, target, started, total, done: false }
    }

    /// Ends the stream with an error event; the partial event held back is dropped.
    fn fail(&mut self, code: &str, message: String) -> Bytes {
        self.done = true;
        let target = &self.route.targets[self.target];
        target.metrics.stream_errors.inc();
        target.metrics.duration.observe(self.started.elapsed());
        tracing::warn!(route = %self.route.id, target = %target.name, %code, %message, "stream broke after the answer started");
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        stream_error_event(&self.route.model, &target.provider, code, &message, created)
    }
}

impl Body for SseRelay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
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
                        return Poll::Ready(Some(Ok(Frame::data(complete))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let message = format!("the upstream connection broke mid-stream: {}", error_chain(&*e));
                    return Poll::Ready(Some(Ok(Frame::data(this.fail("upstream_disconnected", message)))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.route.targets[this.target].metrics.duration.observe(this.started.elapsed());
                    return Poll::Ready(this.framer.finish().map(|rest| Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
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
