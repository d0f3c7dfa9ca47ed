//! How the built-in fake provider behaves, as plain data: the knobs of a `mock://` base URL and of
//! `sideyard mock-provider`'s flags, with their defaults and parsers in one place.

use std::time::Duration;

use super::Credential;
use crate::api::units::{MICROS_PER_UNIT, parse_duration, parse_micros};

/// The fake provider's knobs. `mock://local?latency=50ms&fail-rate=0.5` sets them by name; the
/// command line's flags carry the same names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockOptions {
    /// Delay before the response headers.
    pub latency: Duration,
    /// Words in each answer; a stream sends one word per chunk. A request's `max_tokens` caps it.
    pub chunks: u32,
    /// Delay between streamed chunks.
    pub chunk_interval: Duration,
    /// When a stream ends with a usage chunk.
    pub usage: UsageChunk,
    /// Fraction of requests that fail with `fail_status`, in parts per million.
    pub fail_rate: u64,
    /// HTTP status of injected failures (400 to 599).
    pub fail_status: u16,
    /// Break the connection after this many streamed chunks (or, for JSON, before the body).
    pub reset_after: Option<u32>,
    /// Stop sending, leaving the connection open, after this many streamed chunks.
    pub stall_after: Option<u32>,
    /// End the stream with the provider's own error event after this many streamed chunks.
    pub error_after: Option<u32>,
    /// Never send response headers.
    pub hang: bool,
    /// Answer 401 unless the request carries `Authorization: Bearer <KEY>`.
    pub require_key: Option<Credential>,
}

/// When a stream ends with a usage chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageChunk {
    /// When the request sets `stream_options.include_usage`, as OpenAI does.
    Requested,
    Always,
    Never,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            chunks: 8,
            chunk_interval: Duration::from_millis(20),
            usage: UsageChunk::Requested,
            fail_rate: 0,
            fail_status: 500,
            reset_after: None,
            stall_after: None,
            error_after: None,
            hang: false,
            require_key: None,
        }
    }
}

/// The knobs a `mock://` query may set, for the error message of an unknown one.
const QUERY_KNOBS: &str =
    "latency, chunks, chunk-interval, usage, fail-rate, fail-status, reset-after, stall-after, error-after, hang";

impl MockOptions {
    /// Reads `latency=50ms&chunks=4&fail-rate=0.5`: the flag names without their dashes prefix.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut o = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
            let wrap = |e: String| format!("mock option {key}: {e}");
            match key {
                "latency" => o.latency = parse_duration(value).map_err(wrap)?,
                "chunks" => o.chunks = parse_count(value).map_err(wrap)?,
                "chunk-interval" => o.chunk_interval = parse_duration(value).map_err(wrap)?,
                "usage" => o.usage = parse_usage(value).map_err(wrap)?,
                "fail-rate" => o.fail_rate = parse_rate(value).map_err(wrap)?,
                "fail-status" => o.fail_status = parse_fail_status(value).map_err(wrap)?,
                "reset-after" => o.reset_after = Some(parse_count(value).map_err(wrap)?),
                "stall-after" => o.stall_after = Some(parse_count(value).map_err(wrap)?),
                "error-after" => o.error_after = Some(parse_count(value).map_err(wrap)?),
                "hang" => o.hang = value == "true",
                _ => return Err(format!("unknown mock option {key:?}; known: {QUERY_KNOBS}")),
            }
        }
        Ok(o)
    }
}

pub fn parse_usage(s: &str) -> Result<UsageChunk, String> {
    match s {
        "requested" => Ok(UsageChunk::Requested),
        "always" => Ok(UsageChunk::Always),
        "never" => Ok(UsageChunk::Never),
        _ => Err(format!("{s:?} is not one of requested, always, never")),
    }
}

/// A probability as parts per million, read with the decimal parser (no floats needed).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let ppm = parse_micros(s)?;
    if ppm > MICROS_PER_UNIT {
        return Err(format!("{s:?} is not between 0 and 1"));
    }
    Ok(ppm)
}

pub fn parse_fail_status(s: &str) -> Result<u16, String> {
    s.parse()
        .ok()
        .filter(|s| (400..600).contains(s))
        .ok_or_else(|| format!("{s:?} is not an HTTP error status (400 to 599)"))
}

pub fn parse_count(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("{s:?} is not a whole number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_sets_the_knobs_it_names_and_keeps_the_defaults_of_the_rest() {
        let o = MockOptions::from_query("latency=50ms&fail-rate=0.5&fail-status=503&hang").unwrap();
        assert_eq!(
            o,
            MockOptions {
                latency: Duration::from_millis(50),
                fail_rate: 500_000,
                fail_status: 503,
                hang: true,
                ..MockOptions::default()
            }
        );
        assert!(MockOptions::from_query("fail-rate=2").unwrap_err().contains("between 0 and 1"));
        assert!(MockOptions::from_query("fail-status=200").unwrap_err().contains("400 to 599"));
        assert!(MockOptions::from_query("speed=1").unwrap_err().contains("known: latency"));
    }
}
