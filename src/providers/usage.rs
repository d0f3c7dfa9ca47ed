//! Usage: the tokens an answer used, whatever wire format reported them.

/// Tokens of one answer, as the provider's `usage` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    /// Prompt tokens served from the provider's cache (part of `prompt`).
    pub cached_prompt: u64,
    /// Prompt tokens written to the provider's cache (part of `prompt`), which Anthropic charges
    /// apart.
    pub cache_write: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Bytes per token, for estimates where no tokenizer's count is at hand: a prompt's share of a
/// context window, and the tokens of an answer whose provider reported no usage.
pub const BYTES_PER_TOKEN: u64 = 4;
