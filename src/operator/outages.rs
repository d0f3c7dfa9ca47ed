//! Fleet health: what the sidecars of a namespace see of their targets' outages, merged, so that
//! an ejection one pod makes is pushed to every other pod of the namespace on its configuration
//! stream and the outage is avoided by all within about two seconds.
//!
//! Each sidecar reports its own ejections and rate-limit cooldowns about once a second; its
//! latest report replaces its previous one. A target is out for the fleet until the latest end
//! any pod reported, never longer than [`MAX_HOLD`] from a report, however long a pod asks for: a
//! pod can make its namespace avoid a target for that long at most. Pure but for the channels:
//! time is passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::plan::HeldTarget;
use crate::api::FallbackReason;
use crate::config::{
    FLEET_HEALTH_KIND, FleetHealth, HealthPolicy, HealthReport, Measure, TargetOutage, TargetOutcomes,
    TargetPerformance,
};

/// The longest a report can keep a target out for the fleet.
pub const MAX_HOLD: Duration = Duration::from_secs(300);
/// An outage's end moving by less than this is not news for the fleet.
const SLACK: Duration = Duration::from_secs(1);

/// (route `namespace/name`, target name).
type Target = (String, String);

/// When a target's ejection and cooldown end for the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hold {
    pub ejected_until: Option<Instant>,
    pub cooling_until: Option<Instant>,
}

/// What the fleet knows of a namespace's targets: those out of use, and the merged measures of
/// their performance (time to first token, total time, throughput).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetView {
    pub holds: BTreeMap<Target, Hold>,
    pub performance: BTreeMap<Target, [Measure; 3]>,
}

pub type Held = Arc<FleetView>;

/// Merged measures are pushed at most this often: they move with every request.
const MEASURES_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Outages {
    namespaces: Mutex<HashMap<String, Namespace>>,
    /// Namespaces whose routes' status should say something new: a hold was pushed, or the
    /// latest pushed hold ran out (with when that is).
    changed: Mutex<BTreeSet<String>>,
    runs_out: Mutex<HashMap<String, Instant>>,
}

struct Namespace {
    /// Each pod's latest report, as ends (and the fleet's own ejections, under [`FLEET`]).
    by_pod: HashMap<String, BTreeMap<Target, Hold>>,
    /// Reported attempts within the window: when, which target, successes, target failures.
    attempts: VecDeque<(Instant, Target, u64, u64)>,
    /// Each pod's latest measures.
    measures_by_pod: HashMap<String, BTreeMap<Target, [Measure; 3]>>,
    measures_pushed_at: Option<Instant>,
    held: watch::Sender<Held>,
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace {
            by_pod: HashMap::new(),
            attempts: VecDeque::new(),
            measures_by_pod: HashMap::new(),
            measures_pushed_at: None,
            held: watch::channel(Held::default()).0,
        }
    }
}

impl Outages {
    /// A pod's report of its own outages (and, when it sends them, its measures) at `now`;
    /// returns whether the fleet's outages changed enough to be pushed (then they are).
    /// `policy` gives a route's (`namespace/name`) health policy: the fleet ejects a target whose
    /// pods together failed it that many times within [`OUTCOME_WINDOW`] without a success,
    /// although no single pod did.
    pub fn report(
        &self,
        namespace: &str,
        pod: &str,
        report: &HealthReport,
        policy: &dyn Fn(&str) -> Option<HealthPolicy>,
        now: Instant,
    ) -> bool {
        let (outages, measures) = (&report.targets, &report.performance);
        let cap = |ms: u64| (ms > 0).then(|| now + Duration::from_millis(ms).min(MAX_HOLD));
        let reported = outages
            .iter()
            .map(|o| {
                let hold = Hold { ejected_until: cap(o.ejected_ms), cooling_until: cap(o.cooling_ms) };
                ((o.route.clone(), o.target.clone()), hold)
            })
            .filter(|(_, h)| h.ejected_until.is_some() || h.cooling_until.is_some())
            .collect();
        let mut namespaces = lock(&self.namespaces);
        let ns = namespaces.entry(namespace.to_string()).or_default();
        ns.by_pod.insert(pod.to_string(), reported);
        ns.count(&report.outcomes, policy, now);
        if !measures.is_empty() {
            let measures = measures
                .iter()
                .map(|m| ((m.route.clone(), m.target.clone()), [m.ttft, m.total, m.throughput]))
                .collect();
            ns.measures_by_pod.insert(pod.to_string(), measures);
        }
        let news = ns.merge(now);
        if news {
            let last = ns.held.borrow().holds.values().flat_map(|h| [h.ejected_until, h.cooling_until]).flatten().max();
            lock(&self.changed).insert(namespace.to_string());
            if let Some(last) = last {
                lock(&self.runs_out).insert(namespace.to_string(), last);
            }
        }
        news
    }

