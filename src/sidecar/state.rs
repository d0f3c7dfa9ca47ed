//! What outlives a configuration: each route's and target's counters, health and recent
//! performance, kept across reloads by their ids, and the process's own counters.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use super::calls::endpoint::Api;
use super::calls::request_log::RequestLog;
use super::genai::GenAiMetrics;
use super::routing::health::{HealthTracker, Ticks};
use super::routing::stats::TargetStats;
use crate::api::FallbackReason;
use crate::metrics::{Counter, Gauge, Histogram, StatusCounter};

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
    /// Ejections another pod made that the fleet pushed here.
    pub fleet_ejections: Counter,
    pub health: HealthTracker,
    pub stats: TargetStats,
    /// The GenAI conventions' histograms of the answers it gave.
    pub genai: GenAiMetrics,
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
pub struct StateRegistry {
    targets: Mutex<BTreeMap<(String, String), Arc<TargetState>>>,
    routes: Mutex<BTreeMap<String, Arc<RouteState>>>,
    /// Responses to requests that reached no route: bad requests, unknown models.
    pub unrouted: StatusCounter,
    /// Calls of each API, by [`Api::index`].
    pub api_calls: [Counter; Api::ALL.len()],
    /// Times the configuration files were checked for changes.
    pub source_checks: Counter,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    pub last_reload_ok: Gauge,
    pub routes_loaded: Gauge,
    /// The operator's version of the configuration being served; 0 in standalone mode.
    pub config_version: Gauge,
    /// Where the served configuration came from, by [`Source::index`].
    pub config_source: Gauge,
    /// Configurations kept out as older than the one served, by [`Source::index`].
    pub older: [Counter; Source::ALL.len()],
    /// 1 while the operator's configuration stream is open.
    pub stream_connected: Gauge,
    pub pushes_applied: Counter,
    pub push_rejected: Counter,
    /// The log lines of requests that failed or fell back.
    pub request_log: RequestLog,
}

impl StateRegistry {
    /// The state of a target; the same `Arc` across configuration reloads.
    pub fn target(&self, route: &str, target: &str) -> Arc<TargetState> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.entry((route.to_string(), target.to_string())).or_default().clone()
    }

    /// The state of a target this pod serves, without making one.
    pub fn existing(&self, route: &str, target: &str) -> Option<Arc<TargetState>> {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.get(&(route.to_string(), target.to_string())).cloned()
    }

    pub fn route(&self, route: &str) -> Arc<RouteState> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.entry(route.to_string()).or_default().clone()
    }

    /// Every target's state by (route id, target name), sorted.
    pub fn targets(&self) -> Vec<((String, String), Arc<TargetState>)> {
        let guard = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        guard.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Every route's state by route id, sorted.
    pub fn routes(&self) -> Vec<(String, Arc<RouteState>)> {
        let guard = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        guard.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Forgets the routes and targets a new configuration no longer has, so that their metric
    /// series end. Requests still in flight on the old configuration keep their `Arc`s.
    pub fn retain(&self, routes: &HashSet<&str>, targets: &HashSet<(&str, &str)>) {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| routes.contains(id.as_str()));
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(route, target), _| targets.contains(&(route.as_str(), target.as_str())));
    }

    /// Recomputes every target's cached quantiles; run once a second, off the request path.
    pub fn refresh_stats(&self, now: Ticks) {
        for (_, target) in self.targets() {
            target.stats.refresh(now);
        }
    }
}

/// Where a configuration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The files given with `-f` (the mounted Secret, in a pod).
    Files,
    /// The operator's stream.
    Push,
}

impl Source {
    pub const ALL: [Source; 2] = [Source::Files, Source::Push];

    pub fn label(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Push => "push",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}
