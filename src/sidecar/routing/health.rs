//! Passive health of one target: consecutive failures eject it for a while, doubling on each repeat;
//! when an ejection ends one probe request is let through (half-open), which closes or re-ejects it.
//! Rate-limit answers with a retry hint cool it down instead, without counting as failures.
//!
//! Every field is an atomic so that the request path never takes a lock; races between concurrent
//! outcomes resolve to one of the orders they could have happened in. Time is passed in as
//! [`Ticks`], so tests drive the state machine without sleeping.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

use crate::config::HealthPolicy;

/// Nanoseconds since the process's first call to [`now`]; never 0, so 0 can mean "not set".
pub type Ticks = u64;

pub fn now() -> Ticks {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
}

pub fn ticks(d: Duration) -> Ticks {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a request may do with a target now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Healthy: go ahead.
    Open,
    /// The ejection is over and no probe is in flight: the first to claim it probes.
    HalfOpen,
    /// Ejected (or probing) until then; skip it.
    Ejected { until: Ticks },
    /// Cooling down after a rate limit until then; skip it.
    Cooling { until: Ticks },
}

impl Admission {
    pub fn is_available(self) -> bool {
        matches!(self, Admission::Open | Admission::HalfOpen)
    }

    /// The name of the health state, as in metrics and `GET /v1/models`.
    pub fn name(self) -> &'static str {
        match self {
            Admission::Open => "healthy",
            Admission::HalfOpen => "half-open",
            Admission::Ejected { .. } => "ejected",
            Admission::Cooling { .. } => "cooling",
        }
    }
}

/// How an attempt ended, for health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The target answered (a success, or an error about the request rather than the target).
    Success,
    /// A connect error, a timeout, a 5xx, or a 429 without a retry hint.
    Failure,
    /// The attempt was abandoned (the caller left, or another hedged attempt won): says nothing.
    Cancelled,
}

/// What an outcome changed, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Ejected { duration: Duration },
    Recovered,
}

#[derive(Debug, Default)]
pub struct HealthTracker {
    consecutive_failures: AtomicU32,
    /// When the current ejection ends; 0 when not ejected. Stays set through the half-open probe.
    ejected_until: AtomicU64,
    /// Ejections in the current streak, for the doubling.
    ejections: AtomicU32,
    /// When the last ejection streak ended, to forget old streaks.
    recovered_at: AtomicU64,
    probing: AtomicBool,
    cooling_until: AtomicU64,
    /// Ejected by the fleet (another pod ejected it) until then; 0 when not. Only adds to this
    /// pod's own health: its own success ends it.
    fleet_until: AtomicU64,
}

impl HealthTracker {
    /// Whether a request may use the target now. Does not claim the probe: see [`HealthTracker::acquire`].
    #[inline]
    pub fn admission(&self, now: Ticks) -> Admission {
        let cooling = self.cooling_until.load(Relaxed);
        if cooling > now {
            return Admission::Cooling { until: cooling };
        }
        let until = self.ejected_until.load(Acquire);
        if until == 0 {
            match self.fleet_until.load(Relaxed) {
                fleet if fleet > now => Admission::Ejected { until: fleet },
                _ => Admission::Open,
            }
        } else if until > now || self.probing.load(Acquire) {
            Admission::Ejected { until }
        } else {
            Admission::HalfOpen
        }
    }

    /// Claims the right to send a request: `Some(probe)` if allowed, where `probe` says this request
    /// is the half-open probe whose outcome decides the ejection.
    pub fn acquire(&self, now: Ticks) -> Option<bool> {
        match self.admission(now) {
            Admission::Open => Some(false),
            Admission::HalfOpen => self.probing.compare_exchange(false, true, AcqRel, Relaxed).is_ok().then_some(true),
            Admission::Ejected { .. } | Admission::Cooling { .. } => None,
        }
    }

    /// In panic mode a target is used although it is unavailable; its outcome counts like a probe's.
    pub fn force_probe(&self) {
        self.probing.store(true, Release);
    }

    /// Records how an attempt ended.
    pub fn record(
        &self,
        outcome: AttemptOutcome,
        probe: bool,
        policy: &HealthPolicy,
        now: Ticks,
    ) -> Option<Transition> {
        match outcome {
            AttemptOutcome::Cancelled => {
                if probe {
                    self.probing.store(false, Release);
                }
                None
            }
            AttemptOutcome::Success => {
                self.consecutive_failures.store(0, Relaxed);
                self.fleet_until.store(0, Relaxed);
                if probe || self.ejected_until.load(Acquire) != 0 {
                    self.ejected_until.store(0, Release);
                    self.recovered_at.store(now, Relaxed);
                    self.probing.store(false, Release);
                    return Some(Transition::Recovered);
                }
                None
            }
            AttemptOutcome::Failure => {
                if probe {
                    let duration = self.eject(policy, now);
                    self.probing.store(false, Release);
                    return Some(Transition::Ejected { duration });
                }
                let failures = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
                if failures < policy.consecutive_failures {
                    return None;
                }
                // Only the failure that takes the state from healthy to ejected ejects.
                let duration = self.ejection_duration(policy, now);
                let until = now.saturating_add(ticks(duration));
                if self.ejected_until.compare_exchange(0, until, AcqRel, Relaxed).is_err() {
                    return None;
                }
                self.consecutive_failures.store(0, Relaxed);
                self.ejections.fetch_add(1, Relaxed);
                Some(Transition::Ejected { duration })
            }
        }
    }

