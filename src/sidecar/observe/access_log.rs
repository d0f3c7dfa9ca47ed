//! One line per request (`--access-log`), through the process's log in its format (`--log-format`
//! text or json), under the log target [`LOG_TARGET`] so that a filter can keep or drop it alone.
//!
//! A field the request did not reach is left out rather than written empty. The line holds no
//! credential, key or prompt: the caller's key is not in the record at all.

use super::Exchange;
use crate::api::units::format_micros;

/// The log target of access lines.
pub const LOG_TARGET: &str = "sideyard::access";

pub fn write(x: &Exchange) {
    let route = x.route().map(|r| r.id.as_str());
    let target = x.target();
    let usage = x.usage.as_ref();
    let failures: Vec<String> = x
        .tries
        .iter()
        .filter_map(|t| {
            let (reason, status) = t.failure?;
            Some(match status {
                Some(status) => format!("{}: {} ({status})", t.target().name, reason.as_str()),
                None => format!("{}: {}", t.target().name, reason.as_str()),
            })
        })
        .collect();
    tracing::info!(
        target: LOG_TARGET,
        method = x.method.as_str(),
        path = x.path.as_str(),
        model = x.model.as_deref(),
        route,
        upstream_target = target.map(|t| t.name.as_str()),
        provider = target.map(|t| t.provider.as_str()),
        provider_model = target.map(|t| t.model.as_str()),
        attempts = x.attempts as u64,
        failed = ?failures,
        fallback_reason = x.fallback.map(|r| r.as_str()),
        hedged = x.hedged,
        streamed = x.streamed,
        status = u64::from(x.status),
        end = x.end.as_str(),
        latency_ms = millis(x.duration),
        ttfb_ms = x.first_byte.map(millis),
        prompt_tokens = usage.map(|u| u.prompt),
        completion_tokens = usage.map(|u| u.completion),
        cached_tokens = usage.map(|u| u.cached_prompt),
        usage_estimated = x.estimated.then_some(true),
        cost = x.cost.map(format_micros).as_deref(),
        budget = x.budget.as_deref(),
        finish_reason = x.finish_reason.as_deref(),
        request_id = x.request_id.as_deref(),
        generation_id = x.id.as_str(),
        "request"
    );
}

/// Milliseconds with microsecond precision: a sidecar's own time is well under one.
fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}