    /// The namespaces whose targets' health changed since the last call: a hold pushed, or the
    /// last of a namespace's holds run out by `now`.
    pub fn take_changed(&self, now: Instant) -> BTreeSet<String> {
        let mut changed = std::mem::take(&mut *lock(&self.changed));
        lock(&self.runs_out).retain(|ns, until| {
            let over = *until <= now;
            if over {
                changed.insert(ns.clone());
            }
            !over
        });
        changed
    }

    /// What the fleet holds of the namespace's targets at `now`, in wall-clock time (`wall` is
    /// `now` on the wall clock).
    pub fn held(&self, namespace: &str, now: Instant, wall: Timestamp) -> BTreeMap<Target, HeldTarget> {
        let held = self.subscribe(namespace).borrow().clone();
        let at = |until: Option<Instant>| {
            let left = until?.checked_duration_since(now).filter(|d| !d.is_zero())?;
            wall.checked_add(SignedDuration::try_from(left).ok()?).ok()
        };
        held.holds
            .iter()
            .map(|(target, hold)| {
                (
                    target.clone(),
                    HeldTarget { ejected_until: at(hold.ejected_until), cooling_until: at(hold.cooling_until) },
                )
            })
            .filter(|(_, h)| h.ejected_until.is_some() || h.cooling_until.is_some())
            .collect()
    }

    /// A pod whose stream closed: its report no longer counts (what it reported still runs out).
    pub fn forget(&self, namespace: &str, pod: &str) {
        if let Some(ns) = lock(&self.namespaces).get_mut(namespace) {
            ns.by_pod.remove(pod);
            ns.measures_by_pod.remove(pod);
        }
    }

    /// The namespace's held targets, as they change.
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<Held> {
        lock(&self.namespaces).entry(namespace.to_string()).or_default().held.subscribe()
    }
}

/// What the fleet's pods say of a target's attempts over this long decides a fleet ejection.
pub const OUTCOME_WINDOW: Duration = Duration::from_secs(10);
/// The failure classes that say a target is down (others say the request was at fault).
const TARGET_FAILURES: [FallbackReason; 3] =
    [FallbackReason::Connect, FallbackReason::Timeout, FallbackReason::ServerError];
/// The pod name the fleet's own ejections are kept under.
const FLEET: &str = "";

impl Namespace {
    /// Adds a report's outcomes to the window, and ejects for the fleet each target that failed
    /// its route's `consecutiveFailures` times across pods within the window without a success.
    fn count(&mut self, outcomes: &[TargetOutcomes], policy: &dyn Fn(&str) -> Option<HealthPolicy>, now: Instant) {
        for o in outcomes {
            let failures = TARGET_FAILURES.iter().filter_map(|r| o.failures.get(r.as_str())).sum::<u64>();
            self.attempts.push_back((now, (o.route.clone(), o.target.clone()), o.successes, failures));
        }
        while self.attempts.front().is_some_and(|(at, ..)| now.saturating_duration_since(*at) > OUTCOME_WINDOW) {
            self.attempts.pop_front();
        }
        let mut sums: BTreeMap<&Target, (u64, u64)> = BTreeMap::new();
        for (_, target, successes, failures) in &self.attempts {
            let sum = sums.entry(target).or_default();
            *sum = (sum.0.saturating_add(*successes), sum.1.saturating_add(*failures));
        }
        let fleet = self.by_pod.entry(FLEET.to_string()).or_default();
        fleet.retain(|_, h| h.ejected_until.is_some_and(|t| t > now));
        for (target, (successes, failures)) in sums {
            let Some(policy) = policy(&target.0) else { continue };
            if successes == 0
                && failures >= u64::from(policy.consecutive_failures.max(1))
                && !fleet.contains_key(target)
            {
                let hold = Hold { ejected_until: Some(now + policy.base_ejection.min(MAX_HOLD)), cooling_until: None };
                fleet.insert(target.clone(), hold);
            }
        }
    }

