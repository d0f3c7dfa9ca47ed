//! Which targets a request tries, and in what order.
//!
//! The route's strategy (or the request's `provider.sort`) orders the targets; the request's
//! `provider` preferences filter and reorder them with OpenRouter's semantics; health removes the
//! ejected and cooling ones, unless every one is, when the one that recovers soonest is tried
//! anyway (panic mode). Pure: everything it reads is passed in.

use std::borrow::Cow;

use super::health::{Admission, Ticks};
use crate::api::Strategy;
use crate::config::Prices;
use crate::providers::{Prefs, Sort};

/// Targets without recent data go first on one request in this many, so the latency and
/// throughput strategies learn about them.
pub const EXPLORE_EVERY: u64 = 16;

/// What the planner knows about one target.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub provider: &'a str,
    pub weight: u32,
    pub prices: Prices,
    pub context_window: Option<u32>,
    pub admission: Admission,
    /// p50, p75, p90, p99 time to first token in microseconds, if known.
    pub ttft: Option<[u64; 4]>,
    /// p50, p75, p90, p99 output tokens per second times 1000, if known.
    pub throughput: Option<[u64; 4]>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct TargetPlan {
    /// Target indices, in the order to try them.
    pub order: Vec<usize>,
    /// Every target was unavailable; `order` holds the one that recovers soonest.
    pub panic: bool,
}

/// No target can serve the request; `by` names each constraint that removed one.
#[derive(Debug, PartialEq, Eq)]
pub struct Excluded {
    pub by: Vec<&'static str>,
}

/// The smooth weighted round-robin sequence of a route (as nginx spreads upstream weights):
/// entry `i` is the first target of the `i`-th request. Precomputed per configuration, so a pick
/// is one atomic increment.
pub fn weighted_schedule(weights: &[u32]) -> Vec<u8> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(weights) {
                *c += i64::from(*w);
            }
            let pick = (0..current.len()).fold(0, |best, i| if current[i] > current[best] { i } else { best });
            current[pick] -= total;
            pick as u8
        })
        .collect()
}

fn matches(c: &Candidate<'_>, names: &[Cow<'_, str>]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(c.name) || n.eq_ignore_ascii_case(c.provider))
}

