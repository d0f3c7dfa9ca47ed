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

    /// Two reports of one answer's usage as one: Anthropic's stream reports the prompt at its
    /// start and the completion at its end, each count growing, so the larger of each is the last.
    pub fn merge(self, later: Usage) -> Usage {
        Usage {
            prompt: self.prompt.max(later.prompt),
            completion: self.completion.max(later.completion),
            cached_prompt: self.cached_prompt.max(later.cached_prompt),
            cache_write: self.cache_write.max(later.cache_write),
        }
    }
}

/// Bytes per token, for estimates where no tokenizer's count is at hand: a prompt's share of a
/// context window, and the tokens of an answer whose provider reported no usage.
pub const BYTES_PER_TOKEN: u64 = 4;
