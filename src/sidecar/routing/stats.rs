//! Recent latency and throughput of one target: time to first token, total time and output tokens
//! per second over a rolling five-minute window, as p50/p75/p90/p99.
//!
//! Recording is a few relaxed atomic adds into a log-scale histogram of the current minute.
//! Quantiles are computed once a second by [`TargetStats::refresh`] (a background task), so the
//! strategies that read them on every request only load cached values.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::health::Ticks;
use crate::config::Measure;

const MINUTE: Ticks = 60_000_000_000;
const SLOTS: usize = 5;
/// Values below 16 have a bucket each; above, each power of two is split in four (about 19% wide).
const LINEAR: usize = 16;
const MAX_OCTAVE: u32 = 40;
const BUCKETS: usize = LINEAR + (MAX_OCTAVE as usize - 3) * 4;

pub const QUANTILES: [(&str, u64); 4] = [("0.5", 50), ("0.75", 75), ("0.9", 90), ("0.99", 99)];

fn bucket(v: u64) -> usize {
    if v < LINEAR as u64 {
        return v as usize;
    }
    let octave = (63 - v.leading_zeros()).min(MAX_OCTAVE);
    let sub = ((v >> (octave - 2)) & 3) as usize;
    (LINEAR + (octave as usize - 4) * 4 + sub).min(BUCKETS - 1)
}

/// The middle of a bucket's range, as the value reported for it.
fn representative(index: usize) -> u64 {
    if index < LINEAR {
        return index as u64;
    }
    let octave = (index - LINEAR) / 4 + 4;
    let sub = ((index - LINEAR) % 4) as u64;
    let low = (1u64 << octave) + sub * (1u64 << (octave - 2));
    low + (1u64 << (octave - 2)) / 2
}

struct Slot {
    minute: AtomicU64,
    counts: [AtomicU32; BUCKETS],
}

/// A histogram over the last five minutes, allocated on first use (idle targets cost nothing).
#[derive(Default)]
pub struct Rolling {
    slots: OnceLock<Box<[Slot; SLOTS]>>,
}

impl Rolling {
    pub fn record(&self, value: u64, now: Ticks) {
        let slots = self.slots.get_or_init(|| {
            Box::new(std::array::from_fn(|_| Slot {
                minute: AtomicU64::new(u64::MAX),
                counts: std::array::from_fn(|_| AtomicU32::new(0)),
            }))
        });
        let minute = now / MINUTE;
        let slot = &slots[(minute % SLOTS as u64) as usize];
        let seen = slot.minute.load(Relaxed);
        // The first recorder of a new minute clears the slot's counts from five minutes ago.
        if seen != minute && slot.minute.compare_exchange(seen, minute, Relaxed, Relaxed).is_ok() {
            for c in &slot.counts {
                c.store(0, Relaxed);
            }
        }
        slot.counts[bucket(value)].fetch_add(1, Relaxed);
    }

    /// The samples of the window and the value at each of `percentiles`.
    pub fn quantiles(&self, now: Ticks, percentiles: &[u64]) -> (u64, Vec<u64>) {
        let Some(slots) = self.slots.get() else { return (0, vec![0; percentiles.len()]) };
        let minute = now / MINUTE;
        let mut counts = [0u64; BUCKETS];
        for slot in slots.iter() {
            let m = slot.minute.load(Relaxed);
            if m <= minute && minute - m < SLOTS as u64 {
                for (total, c) in counts.iter_mut().zip(&slot.counts) {
                    *total += u64::from(c.load(Relaxed));
                }
            }
        }
        let samples: u64 = counts.iter().sum();
        let values = percentiles
            .iter()
            .map(|p| {
                if samples == 0 {
                    return 0;
                }
                let rank = (samples * p).div_ceil(100).max(1);
                let mut seen = 0;
                counts
                    .iter()
                    .position(|c| {
                        seen += c;
                        seen >= rank
                    })
                    .map_or(0, representative)
            })
            .collect();
        (samples, values)
    }
}