    /// Ejects again after a failed probe, for the next doubled duration.
    fn eject(&self, policy: &HealthPolicy, now: Ticks) -> Duration {
        let duration = self.ejection_duration(policy, now);
        self.ejected_until.store(now.saturating_add(ticks(duration)), Release);
        self.ejections.fetch_add(1, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        duration
    }

    /// `baseEjection`, doubled for each earlier ejection of the streak, at most `maxEjection`. A
    /// streak is forgotten once the target has been healthy for `maxEjection`.
    fn ejection_duration(&self, policy: &HealthPolicy, now: Ticks) -> Duration {
        let recovered = self.recovered_at.load(Relaxed);
        if self.ejected_until.load(Relaxed) == 0
            && recovered != 0
            && now.saturating_sub(recovered) >= ticks(policy.max_ejection)
        {
            self.ejections.store(0, Relaxed);
        }
        let repeats = self.ejections.load(Relaxed).min(32);
        policy.base_ejection.saturating_mul(1u32 << repeats.min(31)).min(policy.max_ejection)
    }

    /// Ejects the target for `duration` at once, without counting failures (a provider refusing
    /// the target's own credentials will not change its mind soon). Only the call that ejects a
    /// healthy target reports the ejection, so concurrent refusals log it once.
    pub fn eject_for(&self, duration: Duration, probe: bool, now: Ticks) -> Option<Transition> {
        let until = now.saturating_add(ticks(duration));
        let current = self.ejected_until.load(Acquire);
        if probe {
            self.ejected_until.store(until, Release);
            self.probing.store(false, Release);
        } else if current > now || self.ejected_until.compare_exchange(current, until, AcqRel, Relaxed).is_err() {
            return None;
        }
        self.ejections.fetch_add(1, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        Some(Transition::Ejected { duration })
    }

    /// How much longer this pod itself keeps the target ejected, if it does: what it tells the
    /// fleet (never what the fleet told it, which would keep an ejection alive on its own echo).
    pub fn own_ejection(&self, now: Ticks) -> Option<Duration> {
        left(self.ejected_until.load(Acquire), now)
    }

    /// Skips the target until `until` because another pod ejected it, unless this pod's own
    /// success ends that first. Whether the fleet did not hold it at `now` already: a new hold,
    /// not the same one told again (every frame repeats every hold while it lasts).
    pub fn fleet_eject(&self, until: Ticks, now: Ticks) -> bool {
        self.fleet_until.fetch_max(until, Relaxed) <= now && until > now
    }

    /// How much longer the target cools down after a rate limit, if it does.
    pub fn cooling_for(&self, now: Ticks) -> Option<Duration> {
        left(self.cooling_until.load(Relaxed), now)
    }

    /// Skips the target until `until` without counting a failure (a rate limit with a retry hint).
    pub fn cool_down(&self, until: Ticks) {
        self.cooling_until.fetch_max(until, Relaxed);
    }
}

/// The time from `now` to `until`, if `until` is later.
fn left(until: Ticks, now: Ticks) -> Option<Duration> {
    (until > now).then(|| Duration::from_nanos(until - now))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Ticks = 1_000_000_000;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
        }
    }

    fn fail(h: &HealthTracker, now: Ticks) -> Option<Transition> {
        let probe = h.acquire(now).expect("the target should be available");
        h.record(AttemptOutcome::Failure, probe, &policy(), now)
    }

    #[test]
    fn ejects_after_consecutive_failures_and_lets_one_probe_through() {
        let h = HealthTracker::default();
        assert_eq!(fail(&h, S), None);
        assert_eq!(fail(&h, S), None);
        assert_eq!(fail(&h, S), Some(Transition::Ejected { duration: Duration::from_secs(10) }));
        assert_eq!(h.admission(2 * S), Admission::Ejected { until: 11 * S });
        assert_eq!(h.acquire(10 * S), None, "still ejected");

        assert_eq!(h.admission(11 * S), Admission::HalfOpen);
        assert_eq!(h.acquire(11 * S), Some(true), "the first request probes");
        assert_eq!(h.acquire(11 * S), None, "only one probe at a time");
        assert_eq!(h.record(AttemptOutcome::Success, true, &policy(), 12 * S), Some(Transition::Recovered));
        assert_eq!(h.acquire(12 * S), Some(false));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let h = HealthTracker::default();
        fail(&h, S);
        fail(&h, S);
        assert_eq!(h.record(AttemptOutcome::Success, false, &policy(), S), None);
        assert_eq!(fail(&h, S), None);
        assert_eq!(fail(&h, S), None);
        assert_eq!(h.admission(S), Admission::Open);
    }

