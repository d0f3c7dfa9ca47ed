//! OpenRouter's request preferences: which providers a request may use, in what order, and what
//! it will pay, as read from the request's `provider` object.

use std::borrow::Cow;

/// The request's `provider` object.
#[derive(Clone, Debug, PartialEq)]
pub struct Prefs<'a> {
    /// Providers to try first, in this order.
    pub order: Vec<Cow<'a, str>>,
    /// Only these providers, if set.
    pub only: Option<Vec<Cow<'a, str>>>,
    pub ignore: Vec<Cow<'a, str>>,
    /// False: no target beyond those in `order` (or beyond the first, without `order`).
    pub allow_fallbacks: bool,
    pub sort: Option<Sort>,
    pub max_price: MaxPrice,
    /// Targets slower than any of these (time to first token, microseconds) go last.
    pub max_latency: Cutoffs,
    /// Targets slower than any of these (output tokens per second times 1000) go last.
    pub min_throughput: Cutoffs,
}

impl Default for Prefs<'_> {
    fn default() -> Self {
        Prefs {
            order: Vec::new(),
            only: None,
            ignore: Vec::new(),
            allow_fallbacks: true,
            sort: None,
            max_price: MaxPrice::default(),
            max_latency: Cutoffs::default(),
            min_throughput: Cutoffs::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Price,
    Throughput,
    Latency,
}

/// Highest acceptable prices, in micro-units per million tokens (`request`: per call).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaxPrice {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub request: Option<u64>,
}

/// Per-percentile limits: p50, p75, p90, p99.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cutoffs(pub [Option<u64>; 4]);

impl Cutoffs {
    pub fn is_set(&self) -> bool {
        self.0.iter().any(Option::is_some)
    }
}