    /// Merges the pods' reports: each target out until the latest end any pod reported. Pushes
    /// when a target is newly out or its end moves later by more than [`SLACK`]; ends that pass,
    /// and pods that recover, need no push (each sidecar's hold runs out on its own).
    fn merge(&mut self, now: Instant) -> bool {
        let mut merged: BTreeMap<Target, Hold> = BTreeMap::new();
        for (target, hold) in self.by_pod.values().flatten() {
            let entry = merged.entry(target.clone()).or_default();
            entry.ejected_until = entry.ejected_until.max(hold.ejected_until);
            entry.cooling_until = entry.cooling_until.max(hold.cooling_until);
        }
        merged.retain(|_, h| h.ejected_until.is_some_and(|t| t > now) || h.cooling_until.is_some_and(|t| t > now));
        let pushed = self.held.borrow().clone();
        let measures = merge_measures(self.measures_by_pod.values());
        let measures_due = measures != pushed.performance
            && self.measures_pushed_at.is_none_or(|at| now.saturating_duration_since(at) >= MEASURES_INTERVAL);
        let later = |new: Option<Instant>, old: Option<Instant>| match (new, old) {
            (Some(new), Some(old)) => new > old + SLACK,
            (Some(new), None) => new > now,
            (None, _) => false,
        };
        let news = merged.iter().any(|(target, hold)| {
            let old = pushed.holds.get(target).copied().unwrap_or_default();
            later(hold.ejected_until, old.ejected_until) || later(hold.cooling_until, old.cooling_until)
        });
        if news || measures_due {
            if measures_due {
                self.measures_pushed_at = Some(now);
            }
            let performance = if measures_due { measures } else { pushed.performance.clone() };
            self.held.send_replace(Arc::new(FleetView { holds: merged, performance }));
        }
        news
    }
}

/// The pods' measures of each target, merged: samples added, each quantile the samples-weighted
/// mean of the pods' (an estimate: quantiles do not add, but pods of one workload see alike).
fn merge_measures<'a>(
    pods: impl Iterator<Item = &'a BTreeMap<Target, [Measure; 3]>>,
) -> BTreeMap<Target, [Measure; 3]> {
    let mut sums: BTreeMap<Target, [(u64, [u128; 4]); 3]> = BTreeMap::new();
    for (target, measures) in pods.flatten() {
        let sum = sums.entry(target.clone()).or_default();
        for (total, m) in sum.iter_mut().zip(measures) {
            total.0 = total.0.saturating_add(m.samples);
            for (s, v) in total.1.iter_mut().zip(m.values) {
                // Saturating: the figures come from sidecars.
                *s = s.saturating_add(u128::from(m.samples) * u128::from(v));
            }
        }
    }
    sums.into_iter()
        .filter(|(_, sum)| sum.iter().any(|(samples, _)| *samples > 0))
        .map(|(target, sum)| {
            let measure = |(samples, weighted): (u64, [u128; 4])| Measure {
                samples,
                values: weighted.map(|w| u64::try_from(w / u128::from(samples.max(1))).unwrap_or(u64::MAX)),
            };
            (target, sum.map(measure))
        })
        .collect()
}

