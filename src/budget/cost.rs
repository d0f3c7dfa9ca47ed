//! What an answer costs, in integer micro-units.

use crate::config::Prices;
use crate::providers::Usage;

const PER: u128 = 1_000_000;

/// `prompt x prompt price + cached x cached price + completion x completion price` (prices are per
/// million tokens) rounded up to a whole micro-unit, plus the request price. Rounding up once per
/// answer keeps every charge exact or slightly over, never under.
pub fn cost(usage: &Usage, prices: &Prices) -> u64 {
    let cached = usage.cached_prompt.min(usage.prompt);
    // Each product fits in a u128; their sum saturates, as token counts come from outside.
    let tokens = (u128::from(usage.prompt - cached) * u128::from(prices.prompt))
        .saturating_add(u128::from(cached) * u128::from(prices.cached_prompt))
        .saturating_add(u128::from(usage.completion) * u128::from(prices.completion));
    let micros = u64::try_from(tokens.div_ceil(PER)).unwrap_or(u64::MAX);
    micros.saturating_add(prices.request)
}

/// The most an answer can cost with at most these prompt and completion tokens, whether or not
/// the provider's cache serves part of the prompt.
#[inline]
pub fn worst_case(prompt_tokens: u64, completion_tokens: u64, prices: &Prices) -> u64 {
    let prices = Prices { prompt: prices.prompt.max(prices.cached_prompt), ..*prices };
    cost(&Usage { prompt: prompt_tokens, completion: completion_tokens, cached_prompt: 0 }, &prices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(prompt: u64, completion: u64, cached: u64, request: u64) -> Prices {
        Prices { prompt, completion, cached_prompt: cached, request }
    }

    #[test]
    fn prices_are_per_million_tokens_and_round_up() {
        // gpt-4o: 2.50 / 1.25 cached / 10.00 per 1M tokens.
        let p = prices(2_500_000, 10_000_000, 1_250_000, 0);
        let usage = Usage { prompt: 1000, completion: 500, cached_prompt: 400 };
        // 600 x 2.5 + 400 x 1.25 + 500 x 10 = 1500 + 500 + 5000 = 7000 micro-units.
        assert_eq!(cost(&usage, &p), 7000);
        assert_eq!(cost(&Usage { prompt: 1, completion: 0, cached_prompt: 0 }, &p), 3, "2.5 rounds up to 3");
        assert_eq!(cost(&Usage::default(), &prices(1, 1, 1, 250)), 250, "the request price alone");
    }

    #[test]
    fn the_worst_case_bounds_every_cache_split() {
        let p = prices(1_000_000, 2_000_000, 3_000_000, 7);
        let worst = worst_case(100, 50, &p);
        for cached in [0, 50, 100] {
            assert!(cost(&Usage { prompt: 100, completion: 50, cached_prompt: cached }, &p) <= worst);
        }
        assert_eq!(worst, 300 + 100 + 7);
    }
}
