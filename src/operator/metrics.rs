//! The operator's Prometheus metrics, served on its admin port.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Mutex;

use crate::api::units::format_micros;
use crate::metrics::{Counter, Gauge, Histogram, escape, header};

/// What a namespace reconcile counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReconcileOutcome {
    Success,
    /// The reconcile failed; the label names the step (see [`super::Error::label`]).
    Error(&'static str),
}

impl ReconcileOutcome {
    /// `success`, or the failed step.
    pub fn label(self) -> &'static str {
        match self {
            ReconcileOutcome::Success => "success",
            ReconcileOutcome::Error(step) => step,
        }
    }
}

#[derive(Debug, Default)]
pub struct OperatorMetrics {
    /// Objects reconciled, by kind and outcome.
    reconciles: Mutex<BTreeMap<(&'static str, ReconcileOutcome), u64>>,
    pub reconcile_duration: Histogram,
    /// Bytes of each namespace's compiled configuration.
    config_bytes: Mutex<BTreeMap<String, u64>>,
    /// Namespaces waiting for a reconcile.
    queued: Mutex<BTreeSet<String>>,
    pub config_writes: Counter,
    pub config_deletes: Counter,
    pub status_writes: Counter,
    /// Keys' limits raised from their parents' credit.
    pub top_ups: Counter,
    pub events_posted: Counter,
    pub events_failed: Counter,
    pub leader: Gauge,
    /// Webhook reviews of pods, by result.
    injections: Mutex<BTreeMap<&'static str, u64>>,
    /// Ledger calls by call and result.
    ledger_calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Sidecar tokens checked, by result.
    token_reviews: Mutex<BTreeMap<&'static str, u64>>,
    /// Credit granted in leases, in micro-units.
    pub ledger_credit_granted: Counter,
    /// Budget statuses the ledger could not write.
    pub ledger_persist_failures: Counter,
    /// Ledger calls answered only once the budget's status was written, by call.
    ledger_persist_waits: Mutex<BTreeMap<&'static str, u64>>,
    /// Sidecars connected to the configuration stream now.
    pub config_streams: Gauge,
    /// Configuration streams asked for, by result.
    config_stream_opens: Mutex<BTreeMap<&'static str, u64>>,
    pub config_frames: Counter,
    pub config_frame_bytes: Counter,
    /// Sidecars' reports that put a target out for their namespace's fleet.
    pub fleet_holds: Counter,
}

impl OperatorMetrics {
    pub fn reconciled(&self, kind: &'static str, outcome: ReconcileOutcome, objects: usize) {
        if objects > 0 {
            *lock(&self.reconciles).entry((kind, outcome)).or_default() += objects as u64;
        }
    }

    /// A pod review ended `injected`, `skipped` or `refused`.
    pub fn injection(&self, result: &'static str) {
        *lock(&self.injections).entry(result).or_default() += 1;
    }

    /// A ledger call (`lease`, `report`, `reserve`, `settle`) ended with `result` (`ok` or an
    /// error code).
    pub fn ledger_call(&self, call: &'static str, result: &'static str) {
        *lock(&self.ledger_calls).entry((call, result)).or_default() += 1;
    }

    /// A ledger call waited for the budget's status to be written before it was answered.
    pub fn ledger_persist_wait(&self, call: &'static str) {
        *lock(&self.ledger_persist_waits).entry(call).or_default() += 1;
    }

    /// A sidecar's token was `authenticated`, `refused`, for the `wrong_namespace`, or could not
    /// be checked (`error`).
    pub fn token_review(&self, result: &'static str) {
        *lock(&self.token_reviews).entry(result).or_default() += 1;
    }

    /// A sidecar asked for its configuration stream: `opened`, `refused` (its token or pod), or
    /// `error` (the pod could not be read).
    pub fn config_stream(&self, result: &'static str) {
        *lock(&self.config_stream_opens).entry(result).or_default() += 1;
    }

    /// A configuration frame of `bytes` was sent to a sidecar.
    pub fn config_frame(&self, bytes: usize) {
        self.config_frames.inc();
        self.config_frame_bytes.add(bytes as u64);
    }

    pub fn leased(&self, credit: u64) {
        self.ledger_credit_granted.add(credit);
    }

    pub fn config_bytes(&self, namespace: &str, bytes: usize) {
        let mut sizes = lock(&self.config_bytes);
        if bytes == 0 {
            sizes.remove(namespace);
        } else {
            sizes.insert(namespace.to_string(), bytes as u64);
        }
    }

    /// A change was seen that the namespace's next reconcile will pick up.
    pub fn queued(&self, namespace: &str) {
        lock(&self.queued).insert(namespace.to_string());
    }

