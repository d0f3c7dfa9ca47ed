//! What an answer costs, in integer micro-units.

use crate::config::Prices;
use crate::providers::Usage;

const PER: u128 = 1_000_000;

/// `uncached prompt x prompt price + cache reads x cached price + cache writes x cache write price +
/// completion x completion price` (prices are per million tokens) rounded up to a whole
/// micro-unit, plus the request price. Rounding up once per answer keeps every charge exact or
/// slightly over, never under. Reads and writes are parts of `prompt`; counts from outside that
/// say otherwise are cut to fit, reads first.
pub fn cost(usage: &Usage, prices: &Prices) -> u64 {
    let cached = usage.cached_prompt.min(usage.prompt);
    let written = usage.cache_write.min(usage.prompt - cached);
    // Each product fits in a u128; their sum saturates, as token counts come from outside.
    let tokens = (u128::from(usage.prompt - cached - written) * u128::from(prices.prompt))
        .saturating_add(u128::from(cached) * u128::from(prices.cached_prompt))
        .saturating_add(u128::from(written) * u128::from(prices.cache_write))
        .saturating_add(u128::from(usage.completion) * u128::from(prices.completion));
    let micros = u64::try_from(tokens.div_ceil(PER)).unwrap_or(u64::MAX);
    micros.saturating_add(prices.request)
}

/// The most an answer can cost with at most these prompt and completion tokens, whether or not
/// the provider's cache serves part of the prompt.
#[inline]
pub fn worst_case(prompt_tokens: u64, completion_tokens: u64, prices: &Prices) -> u64 {
    let prices = Prices { prompt: prices.prompt.max(prices.cached_prompt).max(prices.cache_write), ..*prices };
    cost(&Usage { prompt: prompt_tokens, completion: completion_tokens, ..Usage::default() }, &prices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(prompt: u64, completion: u64, cached: u64, request: u64) -> Prices {
        Prices { prompt, completion, cached_prompt: cached, cache_write: prompt, request }
    }

    #[test]
    fn prices_are_per_million_tokens_and_round_up() {
        // gpt-4o: 2.50 / 1.25 cached / 10.00 per 1M tokens.
        let p = prices(2_500_000, 10_000_000, 1_250_000, 0);
        let usage = Usage { prompt: 1000, completion: 500, cached_prompt: 400, ..Usage::default() };
        // 600 x 2.5 + 400 x 1.25 + 500 x 10 = 1500 + 500 + 5000 = 7000 micro-units.
        assert_eq!(cost(&usage, &p), 7000);
        assert_eq!(cost(&Usage { prompt: 1, ..Usage::default() }, &p), 3, "2.5 rounds up to 3");
        assert_eq!(cost(&Usage::default(), &prices(1, 1, 1, 250)), 250, "the request price alone");
    }

    #[test]
    fn cache_writes_have_their_own_price() {
        // Claude Sonnet: 3.00 input, 0.30 cache read, 3.75 cache write, 15.00 output per 1M.
        let p = Prices { cache_write: 3_750_000, ..prices(3_000_000, 15_000_000, 300_000, 0) };
        let usage = Usage { prompt: 3000, completion: 100, cached_prompt: 1000, cache_write: 1000 };
        // 1000 x 3 + 1000 x 0.3 + 1000 x 3.75 + 100 x 15 = 3000 + 300 + 3750 + 1500.
        assert_eq!(cost(&usage, &p), 8550);
        // Counts that do not add up are cut to the prompt: reads first, then writes.
        let bent = Usage { prompt: 1500, completion: 0, cached_prompt: 1000, cache_write: 1000 };
        assert_eq!(cost(&bent, &p), 300 + 1875);
    }

    #[test]
    fn the_worst_case_bounds_every_cache_split() {
        let p = Prices { cache_write: 4_000_000, ..prices(1_000_000, 2_000_000, 3_000_000, 7) };
        let worst = worst_case(100, 50, &p);
        for (cached, written) in [(0, 0), (50, 0), (100, 0), (0, 100), (30, 70)] {
            let usage = Usage { prompt: 100, completion: 50, cached_prompt: cached, cache_write: written };
            assert!(cost(&usage, &p) <= worst);
        }
        assert_eq!(worst, 400 + 100 + 7);
    }
}
