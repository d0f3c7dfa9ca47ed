//! Prometheus metrics with lock-free updates.
//!
//! Request handlers hold `Arc`s to the counters of their route and target, resolved once when a
//! configuration is loaded, so recording is a few relaxed atomic adds. Only scraping walks the
//! registry. The text exposition format is written here directly; a general metrics crate would
//! add a label-set lookup (a hash and a lock) to every request.

use std::fmt::Write;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Never below zero.
    pub fn dec(&self) {
        let _ = self.0.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(1)));
    }
}

/// The buckets of a histogram: upper bounds in the unit observed, and how many of that unit make
/// the unit exported (microseconds for seconds).
pub trait Scale {
    const BOUNDS: &'static [u64];
    const PER_UNIT: f64;
}

/// Seconds from 1 ms to 10 minutes: LLM calls span that whole range.
#[derive(Debug, Default)]
pub struct Latency;

impl Scale for Latency {
    const BOUNDS: &'static [u64] = &[
        1_000,
        5_000,
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        30_000_000,
        60_000_000,
        120_000_000,
        600_000_000,
    ];
    const PER_UNIT: f64 = 1e6;
}

/// The most buckets a [`Scale`] may have.
const MAX_BUCKETS: usize = 16;

/// A histogram whose buckets are those of `S`; seconds from 1 ms to 10 minutes by default.
#[derive(Debug)]
pub struct Histogram<S: Scale = Latency> {
    buckets: [AtomicU64; MAX_BUCKETS],
    count: AtomicU64,
    sum: AtomicU64,
    scale: std::marker::PhantomData<S>,
}

impl<S: Scale> Default for Histogram<S> {
    fn default() -> Self {
        const { assert!(S::BOUNDS.len() <= MAX_BUCKETS) };
        Histogram {
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            scale: std::marker::PhantomData,
        }
    }
}

impl<S: Scale> Histogram<S> {
    /// A duration, in microseconds.
    pub fn observe(&self, d: Duration) {
        self.observe_value(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// A value in the scale's own unit (microseconds, tokens).
    pub fn observe_value(&self, v: u64) {
        // Cumulative buckets are summed at scrape time, so an observation touches one bucket.
        if let Some(i) = S::BOUNDS.iter().position(|&b| v <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Writes the `_bucket`, `_sum` and `_count` series; `labels` is `a="b",c="d"`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in S::BOUNDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let le = *bound as f64 / S::PER_UNIT;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum.load(Relaxed) as f64 / S::PER_UNIT);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counts by HTTP status without a lock: a small open-addressed table that each status claims
/// once. A target sees only a handful of distinct statuses; any beyond the table's size are
/// counted as `other`.
#[derive(Debug, Default)]
pub struct StatusCounter {
    slots: [(AtomicU16, AtomicU64); 16],
    other: AtomicU64,
}

impl StatusCounter {
    pub fn inc(&self, status: u16) {
        for (key, count) in &self.slots {
            let mut current = key.load(Relaxed);
            if current == 0 {
                current = match key.compare_exchange(0, status, Relaxed, Relaxed) {
                    Ok(_) => status,
                    Err(claimed) => claimed,
                };
            }
            if current == status {
                count.fetch_add(1, Relaxed);
                return;
            }
        }
        self.other.fetch_add(1, Relaxed);
    }

    /// The counts, by status, in ascending order of status.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(u16, u64)> =
            self.slots.iter().map(|(k, c)| (k.load(Relaxed), c.load(Relaxed))).filter(|(k, _)| *k != 0).collect();
        out.sort_unstable();
        let mut out: Vec<(String, u64)> = out.into_iter().map(|(k, c)| (k.to_string(), c)).collect();
        let other = self.other.load(Relaxed);
        if other > 0 {
            out.push(("other".into(), other));
        }
        out
    }
}

/// Writes a `# HELP` and `# TYPE` header.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value for the text format.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h: Histogram = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(3600));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"600\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn status_counter_counts_each_status_and_overflows_to_other() {
        let c = StatusCounter::default();
        for status in 400..420u16 {
            c.inc(status);
        }
        c.inc(400);
        let snap = c.snapshot();
        assert_eq!(snap[0], ("400".to_string(), 2));
        assert_eq!(snap.len(), 17);
        assert_eq!(snap[16], ("other".to_string(), 4));
    }
}
