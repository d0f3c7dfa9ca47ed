//! Wire protocols of upstream providers, one module per format, and what they have in common: the
//! request preferences, usage and server-sent event framing that every format maps to.

pub mod anthropic;
#[cfg(test)]
pub mod arbitrary;
pub mod facts;
pub mod multipart;
pub mod openai;
mod prefs;
pub mod responses;
pub mod sse;
mod translation;
mod usage;

pub use prefs::{Cutoffs, MaxPrice, Prefs, Sort};
pub use translation::{StreamEnd, Untranslatable, id_suffix, untranslatable};
pub use usage::{BYTES_PER_TOKEN, Usage};

/// `body` with the bytes at `span` replaced by `text`.
pub fn splice(body: &[u8], span: std::ops::Range<usize>, text: &[u8]) -> bytes::Bytes {
    let (Some(before), Some(after)) = (body.get(..span.start), body.get(span.end..)) else {
        return bytes::Bytes::copy_from_slice(body);
    };
    let mut out = Vec::with_capacity(before.len() + text.len() + after.len());
    out.extend_from_slice(before);
    out.extend_from_slice(text);
    out.extend_from_slice(after);
    bytes::Bytes::from(out)
}
