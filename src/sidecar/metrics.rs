//! The sidecar's long-lived state per route and per target (counters, health, recent performance),
//! kept across configuration reloads, and its Prometheus exposition.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use super::health::{Admission, Health, Ticks};
use super::stats::{Cached, QUANTILES, TargetStats};
use crate::api::FallbackReason;
use crate::metrics::{Counter, Gauge, Histogram, StatusCounter, escape, header};

/// Everything about one target of one route that outlives a configuration. Handlers hold an `Arc`.
#[derive(Default)]
pub struct TargetState {
    /// Responses to callers that this target served, or that failed on it last.
    pub requests: StatusCounter,
    /// Per attempt: time from sending the request to the upstream's response headers.
    pub first_byte: Histogram,
    /// Per attempt: time until the answer was complete (or failed).
    pub duration: Histogram,
    /// Attempts by outcome: index 0 is success, then one per [`FallbackReason`].
    pub outcomes: [Counter; 1 + FallbackReason::ALL.len()],
    /// Failed attempts that moved on to the next target, by reason.
    pub fallbacks: [Counter; FallbackReason::ALL.len()],
    /// Streams that broke after the answer started, ended with an error event.
    pub stream_errors: Counter,
    pub ejections: Counter,
    pub cooldowns: Counter,
    pub health: Health,
    pub stats: TargetStats,
}

impl TargetState {
    pub fn count_outcome(&self, failure: Option<FallbackReason>) {
        self.outcomes[failure.map_or(0, |r| 1 + r.index())].inc();
    }
}

/// Route-level counters.
#[derive(Debug, Default)]
pub struct RouteState {
    /// Responses to requests that no target of the route took.
    pub requests: StatusCounter,
    /// Requests sent to an unavailable target because every target was ejected or cooling.
    pub panics: Counter,
    pub hedges_started: Counter,
    /// Hedges where the hedged (second) attempt answered first.
    pub hedges_won: Counter,
    /// Hedges where the first attempt still answered first.
    pub hedges_lost: Counter,
    /// Requests that no target could serve, by the constraint that excluded the last of them.
    pub excluded: Mutex<BTreeMap<&'static str, u64>>,
}

impl RouteState {
    pub fn count_excluded(&self, by: &[&'static str]) {
        let mut excluded = self.excluded.lock().unwrap_or_else(|e| e.into_inner());
        for b in by {
            *excluded.entry(b).or_default() += 1;
        }
    }
}

#[derive(Default)]
pub struct SidecarMetrics {
    targets: Mutex<BTreeMap<(String, String), Arc<TargetState>>>,
    routes: Mutex<BTreeMap<String, Arc<RouteState>>>,
    /// Responses to requests that reached no route: bad requests, unknown models.
    pub unrouted: StatusCounter,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    pub last_reload_ok: Gauge,
    pub routes_loaded: Gauge,
    /// The operator's version of the configuration being served; 0 in standalone mode.
    pub config_version: Gauge,
}

impl SidecarMetrics {
    /// The state of a target; the same `Arc` across configuration reloads.
    pub fn target(&self, route: &str, target: &str) -> Arc<TargetState> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.entry((route.to_string(), target.to_string())).or_default().clone()
    }