/// The stream frame that tells a sidecar of `held` at `now`, as one JSON line; `None` when
/// nothing is held any more.
pub fn frame(held: &Held, now: Instant) -> Option<bytes::Bytes> {
    let left = |until: Option<Instant>| {
        until.map_or(0, |t| u64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX))
    };
    let targets: Vec<TargetOutage> = held
        .holds
        .iter()
        .map(|((route, target), hold)| TargetOutage {
            route: route.clone(),
            target: target.clone(),
            ejected_ms: left(hold.ejected_until),
            cooling_ms: left(hold.cooling_until),
        })
        .filter(|o| o.ejected_ms > 0 || o.cooling_ms > 0)
        .collect();
    let performance: Vec<TargetPerformance> = held
        .performance
        .iter()
        .map(|((route, target), [ttft, total, throughput])| TargetPerformance {
            route: route.clone(),
            target: target.clone(),
            ttft: *ttft,
            total: *total,
            throughput: *throughput,
        })
        .collect();
    if targets.is_empty() && performance.is_empty() {
        return None;
    }
    let health = FleetHealth { kind: FLEET_HEALTH_KIND.into(), targets, performance };
    let mut line = serde_json::to_vec(&health).unwrap_or_default();
    line.push(b'\n');
    Some(bytes::Bytes::from(line))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(targets: &[TargetOutage], performance: &[TargetPerformance]) -> HealthReport {
        HealthReport { targets: targets.to_vec(), outcomes: Vec::new(), performance: performance.to_vec() }
    }

    fn outage(target: &str, ejected_ms: u64, cooling_ms: u64) -> TargetOutage {
        TargetOutage { route: "team-a/chat".into(), target: target.into(), ejected_ms, cooling_ms }
    }

    fn held_for(frame: &Option<bytes::Bytes>) -> Vec<(String, u64, u64)> {
        let Some(bytes) = frame else { return Vec::new() };
        let health: FleetHealth = serde_json::from_slice(bytes).expect("a frame");
        health.targets.into_iter().map(|o| (o.target, o.ejected_ms, o.cooling_ms)).collect()
    }

    #[test]
    fn one_pods_ejection_is_the_fleets_until_the_latest_reported_end() {
        let outages = Outages::default();
        let held = outages.subscribe("team-a");
        let t0 = Instant::now();
        assert!(!outages.report("team-a", "pod-a", &report(&[], &[]), &|_| None, t0), "nothing to say");
        assert!(outages.report("team-a", "pod-a", &report(&[outage("flaky", 10_000, 0)], &[]), &|_| None, t0));
        assert_eq!(held_for(&frame(&held.borrow(), t0)), [("flaky".into(), 10_000, 0)]);
        // The same ejection reported again a second later is no news.
        assert!(!outages.report(
            "team-a",
            "pod-a",
            &report(&[outage("flaky", 9_000, 0)], &[]),
            &|_| None,
            t0 + Duration::from_secs(1)
        ));
        // Another pod ejects it for longer, and cools another target: news.
        let t2 = t0 + Duration::from_secs(2);
        assert!(outages.report(
            "team-a",
            "pod-b",
            &report(&[outage("flaky", 20_000, 0), outage("busy", 0, 5_000)], &[]),
            &|_| None,
            t2
        ));
        assert_eq!(held_for(&frame(&held.borrow(), t2)), [("busy".into(), 0, 5_000), ("flaky".into(), 20_000, 0)]);
        // A new stream at t3 is told what is left.
        let t3 = t2 + Duration::from_secs(3);
        assert_eq!(held_for(&frame(&held.borrow(), t3)), [("busy".into(), 0, 2_000), ("flaky".into(), 17_000, 0)]);
        // Pods recovering push nothing; what was pushed runs out.
        assert!(!outages.report("team-a", "pod-b", &report(&[], &[]), &|_| None, t3));
        outages.forget("team-a", "pod-a");
        assert_eq!(held_for(&frame(&held.borrow(), t2 + Duration::from_secs(21))), []);
        assert!(outages.subscribe("team-b").borrow().holds.is_empty(), "namespaces are apart");
    }

    #[test]
    fn statuses_hear_of_a_hold_when_it_is_pushed_and_when_it_runs_out() {
        let outages = Outages::default();
        let t0 = Instant::now();
        let wall: Timestamp = "2026-12-06T23:00:00Z".parse().expect("a time");
        outages.report("team-a", "pod-a", &report(&[outage("flaky", 10_000, 0)], &[]), &|_| None, t0);
        assert_eq!(outages.take_changed(t0), BTreeSet::from(["team-a".to_string()]));
        assert!(outages.take_changed(t0 + Duration::from_secs(5)).is_empty(), "nothing new");
        let held = outages.held("team-a", t0 + Duration::from_secs(4), wall);
        let until = held[&("team-a/chat".to_string(), "flaky".to_string())].ejected_until;
        assert_eq!(until, Some("2026-12-06T23:00:06Z".parse().expect("a time")), "wall time of the end");
        let over = t0 + Duration::from_secs(10);
        assert_eq!(outages.take_changed(over), BTreeSet::from(["team-a".to_string()]), "ran out");
        assert!(outages.held("team-a", over, wall).is_empty());
        assert!(outages.take_changed(over).is_empty(), "once");
    }

    #[test]
    fn the_largest_measures_pods_can_send_merge_without_overflowing() {
        let most = Measure { samples: u64::MAX, values: [u64::MAX; 4] };
        let target = ("team-a/chat".to_string(), "m".to_string());
        let pods: Vec<BTreeMap<Target, [Measure; 3]>> =
            (0..3).map(|_| [(target.clone(), [most, most, most])].into()).collect();
        let merged = merge_measures(pods.iter());
        assert_eq!(merged[&target][0].samples, u64::MAX, "samples saturate");
        assert!(merged[&target][0].values.iter().all(|v| *v > 0), "{:?}", merged[&target]);
    }

    #[test]
    fn measures_are_merged_weighted_by_samples_and_pushed_at_most_every_five_seconds() {
        let outages = Outages::default();
        let held = outages.subscribe("team-a");
        let measure = |samples, p50| Measure { samples, values: [p50, p50, p50, p50] };
        let of = |ttft: Measure| TargetPerformance {
            route: "team-a/chat".into(),
            target: "m".into(),
            ttft,
            total: Measure::default(),
            throughput: Measure::default(),
        };
        let t0 = Instant::now();
        assert!(
            !outages.report("team-a", "pod-a", &report(&[], &[of(measure(30, 100_000))]), &|_| None, t0),
            "not an outage"
        );
        assert!(!outages.report("team-a", "pod-b", &report(&[], &[of(measure(10, 200_000))]), &|_| None, t0));
        let merged = |held: &Held| held.performance.get(&("team-a/chat".to_string(), "m".to_string())).copied();
        assert_eq!(merged(&held.borrow()).map(|m| m[0]), Some(measure(30, 100_000)), "pushed at once, the first");
        let t1 = t0 + Duration::from_secs(1);
        outages.report("team-a", "pod-b", &report(&[], &[of(measure(10, 200_000))]), &|_| None, t1);
        assert_eq!(merged(&held.borrow()).map(|m| m[0].samples), Some(30), "not again within five seconds");
        let t5 = t0 + Duration::from_secs(5);
        outages.report("team-a", "pod-b", &report(&[], &[of(measure(10, 200_000))]), &|_| None, t5);
        assert_eq!(merged(&held.borrow()).map(|m| m[0]), Some(measure(40, 125_000)), "weighted by samples");
        let frame: FleetHealth = serde_json::from_slice(&frame(&held.borrow(), t5).expect("a frame")).expect("JSON");
        assert_eq!((frame.targets.len(), frame.performance.len()), (0, 1));
    }

    #[test]
    fn failures_spread_over_pods_eject_a_target_no_pod_ejected() {
        let outages = Outages::default();
        let held = outages.subscribe("team-a");
        let policy = |route: &str| {
            (route == "team-a/chat").then_some(HealthPolicy {
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(60),
            })
        };
        let attempts = |successes, failures: &[(&str, u64)]| HealthReport {
            outcomes: vec![TargetOutcomes {
                route: "team-a/chat".into(),
                target: "flaky".into(),
                successes,
                failures: failures.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            }],
            ..HealthReport::default()
        };
        let t0 = Instant::now();
        // Each pod fails once: no pod reaches its threshold, the fleet does.
        assert!(!outages.report("team-a", "pod-a", &attempts(0, &[("5xx", 1)]), &policy, t0));
        assert!(!outages.report("team-a", "pod-b", &attempts(0, &[("timeout", 1), ("4xx", 5)]), &policy, t0));
        assert!(outages.report("team-a", "pod-c", &attempts(0, &[("connect", 1)]), &policy, t0), "the third");
        assert_eq!(held_for(&frame(&held.borrow(), t0)), [("flaky".into(), 10_000, 0)]);
        // A success anywhere in the window, or failures that blame the request, eject nothing.
        let other = Outages::default();
        other.report("team-a", "pod-a", &attempts(1, &[("5xx", 5)]), &policy, t0);
        assert!(!other.report("team-a", "pod-b", &attempts(0, &[("4xx", 9), ("429", 9)]), &policy, t0));
        // Failures older than the window are forgotten.
        let spread = Outages::default();
        spread.report("team-a", "pod-a", &attempts(0, &[("5xx", 2)]), &policy, t0);
        let later = t0 + OUTCOME_WINDOW + Duration::from_secs(1);
        assert!(!spread.report("team-a", "pod-b", &attempts(0, &[("5xx", 1)]), &policy, later));
    }

    #[test]
    fn no_report_holds_a_target_longer_than_the_cap() {
        let outages = Outages::default();
        let held = outages.subscribe("team-a");
        let t0 = Instant::now();
        assert!(outages.report("team-a", "pod-a", &report(&[outage("flaky", u64::MAX, u64::MAX)], &[]), &|_| None, t0));
        let cap = u64::try_from(MAX_HOLD.as_millis()).unwrap_or(0);
        assert_eq!(held_for(&frame(&held.borrow(), t0)), [("flaky".into(), cap, cap)]);
    }
}