    /// A reconcile of the namespace started: it sees every change queued until now.
    pub fn dequeued(&self, namespace: &str) {
        lock(&self.queued).remove(namespace);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "sideyard_operator_reconciles_total",
            "counter",
            "ProviderRoutes and ApiKeyBudgets reconciled, by kind and result (an error result names the failed step).",
        );
        for ((kind, outcome), n) in lock(&self.reconciles).iter() {
            let result = outcome.label();
            let _ = writeln!(out, "sideyard_operator_reconciles_total{{kind=\"{kind}\",result=\"{result}\"}} {n}");
        }
        header(
            &mut out,
            "sideyard_operator_reconcile_duration_seconds",
            "histogram",
            "Time to reconcile one namespace, API writes included.",
        );
        self.reconcile_duration.render(&mut out, "sideyard_operator_reconcile_duration_seconds", "");
        header(
            &mut out,
            "sideyard_operator_config_bytes",
            "gauge",
            "Size of each namespace's compiled configuration (the Secret limit is 1048576).",
        );
        for (ns, bytes) in lock(&self.config_bytes).iter() {
            let _ = writeln!(out, "sideyard_operator_config_bytes{{namespace=\"{}\"}} {bytes}", escape(ns));
        }
        header(&mut out, "sideyard_operator_queue_depth", "gauge", "Namespaces with changes waiting for a reconcile.");
        let _ = writeln!(out, "sideyard_operator_queue_depth {}", lock(&self.queued).len());
        let writes = [
            ("sideyard_operator_config_writes_total", "Compiled configurations applied.", &self.config_writes),
            ("sideyard_operator_config_deletes_total", "Configuration Secrets deleted.", &self.config_deletes),
            ("sideyard_operator_status_writes_total", "Status patches applied.", &self.status_writes),
            (
                "sideyard_operator_budget_top_ups_total",
                "Keys' limits raised from their parents' credit.",
                &self.top_ups,
            ),
            ("sideyard_operator_events_total", "Events posted.", &self.events_posted),
            ("sideyard_operator_event_failures_total", "Events the API server refused.", &self.events_failed),
        ];
        for (name, help, counter) in writes {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.get());
        }
        header(&mut out, "sideyard_operator_leader", "gauge", "1 while this replica holds the leader lease.");
        let _ = writeln!(out, "sideyard_operator_leader {}", self.leader.get());
        header(
            &mut out,
            "sideyard_webhook_pods_total",
            "counter",
            "Pods the injection webhook reviewed, by result: injected, skipped or refused.",
        );
        for (result, n) in lock(&self.injections).iter() {
            let _ = writeln!(out, "sideyard_webhook_pods_total{{result=\"{result}\"}} {n}");
        }
        header(&mut out, "sideyard_ledger_calls_total", "counter", "Calls to the budget ledger, by call and result.");
        for ((call, result), n) in lock(&self.ledger_calls).iter() {
            let _ = writeln!(out, "sideyard_ledger_calls_total{{call=\"{call}\",result=\"{result}\"}} {n}");
        }
        header(
            &mut out,
            "sideyard_ledger_token_reviews_total",
            "counter",
            "Sidecar tokens the ledger checked, by result: authenticated, refused, wrong_namespace, error.",
        );
        for (result, n) in lock(&self.token_reviews).iter() {
            let _ = writeln!(out, "sideyard_ledger_token_reviews_total{{result=\"{result}\"}} {n}");
        }
        header(&mut out, "sideyard_ledger_granted_credits_total", "counter", "Credits granted to sidecars in leases.");
        let _ =
            writeln!(out, "sideyard_ledger_granted_credits_total {}", format_micros(self.ledger_credit_granted.get()));
        header(
            &mut out,
            "sideyard_ledger_persist_failures_total",
            "counter",
            "Budget statuses the ledger could not write (the grants waiting on them were refused).",
        );
        let _ = writeln!(out, "sideyard_ledger_persist_failures_total {}", self.ledger_persist_failures.get());
        header(
            &mut out,
            "sideyard_ledger_persist_waits_total",
            "counter",
            "Ledger calls answered only once the budget's status was written (a grant a new leader must count, a lease reported done), by call.",
        );
        for call in ["lease", "report", "reserve", "settle", "debt", "holdings"] {
            let n = lock(&self.ledger_persist_waits).get(call).copied().unwrap_or(0);
            let _ = writeln!(out, "sideyard_ledger_persist_waits_total{{call=\"{call}\"}} {n}");
        }
        header(
            &mut out,
            "sideyard_operator_config_streams",
            "gauge",
            "Sidecars connected to this replica's configuration stream.",
        );
        let _ = writeln!(out, "sideyard_operator_config_streams {}", self.config_streams.get());
        header(
            &mut out,
            "sideyard_operator_config_stream_requests_total",
            "counter",
            "Configuration streams sidecars asked for, by result: opened, refused (token or pod), error (the pod could not be read).",
        );
        for result in ["opened", "refused", "error"] {
            let n = lock(&self.config_stream_opens).get(result).copied().unwrap_or(0);
            let _ = writeln!(out, "sideyard_operator_config_stream_requests_total{{result=\"{result}\"}} {n}");
        }
        let sent = [
            (
                "sideyard_operator_fleet_outages_total",
                "Sidecar reports of an ejection or cooldown that was pushed to their namespace's other sidecars.",
                &self.fleet_holds,
            ),
            (
                "sideyard_operator_config_frames_total",
                "Frames (configurations and fleet health) sent to sidecars.",
                &self.config_frames,
            ),
            (
                "sideyard_operator_config_frame_bytes_total",
                "Bytes of configuration sent to sidecars.",
                &self.config_frame_bytes,
            ),
        ];
        for (name, help, counter) in sent {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.get());
        }
        if let Some(traces) = crate::traces::Traces::global() {
            traces.render(&mut out);
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