    pub fn route(&self, route: &str) -> Arc<RouteState> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.entry(route.to_string()).or_default().clone()
    }

    fn targets(&self) -> Vec<((String, String), Arc<TargetState>)> {
        let guard = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        guard.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Recomputes every target's cached quantiles; run once a second, off the request path.
    pub fn refresh_stats(&self, now: Ticks) {
        for (_, target) in self.targets() {
            target.stats.refresh(now);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, now: Ticks) -> String {
        let targets = self.targets();
        let routes: Vec<(String, Arc<RouteState>)> = {
            let guard = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            guard.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let labels: Vec<String> =
            targets.iter().map(|((r, t), _)| format!("route=\"{}\",target=\"{}\"", escape(r), escape(t))).collect();
        let per_target = || labels.iter().zip(targets.iter().map(|(_, s)| s));
        let mut out = String::with_capacity(8192 + targets.len() * 6144);

        header(
            &mut out,
            "switchyard_requests_total",
            "counter",
            "Responses to callers, by route, target and HTTP status.",
        );
        for (status, n) in self.unrouted.snapshot() {
            let _ = writeln!(out, "switchyard_requests_total{{route=\"\",target=\"\",status=\"{status}\"}} {n}");
        }
        for (r, s) in &routes {
            for (status, n) in s.requests.snapshot() {
                let _ = writeln!(
                    out,
                    "switchyard_requests_total{{route=\"{}\",target=\"\",status=\"{status}\"}} {n}",
                    escape(r)
                );
            }
        }
        for (l, t) in per_target() {
            for (status, n) in t.requests.snapshot() {
                let _ = writeln!(out, "switchyard_requests_total{{{l},status=\"{status}\"}} {n}");
            }
        }

        header(
            &mut out,
            "switchyard_upstream_first_byte_seconds",
            "histogram",
            "Time from sending an attempt to the upstream's response headers.",
        );
        for (l, t) in per_target() {
            t.first_byte.render(&mut out, "switchyard_upstream_first_byte_seconds", l);
        }
        header(
            &mut out,
            "switchyard_upstream_duration_seconds",
            "histogram",
            "Time until an attempt's answer was complete or failed.",
        );
        for (l, t) in per_target() {
            t.duration.render(&mut out, "switchyard_upstream_duration_seconds", l);
        }

        header(
            &mut out,
            "switchyard_upstream_outcomes_total",
            "counter",
            "Attempts by outcome: success or the failure reason.",
        );
        for (l, t) in per_target() {
            for (i, n) in t.outcomes.iter().enumerate() {
                let outcome = if i == 0 { "success" } else { FallbackReason::ALL[i - 1].as_str() };
                let _ = writeln!(out, "switchyard_upstream_outcomes_total{{{l},outcome=\"{outcome}\"}} {}", n.get());
            }
        }
        header(
            &mut out,
            "switchyard_fallbacks_total",
            "counter",
            "Failed attempts that moved on to the next target, by reason.",
        );
        for (l, t) in per_target() {
            for (reason, n) in FallbackReason::ALL.iter().zip(&t.fallbacks) {
                let _ = writeln!(out, "switchyard_fallbacks_total{{{l},reason=\"{}\"}} {}", reason.as_str(), n.get());
            }
        }
        header(&mut out, "switchyard_stream_errors_total", "counter", "Streams that broke after the answer started.");
        for (l, t) in per_target() {
            let _ = writeln!(out, "switchyard_stream_errors_total{{{l}}} {}", t.stream_errors.get());
        }

        header(&mut out, "switchyard_target_health", "gauge", "1 for the target's current health state.");
        for (l, t) in per_target() {
            let state = health_state(t.health.admission(now));
            for s in ["healthy", "ejected", "half-open", "cooling"] {
                let _ = writeln!(out, "switchyard_target_health{{{l},state=\"{s}\"}} {}", u8::from(s == state));
            }
        }
        header(&mut out, "switchyard_ejections_total", "counter", "Times a target was ejected after failures.");
        for (l, t) in per_target() {
            let _ = writeln!(out, "switchyard_ejections_total{{{l}}} {}", t.ejections.get());
        }
        header(
            &mut out,
            "switchyard_cooldowns_total",
            "counter",
            "Rate-limit answers with a retry hint that paused a target.",
        );
        for (l, t) in per_target() {
            let _ = writeln!(out, "switchyard_cooldowns_total{{{l}}} {}", t.cooldowns.get());
        }

        type Pick = fn(&TargetStats) -> &Cached;
        let quantile_gauges: [(&str, &str, Pick, f64); 3] = [
            (
                "switchyard_target_time_to_first_token_seconds",
                "Time to first token over the last 5 minutes.",
                |s| &s.ttft_cached,
                1e6,
            ),
            ("switchyard_target_total_seconds", "Attempt duration over the last 5 minutes.", |s| &s.total_cached, 1e6),
            (
                "switchyard_target_output_tokens_per_second",
                "Output tokens per second over the last 5 minutes.",
                |s| &s.throughput_cached,
                1e3,
            ),
        ];
        for (name, help, pick, scale) in quantile_gauges {
            header(&mut out, name, "gauge", help);
            for (l, t) in per_target() {
                let cached = pick(&t.stats);
                for (i, (q, _)) in QUANTILES.iter().enumerate() {
                    if let Some(v) = cached.get(i) {
                        let _ = writeln!(out, "{name}{{{l},quantile=\"{q}\"}} {}", v as f64 / scale);
                    }
                }
            }
        }

        header(
            &mut out,
            "switchyard_panic_routing_total",
            "counter",
            "Requests sent to an unavailable target because every target was.",
        );
        for (r, s) in &routes {
            let _ = writeln!(out, "switchyard_panic_routing_total{{route=\"{}\"}} {}", escape(r), s.panics.get());
        }
        header(&mut out, "switchyard_hedges_total", "counter", "Hedged attempts: started, and whether the hedge won.");
        for (r, s) in &routes {
            for (result, n) in [("started", &s.hedges_started), ("won", &s.hedges_won), ("lost", &s.hedges_lost)] {
                let _ =
                    writeln!(out, "switchyard_hedges_total{{route=\"{}\",result=\"{result}\"}} {}", escape(r), n.get());
            }
        }
        header(
            &mut out,
            "switchyard_excluded_requests_total",
            "counter",
            "Requests no target could serve, by the constraint.",
        );
        for (r, s) in &routes {
            let excluded = s.excluded.lock().unwrap_or_else(|e| e.into_inner());
            for (by, n) in excluded.iter() {
                let _ = writeln!(
                    out,
                    "switchyard_excluded_requests_total{{route=\"{}\",excluded_by=\"{by}\"}} {n}",
                    escape(r)
                );
            }
        }

        header(&mut out, "switchyard_config_reloads_total", "counter", "Configuration reloads, by result.");
        let _ = writeln!(out, "switchyard_config_reloads_total{{result=\"success\"}} {}", self.reloads_ok.get());
        let _ = writeln!(out, "switchyard_config_reloads_total{{result=\"failure\"}} {}", self.reloads_failed.get());
        header(
            &mut out,
            "switchyard_config_last_reload_success",
            "gauge",
            "1 if the last configuration change was loaded, 0 if it was rejected.",
        );
        let _ = writeln!(out, "switchyard_config_last_reload_success {}", self.last_reload_ok.get());
        header(&mut out, "switchyard_config_routes", "gauge", "Routes in the configuration being served.");
        let _ = writeln!(out, "switchyard_config_routes {}", self.routes_loaded.get());
        header(
            &mut out,
            "switchyard_config_version",
            "gauge",
            "Version of the operator-compiled configuration being served (0: loaded from ProviderRoute files).",
        );
        let _ = writeln!(out, "switchyard_config_version {}", self.config_version.get());
        out
    }
}

/// The name of a health state, as in metrics and `GET /v1/models`.
pub fn health_state(admission: Admission) -> &'static str {
    match admission {
        Admission::Open => "healthy",
        Admission::HalfOpen => "half-open",
        Admission::Ejected { .. } => "ejected",
        Admission::Cooling { .. } => "cooling",
    }
}
