//! What every translation between wire formats shares: a request or answer it cannot carry over,
//! and how a translated stream ended.

/// Why a request or answer cannot be translated: the field and the reason, for a 400 (a request)
/// or a failed attempt (an answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Untranslatable {
    pub field: String,
    pub message: String,
}

pub fn untranslatable(field: impl Into<String>, message: impl Into<String>) -> Untranslatable {
    Untranslatable { field: field.into(), message: message.into() }
}

/// How a translated stream ended, besides the events written so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Still going.
    Open,
    /// The upstream's last event came: the caller's stream ends cleanly.
    Done,
    /// The upstream's error event (an Anthropic error type, such as `overloaded_error`, and a
    /// message), or an event this version cannot translate: the caller's stream ends with its
    /// kind of error event.
    Error { kind: String, message: String },
}

/// The part of a chat completion's id that names the answer, for the ids of its translations
/// (`resp_…`, `msg_…`, as each API prefixes its own): `chatcmpl-` dropped, only the characters
/// ids are made of kept, `sideyard` when nothing is left.
pub fn id_suffix(chat_id: &str) -> String {
    let id: String = chat_id
        .trim_start_matches("chatcmpl-")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    if id.is_empty() { "sideyard".into() } else { id }
}