    #[test]
    fn failed_probes_double_the_ejection_up_to_the_maximum() {
        let h = HealthTracker::default();
        for _ in 0..3 {
            fail(&h, 0);
        }
        let mut now = 10 * S;
        for expected in [20, 40, 60, 60] {
            assert_eq!(fail(&h, now), Some(Transition::Ejected { duration: Duration::from_secs(expected) }));
            now += expected * S;
        }
    }

    #[test]
    fn a_long_healthy_spell_forgets_the_streak() {
        let h = HealthTracker::default();
        for _ in 0..3 {
            fail(&h, 0);
        }
        assert_eq!(fail(&h, 10 * S), Some(Transition::Ejected { duration: Duration::from_secs(20) }));
        h.acquire(30 * S);
        h.record(AttemptOutcome::Success, true, &policy(), 30 * S);
        // Shortly after recovering, a new ejection continues the streak...
        let h2 = HealthTracker::default();
        for _ in 0..3 {
            fail(&h2, 0);
        }
        h2.acquire(10 * S);
        h2.record(AttemptOutcome::Success, true, &policy(), 10 * S);
        for _ in 0..2 {
            fail(&h2, 20 * S);
        }
        assert_eq!(fail(&h2, 20 * S), Some(Transition::Ejected { duration: Duration::from_secs(20) }));
        // ...but after maxEjection of health it starts over at baseEjection.
        for _ in 0..2 {
            fail(&h, 100 * S);
        }
        assert_eq!(fail(&h, 100 * S), Some(Transition::Ejected { duration: Duration::from_secs(10) }));
    }

    #[test]
    fn a_cancelled_probe_frees_the_probe_slot() {
        let h = HealthTracker::default();
        for _ in 0..3 {
            fail(&h, 0);
        }
        assert_eq!(h.acquire(10 * S), Some(true));
        assert_eq!(h.record(AttemptOutcome::Cancelled, true, &policy(), 10 * S), None);
        assert_eq!(h.acquire(10 * S), Some(true), "another request may probe");
    }

    #[test]
    fn a_fleet_ejection_only_adds_and_the_pods_own_success_ends_it() {
        let h = HealthTracker::default();
        h.fleet_eject(20 * S, S);
        assert_eq!(h.admission(S), Admission::Ejected { until: 20 * S });
        assert_eq!(h.own_ejection(S), None, "what the fleet said is not reported back as this pod's");
        assert_eq!(h.acquire(S), None);
        assert_eq!(h.admission(20 * S), Admission::Open, "over when the fleet's time is");
        h.fleet_eject(30 * S, 20 * S);
        // A success of this pod's (a request already in flight, or panic routing) ends it.
        assert_eq!(h.record(AttemptOutcome::Success, false, &policy(), 21 * S), None);
        assert_eq!(h.admission(21 * S), Admission::Open);
        // Its own ejection is reported, and wins over a shorter fleet one.
        for _ in 0..3 {
            fail(&h, 22 * S);
        }
        h.fleet_eject(25 * S, 22 * S);
        assert_eq!(h.own_ejection(22 * S), Some(Duration::from_secs(10)));
        assert_eq!(h.admission(26 * S), Admission::Ejected { until: 32 * S });
    }

    #[test]
    fn a_fleet_hold_told_again_is_not_a_new_one() {
        let h = HealthTracker::default();
        assert!(h.fleet_eject(20 * S, S), "a new hold");
        // Every frame repeats every hold; its end, measured again, moves by a few milliseconds.
        assert!(!h.fleet_eject(20 * S, 2 * S));
        assert!(!h.fleet_eject(20 * S + 1, 3 * S));
        assert!(!h.fleet_eject(15 * S, 3 * S), "an earlier end neither shortens nor renews it");
        assert_eq!(h.admission(3 * S), Admission::Ejected { until: 20 * S + 1 });
        assert!(h.fleet_eject(40 * S, 30 * S), "a hold after the last one ended is new");
        assert!(!h.fleet_eject(25 * S, 30 * S), "one already over at its arrival is no hold");
    }

    #[test]
    fn cooling_down_skips_without_counting_a_failure() {
        let h = HealthTracker::default();
        h.cool_down(5 * S);
        assert_eq!(h.admission(S), Admission::Cooling { until: 5 * S });
        assert_eq!(h.acquire(S), None);
        assert_eq!(h.admission(5 * S), Admission::Open);
        h.cool_down(3 * S);
        assert_eq!(h.admission(4 * S), Admission::Cooling { until: 5 * S }, "a shorter hint does not shorten it");
    }
}
