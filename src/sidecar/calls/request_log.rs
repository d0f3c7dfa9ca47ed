//! One `info` line for every request that ended in an error status or needed a fallback, so that
//! failures show at the default log level: its request id, endpoint, model, route, the target that
//! answered last, each failed attempt with its reason, and the status.
//!
//! At most [`LINES_PER_SECOND`] such lines are written: an outage must not flood the log. The
//! rest are counted (`sideyard_request_log_suppressed_total`), and the next line written says how
//! many were left out before it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};

use super::error::AttemptFailure;
use crate::metrics::Counter;

pub const LINES_PER_SECOND: u32 = 20;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The rate limit of the lines, and what it left out.
#[derive(Default)]
pub struct RequestLog {
    /// The second (Unix) whose lines `written` counts.
    second: AtomicU64,
    written: AtomicU32,
    /// Left out since the last line written.
    pending: AtomicU64,
    /// Left out in all.
    pub suppressed: Counter,
}

/// How a request ended, as far as its log line tells.
pub struct Outcome<'a> {
    /// The caller's headers, for its `x-request-id`.
    pub headers: &'a HeaderMap,
    pub path: &'a str,
    /// The model asked for, when the body named one.
    pub model: Option<&'a str>,
    /// The route of the model asked for.
    pub route: Option<&'a str>,
    /// The target of the last attempt, which answered.
    pub target: Option<&'a str>,
    pub failures: &'a [AttemptFailure],
    pub status: u16,
}

impl<'a> Outcome<'a> {
    /// A request refused before any route took it.
    pub fn refused(headers: &'a HeaderMap, path: &'a str, model: Option<&'a str>, status: u16) -> Self {
        Outcome { headers, path, model, route: None, target: None, failures: &[], status }
    }
}

impl RequestLog {
    /// Writes the line for a request that ended in an error status or fell back; nothing for one
    /// that was served at its first try.
    pub fn record(&self, outcome: Outcome<'_>) {
        if !wanted(outcome.status, outcome.failures) {
            return;
        }
        let Some(left_out) = self.admit(unix_now()) else { return };
        let attempts: Vec<String> = outcome
            .failures
            .iter()
            .map(|f| match f.status {
                Some(status) => format!("{}: {} ({status})", f.target, f.reason),
                None => format!("{}: {}", f.target, f.reason),
            })
            .collect();
        let request_id = outcome.headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
        let message = if outcome.status >= 400 { "request failed" } else { "request served after a fallback" };
        tracing::info!(
            %request_id,
            path = %outcome.path,
            model = %outcome.model.unwrap_or("-"),
            route = %outcome.route.unwrap_or("-"),
            upstream_target = %outcome.target.unwrap_or("-"),
            attempts = ?attempts,
            status = outcome.status,
            left_out,
            "{message}"
        );
    }

    /// Whether a line may be written in second `now`, and how many were left out before it.
    fn admit(&self, now: u64) -> Option<u64> {
        if self.second.swap(now, Relaxed) != now {
            self.written.store(0, Relaxed);
        }
        if self.written.fetch_add(1, Relaxed) >= LINES_PER_SECOND {
            self.pending.fetch_add(1, Relaxed);
            self.suppressed.inc();
            return None;
        }
        Some(self.pending.swap(0, Relaxed))
    }
}

/// Whether a request that ended with `status` after `failures` gets a line: a caller may ask
/// before building its [`Outcome`].
#[inline]
pub fn wanted(status: u16, failures: &[AttemptFailure]) -> bool {
    status >= 400 || !failures.is_empty()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_limit_a_second_and_the_next_line_counts_what_was_left_out() {
        let log = RequestLog::default();
        let admitted: Vec<Option<u64>> = (0..LINES_PER_SECOND + 5).map(|_| log.admit(100)).collect();
        assert!(admitted[..LINES_PER_SECOND as usize].iter().all(|a| *a == Some(0)));
        assert!(admitted[LINES_PER_SECOND as usize..].iter().all(Option::is_none));
        assert_eq!(log.suppressed.get(), 5);
        assert_eq!(log.admit(101), Some(5), "a new second: the first line says five were left out");
        assert_eq!(log.admit(101), Some(0));
    }
}