/// Cached quantiles of one measure; 0 samples means unknown.
#[derive(Debug, Default)]
pub struct Cached {
    pub samples: AtomicU64,
    pub values: [AtomicU64; 4],
}

impl Cached {
    pub fn get(&self, quantile: usize) -> Option<u64> {
        (self.samples.load(Relaxed) > 0).then(|| self.values[quantile].load(Relaxed))
    }
}

/// Below this many samples of its own, a pod ranks a target by the fleet's measures, when the
/// fleet has more.
pub const MIN_OWN_SAMPLES: u64 = 10;
/// The fleet's measures count for as long as the window they were taken over.
const FLEET_MEASURES_KEPT: Ticks = SLOTS as Ticks * MINUTE;

/// One target's recent performance.
#[derive(Default)]
pub struct TargetStats {
    /// Microseconds from the start of an attempt to the first token.
    ttft: Rolling,
    /// Microseconds from the start of an attempt to its end.
    total: Rolling,
    /// Output tokens per second, times 1000.
    throughput: Rolling,
    pub ttft_cached: Cached,
    pub total_cached: Cached,
    pub throughput_cached: Cached,
    /// This pod's own time to first token, total time and throughput at the last refresh: what it
    /// tells the fleet (never the fleet's own measures).
    own: Mutex<[Measure; 3]>,
    /// The fleet's merged measures, and when they came.
    fleet: Mutex<Option<([Measure; 3], Ticks)>>,
}

impl TargetStats {
    pub fn record_first_token(&self, after: Duration, now: Ticks) {
        self.ttft.record(micros(after), now);
    }

    /// A finished answer: its total time, and its throughput when the output size is known. The
    /// throughput counts generation time only (after the first token) when that is known.
    pub fn record_done(&self, total: Duration, first_token: Option<Duration>, output_tokens: Option<u64>, now: Ticks) {
        self.total.record(micros(total), now);
        if let Some(tokens) = output_tokens.filter(|t| *t > 0) {
            let generating = total.saturating_sub(first_token.unwrap_or_default()).max(Duration::from_millis(1));
            let per_second_milli = u128::from(tokens) * 1_000_000_000_000 / generating.as_nanos().max(1);
            self.throughput.record(u64::try_from(per_second_milli).unwrap_or(u64::MAX), now);
        }
    }

    /// Recomputes the cached quantiles from the window. The three measures come
    /// from the fleet's measures instead while this pod has fewer than [`MIN_OWN_SAMPLES`] of its
    /// own and the fleet has more.
    pub fn refresh(&self, now: Ticks) {
        let percentiles: Vec<u64> = QUANTILES.iter().map(|(_, p)| *p).collect();
        let measure = |rolling: &Rolling| {
            let (samples, values) = rolling.quantiles(now, &percentiles);
            Measure { samples, values: std::array::from_fn(|i| values.get(i).copied().unwrap_or(0)) }
        };
        let own = [measure(&self.ttft), measure(&self.total), measure(&self.throughput)];
        *lock(&self.own) = own;
        let fleet = lock(&self.fleet).filter(|(_, at)| now.saturating_sub(*at) < FLEET_MEASURES_KEPT).map(|(m, _)| m);
        let used = |i: usize| match fleet {
            Some(fleet) if own[i].samples < MIN_OWN_SAMPLES && fleet[i].samples > own[i].samples => fleet[i],
            _ => own[i],
        };
        for (cached, m) in
            [(&self.ttft_cached, used(0)), (&self.total_cached, used(1)), (&self.throughput_cached, used(2))]
        {
            for (slot, v) in cached.values.iter().zip(m.values) {
                slot.store(v, Relaxed);
            }
            cached.samples.store(m.samples, Relaxed);
        }
    }

    /// This pod's own time to first token, total time and throughput, for the fleet; `None`
    /// without samples.
    pub fn own(&self) -> Option<[Measure; 3]> {
        let own = *lock(&self.own);
        own.iter().any(|m| m.samples > 0).then_some(own)
    }