/// Orders the targets for one request. `tick` counts requests on the route (weighted choice,
/// exploration); `need_tokens` is the estimated prompt plus the requested completion.
pub fn plan(
    strategy: Strategy,
    schedule: &[u8],
    targets: &[Candidate<'_>],
    prefs: &Prefs<'_>,
    need_tokens: u64,
    tick: u64,
) -> Result<TargetPlan, Excluded> {
    let mut keep: Vec<usize> = (0..targets.len()).collect();
    let mut by = Vec::new();
    let mut filter = |keep: &mut Vec<usize>, name: &'static str, ok: &dyn Fn(&Candidate<'_>) -> bool| {
        let before = keep.len();
        keep.retain(|&i| ok(&targets[i]));
        if keep.len() < before {
            by.push(name);
        }
    };
    if let Some(only) = &prefs.only {
        filter(&mut keep, "provider.only", &|c| matches(c, only));
    }
    filter(&mut keep, "provider.ignore", &|c| !matches(c, &prefs.ignore));
    let max = prefs.max_price;
    filter(&mut keep, "provider.max_price", &|c| {
        max.prompt.is_none_or(|m| c.prices.prompt <= m)
            && max.completion.is_none_or(|m| c.prices.completion <= m)
            && max.request.is_none_or(|m| c.prices.request <= m)
    });
    filter(&mut keep, "context_length", &|c| c.context_window.is_none_or(|w| u64::from(w) >= need_tokens));

    let strategy = match prefs.sort {
        Some(Sort::Price) => Strategy::Cost,
        Some(Sort::Throughput) => Strategy::Throughput,
        Some(Sort::Latency) => Strategy::Latency,
        None => strategy,
    };
    order_by_strategy(strategy, schedule, targets, &mut keep, tick);

    if !prefs.order.is_empty() {
        let mut ordered: Vec<usize> = Vec::with_capacity(keep.len());
        for name in &prefs.order {
            for &i in &keep {
                if !ordered.contains(&i) && matches(&targets[i], std::slice::from_ref(name)) {
                    ordered.push(i);
                }
            }
        }
        if prefs.allow_fallbacks {
            let rest: Vec<usize> = keep.iter().copied().filter(|i| !ordered.contains(i)).collect();
            ordered.extend(rest);
        } else if ordered.len() < keep.len() {
            by.push("provider.order");
        }
        keep = ordered;
    } else if !prefs.allow_fallbacks {
        keep.truncate(1);
    }

    // Preferences on performance move slow targets to the end without excluding them.
    let slow = |c: &Candidate<'_>| {
        let too_slow = prefs.max_latency.is_set()
            && c.ttft.is_some_and(|q| prefs.max_latency.0.iter().zip(q).any(|(limit, v)| limit.is_some_and(|l| v > l)));
        let too_little = prefs.min_throughput.is_set()
            && c.throughput
                .is_some_and(|q| prefs.min_throughput.0.iter().zip(q).any(|(limit, v)| limit.is_some_and(|l| v < l)));
        too_slow || too_little
    };
    let (fast, slow): (Vec<usize>, Vec<usize>) = keep.iter().partition(|&&i| !slow(&targets[i]));
    keep = fast.into_iter().chain(slow).collect();

    if keep.is_empty() {
        return Err(Excluded { by });
    }
    if keep.iter().any(|&i| targets[i].admission.is_available()) {
        keep.retain(|&i| targets[i].admission.is_available());
        return Ok(TargetPlan { order: keep, panic: false });
    }
    let until = |i: usize| match targets[i].admission {
        Admission::Ejected { until } | Admission::Cooling { until } => until,
        Admission::Open | Admission::HalfOpen => Ticks::MIN,
    };
    let soonest = keep.iter().copied().min_by_key(|&i| until(i)).unwrap_or(keep[0]);
    Ok(TargetPlan { order: vec![soonest], panic: true })
}

