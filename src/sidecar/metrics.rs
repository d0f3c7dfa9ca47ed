//! The sidecar's metrics: per route and target, resolved once per configuration load.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::api::FallbackReason;
use crate::metrics::{Counter, Gauge, Histogram, StatusCounter, escape, header};

/// The counters of one target of one route. Handlers hold an `Arc` to it.
#[derive(Debug, Default)]
pub struct TargetMetrics {
    /// Responses to callers that this target served, or that failed on it last.
    pub requests: StatusCounter,
    /// Per attempt: time from sending the request to the upstream's response headers.
    pub first_byte: Histogram,
    /// Per attempt: time until the answer was complete (or failed).
    pub duration: Histogram,
    /// Failed attempts that moved on to the next target, by reason.
    pub fallbacks: [Counter; FallbackReason::ALL.len()],
    /// Streams that broke after the answer started, ended with an error event.
    pub stream_errors: Counter,
}

#[derive(Debug, Default)]
pub struct SidecarMetrics {
    targets: Mutex<BTreeMap<(String, String), Arc<TargetMetrics>>>,
    /// Responses to requests that reached no route: bad requests, unknown models.
    pub unrouted: StatusCounter,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    pub last_reload_ok: Gauge,
    pub routes: Gauge,
}

impl SidecarMetrics {
    /// The metrics of a target; the same `Arc` across configuration reloads, so counters persist.
    pub fn target(&self, route: &str, target: &str) -> Arc<TargetMetrics> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.entry((route.to_string(), target.to_string())).or_default().clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let targets: Vec<((String, String), Arc<TargetMetrics>)> = {
            let guard = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            guard.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let labels: Vec<String> =
            targets.iter().map(|((r, t), _)| format!("route=\"{}\",target=\"{}\"", escape(r), escape(t))).collect();
        let mut out = String::with_capacity(4096 + targets.len() * 4096);

        header(
            &mut out,
            "switchyard_requests_total",
            "counter",
            "Responses to callers, by route, target and HTTP status.",
        );
        for (status, n) in self.unrouted.snapshot() {
            out.push_str(&format!("switchyard_requests_total{{route=\"\",target=\"\",status=\"{status}\"}} {n}\n"));
        }
        for (l, (_, m)) in labels.iter().zip(&targets) {
            for (status, n) in m.requests.snapshot() {
                out.push_str(&format!("switchyard_requests_total{{{l},status=\"{status}\"}} {n}\n"));
            }
        }

        header(
            &mut out,
            "switchyard_upstream_first_byte_seconds",
            "histogram",
            "Time from sending an attempt to the upstream's response headers.",
        );
        for (l, (_, m)) in labels.iter().zip(&targets) {
            m.first_byte.render(&mut out, "switchyard_upstream_first_byte_seconds", l);
        }

        header(
            &mut out,
            "switchyard_upstream_duration_seconds",
            "histogram",
            "Time until an attempt's answer was complete or failed.",
        );
        for (l, (_, m)) in labels.iter().zip(&targets) {
            m.duration.render(&mut out, "switchyard_upstream_duration_seconds", l);
        }

        header(
            &mut out,
            "switchyard_fallbacks_total",
            "counter",
            "Failed attempts that moved on to the next target, by reason.",
        );
        for (l, (_, m)) in labels.iter().zip(&targets) {
            for (reason, n) in FallbackReason::ALL.iter().zip(&m.fallbacks) {
                out.push_str(&format!(
                    "switchyard_fallbacks_total{{{l},reason=\"{}\"}} {}\n",
                    reason.as_str(),
                    n.get()
                ));
            }
        }

        header(&mut out, "switchyard_stream_errors_total", "counter", "Streams that broke after the answer started.");
        for (l, (_, m)) in labels.iter().zip(&targets) {
            out.push_str(&format!("switchyard_stream_errors_total{{{l}}} {}\n", m.stream_errors.get()));
        }

        header(&mut out, "switchyard_config_reloads_total", "counter", "Configuration reloads, by result.");
        out.push_str(&format!("switchyard_config_reloads_total{{result=\"success\"}} {}\n", self.reloads_ok.get()));
        out.push_str(&format!("switchyard_config_reloads_total{{result=\"failure\"}} {}\n", self.reloads_failed.get()));
        header(
            &mut out,
            "switchyard_config_last_reload_success",
            "gauge",
            "1 if the last configuration change was loaded, 0 if it was rejected.",
        );
        out.push_str(&format!("switchyard_config_last_reload_success {}\n", self.last_reload_ok.get()));
        header(&mut out, "switchyard_config_routes", "gauge", "Routes in the configuration being served.");
        out.push_str(&format!("switchyard_config_routes {}\n", self.routes.get()));
        out
    }
}
