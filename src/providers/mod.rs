//! Wire protocols of upstream providers, one module per format, and what they have in common: the
//! request preferences, usage and server-sent event framing that every format maps to.

pub mod anthropic;
#[cfg(test)]
pub mod arbitrary;
pub mod openai;
mod prefs;
pub mod sse;
mod usage;

pub use prefs::{Cutoffs, MaxPrice, Prefs, Sort};
pub use usage::{BYTES_PER_TOKEN, Usage};