    /// The fleet's merged time to first token, total time and throughput, received at `now`.
    pub fn set_fleet(&self, measures: [Measure; 3], now: Ticks) {
        *lock(&self.fleet) = Some((measures, now));
    }

    /// Median time to first token, if known.
    pub fn ttft_p50(&self) -> Option<Duration> {
        self.ttft_cached.get(0).map(Duration::from_micros)
    }

    /// Median output tokens per second times 1000, if known.
    pub fn throughput_p50(&self) -> Option<u64> {
        self.throughput_cached.get(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_close() {
        let mut last = 0;
        for v in [0u64, 1, 15, 16, 17, 20, 24, 31, 32, 100, 1000, 123_456, 10_000_000_000] {
            let b = bucket(v);
            assert!(b >= last, "{v}");
            last = b;
            let r = representative(b);
            let error = r.abs_diff(v) as f64 / v.max(1) as f64;
            assert!(error < 0.13, "{v} -> bucket {b} -> {r}");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_over_the_window() {
        let r = Rolling::default();
        for v in 1..=100u64 {
            r.record(v * 1000, 0);
        }
        let (samples, q) = r.quantiles(0, &[50, 90, 99]);
        assert_eq!(samples, 100);
        for (got, want) in q.iter().zip([50_000u64, 90_000, 99_000]) {
            assert!(got.abs_diff(want) * 10 < want, "{got} vs {want}");
        }
    }

    #[test]
    fn old_minutes_leave_the_window() {
        let r = Rolling::default();
        r.record(1000, 0);
        assert_eq!(r.quantiles(4 * MINUTE, &[50]).0, 1, "four minutes later it still counts");
        assert_eq!(r.quantiles(5 * MINUTE, &[50]).0, 0, "five minutes later it does not");
        r.record(2000, 5 * MINUTE);
        assert_eq!(r.quantiles(5 * MINUTE, &[50]).0, 1, "its slot was reused, not added to");
    }

    #[test]
    fn too_few_samples_of_its_own_and_a_pod_ranks_by_the_fleets_measures() {
        let s = TargetStats::default();
        let ttft = Measure { samples: 500, values: [80_000, 90_000, 100_000, 200_000] };
        let fleet = [ttft, Measure::default(), Measure::default()];
        s.set_fleet(fleet, 0);
        s.refresh(0);
        assert_eq!(s.ttft_p50(), Some(Duration::from_millis(80)), "no sample of its own: the fleet's");
        assert_eq!(s.own(), None, "nothing of its own to tell");
        assert_eq!(s.throughput_p50(), None, "the fleet knows nothing of it either");
        for _ in 0..MIN_OWN_SAMPLES {
            s.record_first_token(Duration::from_millis(20), 0);
        }
        s.refresh(0);
        let p50 = s.ttft_p50().expect("its own");
        assert!(p50.abs_diff(Duration::from_millis(20)) < Duration::from_millis(3), "enough of its own: {p50:?}");
        assert_eq!(s.own().map(|m| m[0].samples), Some(MIN_OWN_SAMPLES), "its own, not the fleet's, is told");
        // The fleet's measures are forgotten with the window they were taken over.
        let later = TargetStats::default();
        later.set_fleet(fleet, 0);
        later.refresh(FLEET_MEASURES_KEPT);
        assert_eq!(later.ttft_p50(), None);
    }

    #[test]
    fn throughput_counts_generation_time() {
        let s = TargetStats::default();
        s.record_done(Duration::from_secs(3), Some(Duration::from_secs(1)), Some(100), 0);
        s.refresh(0);
        let tps = s.throughput_p50().unwrap();
        assert!(tps.abs_diff(50_000) < 5_000, "100 tokens in 2 s of generation is 50/s, got {tps}");
        assert_eq!(s.ttft_p50(), None, "no first token recorded");
    }
}