fn order_by_strategy(strategy: Strategy, schedule: &[u8], targets: &[Candidate<'_>], keep: &mut [usize], tick: u64) {
    let explore = tick.is_multiple_of(EXPLORE_EVERY);
    // Unknown targets sort first when exploring, else last.
    let unknown = if explore { 0 } else { 2 };
    match strategy {
        Strategy::Priority => {}
        Strategy::Weighted => {
            // The request's place in the sequence; the counter may wrap, the index may not.
            let at = usize::try_from(tick % schedule.len().max(1) as u64).unwrap_or(0);
            let first = (0..schedule.len())
                .map(|k| usize::from(schedule[(at + k) % schedule.len()]))
                .find(|i| keep.contains(i));
            keep.sort_by_key(|&i| (Some(i) != first, std::cmp::Reverse(targets[i].weight), i));
        }
        Strategy::Latency => {
            keep.sort_by_key(|&i| targets[i].ttft.map_or((unknown, 0), |q| (1, q[0])));
        }
        Strategy::Throughput => {
            keep.sort_by_key(|&i| targets[i].throughput.map_or((unknown, 0), |q| (1, u64::MAX - q[0])));
        }
        Strategy::Cost => {
            keep.sort_by_key(|&i| {
                let c = &targets[i];
                (c.prices.prompt.saturating_add(c.prices.completion), c.ttft.map_or(u64::MAX, |q| q[0]))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Cutoffs, MaxPrice};

    fn candidate(name: &'static str) -> Candidate<'static> {
        Candidate {
            name,
            provider: name,
            weight: 1,
            prices: Prices::default(),
            context_window: None,
            admission: Admission::Open,
            ttft: None,
            throughput: None,
        }
    }

    fn names(targets: &[Candidate<'_>], plan: &TargetPlan) -> Vec<&'static str> {
        plan.order
            .iter()
            .map(|&i| match targets[i].name {
                "a" => "a",
                "b" => "b",
                "c" => "c",
                "d" => "d",
                other => panic!("{other}"),
            })
            .collect()
    }

    fn order(strategy: Strategy, targets: &[Candidate<'_>], prefs: &Prefs<'_>, tick: u64) -> Vec<&'static str> {
        let schedule = weighted_schedule(&targets.iter().map(|t| t.weight).collect::<Vec<_>>());
        names(targets, &plan(strategy, &schedule, targets, prefs, 0, tick).unwrap())
    }

    fn abc() -> Vec<Candidate<'static>> {
        vec![candidate("a"), candidate("b"), candidate("c")]
    }

    #[test]
    fn priority_keeps_the_written_order() {
        assert_eq!(order(Strategy::Priority, &abc(), &Prefs::default(), 1), ["a", "b", "c"]);
    }

    #[test]
    fn latency_orders_by_median_time_to_first_token_and_explores_unknowns() {
        let mut t = abc();
        t[0].ttft = Some([900, 0, 0, 0]);
        t[1].ttft = Some([300, 0, 0, 0]);
        assert_eq!(order(Strategy::Latency, &t, &Prefs::default(), 1), ["b", "a", "c"]);
        assert_eq!(order(Strategy::Latency, &t, &Prefs::default(), EXPLORE_EVERY), ["c", "b", "a"], "exploring");
    }

    #[test]
    fn throughput_orders_by_median_tokens_per_second() {
        let mut t = abc();
        t[0].throughput = Some([40_000, 0, 0, 0]);
        t[1].throughput = Some([90_000, 0, 0, 0]);
        t[2].throughput = Some([60_000, 0, 0, 0]);
        assert_eq!(order(Strategy::Throughput, &t, &Prefs::default(), 1), ["b", "c", "a"]);
    }

    #[test]
    fn cost_orders_by_price_then_latency() {
        let mut t = abc();
        t[0].prices = Prices { prompt: 3, completion: 10, ..Prices::default() };
        t[1].prices = Prices { prompt: 2, completion: 8, ..Prices::default() };
        t[2].prices = Prices { prompt: 5, completion: 5, ..Prices::default() };
        t[1].ttft = Some([500, 0, 0, 0]);
        t[2].ttft = Some([100, 0, 0, 0]);
        assert_eq!(order(Strategy::Cost, &t, &Prefs::default(), 1), ["c", "b", "a"], "a tie on 10 goes to the faster");
    }

    #[test]
    fn healthy_targets_precede_and_unavailable_ones_are_skipped() {
        let mut t = abc();
        t[0].admission = Admission::Ejected { until: 50 };
        t[1].admission = Admission::Cooling { until: 20 };
        t[2].admission = Admission::HalfOpen;
        let p = plan(Strategy::Priority, &[], &t, &Prefs::default(), 0, 1).unwrap();
        assert_eq!(p, TargetPlan { order: vec![2], panic: false });
    }

    #[test]
    fn panic_mode_tries_the_target_that_recovers_soonest() {
        let mut t = abc();
        t[0].admission = Admission::Ejected { until: 50 };
        t[1].admission = Admission::Cooling { until: 20 };
        t[2].admission = Admission::Ejected { until: 30 };
        let p = plan(Strategy::Priority, &[], &t, &Prefs::default(), 0, 1).unwrap();
        assert_eq!(p, TargetPlan { order: vec![1], panic: true });
    }

    #[test]
    fn weighted_choice_follows_the_weights() {
        let mut t = abc();
        t[0].weight = 5;
        t[1].weight = 3;
        t[2].weight = 2;
        let schedule = weighted_schedule(&[5, 3, 2]);
        assert_eq!(schedule.len(), 10);
        let mut firsts = [0u32; 3];
        for tick in 0..10_000 {
            let p = plan(Strategy::Weighted, &schedule, &t, &Prefs::default(), 0, tick).unwrap();
            firsts[p.order[0]] += 1;
            let rest: Vec<usize> = p.order[1..].to_vec();
            let mut by_weight = rest.clone();
            by_weight.sort_by_key(|&i| std::cmp::Reverse(t[i].weight));
            assert_eq!(rest, by_weight, "fallbacks follow in weight order");
        }
        for (got, weight) in firsts.iter().zip([5u32, 3, 2]) {
            let expected = 10_000 * weight / 10;
            assert!(got.abs_diff(expected) <= 100, "{firsts:?}");
        }
        // Smooth: the heaviest target never takes more than two first places in a row here.
        assert!(!schedule.windows(3).any(|w| w == [0, 0, 0]), "{schedule:?}");
    }

    #[test]
    fn only_ignore_and_order_match_names_or_provider_labels() {
        let mut t = abc();
        t[1].provider = "OpenAI";
        let prefs = Prefs { only: Some(vec!["openai".into(), "c".into()]), ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["b", "c"]);
        let prefs = Prefs { ignore: vec!["OPENAI".into()], ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["a", "c"]);
        let prefs = Prefs { order: vec!["c".into(), "openai".into()], ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["c", "b", "a"]);
        let prefs = Prefs { order: vec!["c".into(), "openai".into()], allow_fallbacks: false, ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["c", "b"]);
        let prefs = Prefs { allow_fallbacks: false, ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["a"]);
    }

    #[test]
    fn sort_overrides_the_strategy() {
        let mut t = abc();
        t[2].prices = Prices { prompt: 0, completion: 0, ..Prices::default() };
        t[0].prices = Prices { prompt: 9, completion: 9, ..Prices::default() };
        t[1].prices = Prices { prompt: 1, completion: 1, ..Prices::default() };
        let prefs = Prefs { sort: Some(Sort::Price), ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["c", "b", "a"]);
    }

    #[test]
    fn max_price_and_context_exclude_and_say_why() {
        let mut t = abc();
        t[0].prices = Prices { prompt: 5_000_000, completion: 1, ..Prices::default() };
        t[1].context_window = Some(1000);
        let prefs =
            Prefs { max_price: MaxPrice { prompt: Some(1_000_000), ..MaxPrice::default() }, ..Prefs::default() };
        let p = plan(Strategy::Priority, &[], &t, &prefs, 4000, 1).unwrap();
        assert_eq!(p.order, vec![2]);
        let prefs = Prefs { only: Some(vec!["a".into(), "b".into()]), ..prefs };
        assert_eq!(
            plan(Strategy::Priority, &[], &t, &prefs, 4000, 1),
            Err(Excluded { by: vec!["provider.only", "provider.max_price", "context_length"] })
        );
        let none = Prefs { only: Some(vec!["nobody".into()]), ..Prefs::default() };
        assert_eq!(plan(Strategy::Priority, &[], &t, &none, 0, 1), Err(Excluded { by: vec!["provider.only"] }));
    }

    #[test]
    fn preferred_performance_moves_slow_targets_last_without_excluding_them() {
        let mut t = abc();
        t[0].ttft = Some([2_000_000, 3_000_000, 4_000_000, 9_000_000]);
        t[1].ttft = Some([500_000, 600_000, 700_000, 5_000_000]);
        t[2].throughput = Some([10_000, 9_000, 8_000, 1_000]);
        let prefs = Prefs { max_latency: Cutoffs([Some(1_000_000), None, None, None]), ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["b", "c", "a"], "a's p50 is over 1 s; c is unknown");
        let prefs = Prefs { max_latency: Cutoffs([None, None, None, Some(4_000_000)]), ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["c", "a", "b"], "p99 cutoff");
        let prefs = Prefs { min_throughput: Cutoffs([Some(20_000), None, None, None]), ..Prefs::default() };
        assert_eq!(order(Strategy::Priority, &t, &prefs, 1), ["a", "b", "c"], "c makes 10 tokens/s");
    }
}
