//! The OpenTelemetry GenAI client metrics, in Prometheus form, for every target served: tokens by
//! type, the operation's duration, and for streams the time to the first chunk and the time per
//! output token after it. Names, units and buckets follow the semantic conventions
//! (`gen_ai.client.token.usage` becomes `gen_ai_client_token_usage`, and so on); each series is
//! labelled with the conventions' attributes and with Sideyard's `route` and `target`.
//!
//! Always on: recording is a few relaxed atomic adds per answer, on the target's own histograms.

use std::time::Duration;

use crate::metrics::{Histogram, Scale};

/// `gen_ai.client.token.usage`'s buckets.
#[derive(Debug)]
pub struct Tokens;

impl Scale for Tokens {
    const BOUNDS: &'static [u64] =
        &[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864];
    const PER_UNIT: f64 = 1.0;
}

/// `gen_ai.client.operation.duration`'s buckets, in microseconds.
#[derive(Debug)]
pub struct OperationSeconds;

impl Scale for OperationSeconds {
    const BOUNDS: &'static [u64] = &[
        10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000, 1_280_000, 2_560_000, 5_120_000, 10_240_000,
        20_480_000, 40_960_000, 81_920_000,
    ];
    const PER_UNIT: f64 = 1e6;
}

/// Time to the first chunk's buckets (the conventions' time to first token), in microseconds.
#[derive(Debug)]
pub struct FirstChunkSeconds;

impl Scale for FirstChunkSeconds {
    const BOUNDS: &'static [u64] = &[
        1_000, 5_000, 10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 250_000, 500_000, 750_000, 1_000_000, 2_500_000,
        5_000_000, 7_500_000, 10_000_000,
    ];
    const PER_UNIT: f64 = 1e6;
}

/// Time per output token's buckets, in microseconds.
#[derive(Debug)]
pub struct PerTokenSeconds;

impl Scale for PerTokenSeconds {
    const BOUNDS: &'static [u64] = &[
        10_000, 25_000, 50_000, 75_000, 100_000, 150_000, 200_000, 300_000, 400_000, 500_000, 750_000, 1_000_000,
        2_500_000,
    ];
    const PER_UNIT: f64 = 1e6;
}

/// One target's GenAI histograms.
#[derive(Debug, Default)]
pub struct GenAiMetrics {
    pub(super) input_tokens: Histogram<Tokens>,
    pub(super) output_tokens: Histogram<Tokens>,
    pub(super) duration: Histogram<OperationSeconds>,
    pub(super) first_chunk: Histogram<FirstChunkSeconds>,
    pub(super) per_output_token: Histogram<PerTokenSeconds>,
}

impl GenAiMetrics {
    /// An answer that took `duration` from the request's arrival, with its input tokens (when
    /// known) and output tokens, reported or estimated. A stream also says when its first chunk
    /// came.
    pub fn answered(&self, input: Option<u64>, output: u64, duration: Duration, first_chunk: Option<Duration>) {
        if let Some(input) = input {
            self.input_tokens.observe_value(input);
        }
        self.output_tokens.observe_value(output);
        self.duration.observe(duration);
        if let Some(first) = first_chunk {
            self.first_chunk.observe(first);
            // The time between tokens after the first, as the conventions define it.
            if output > 1 {
                let after = duration.saturating_sub(first) / u32::try_from(output - 1).unwrap_or(u32::MAX);
                self.per_output_token.observe(after);
            }
        }
    }
}
