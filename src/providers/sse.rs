//! Server-sent events framing, for every streaming wire format: where events end, and their `data:`
//! payloads. An event ends with a blank line: `\n\n`, or `\n\r\n` when lines end in CRLF.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Past this size an unterminated event is passed on anyway: an upstream that never ends its
/// events must not make the reader buffer without bound.
pub const MAX_PENDING: usize = 1 << 20;

/// Splits a byte stream at event boundaries.
#[derive(Debug, Default)]
pub struct Framer {
    pending: BytesMut,
}

impl Framer {
    /// Takes the next chunk; returns the bytes that end on an event boundary, if any. Whole events
    /// pass without a copy; only an incomplete one at the end is kept until its end arrives.
    pub fn push(&mut self, data: Bytes) -> Option<Bytes> {
        if self.pending.is_empty() {
            return match last_boundary(&data) {
                Some(end) if end == data.len() => Some(data),
                Some(end) => {
                    self.pending.extend_from_slice(&data[end..]);
                    Some(data.slice(..end))
                }
                None if data.len() > MAX_PENDING => Some(data),
                None => {
                    self.pending.extend_from_slice(&data);
                    None
                }
            };
        }
        self.pending.extend_from_slice(&data);
        match last_boundary(&self.pending) {
            Some(end) => Some(self.pending.split_to(end).freeze()),
            None if self.pending.len() > MAX_PENDING => Some(self.pending.split().freeze()),
            None => None,
        }
    }

    /// At a clean end of the stream: whatever is left, as the upstream sent it.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }
}

/// The last event of a stream that ended without its blank line, terminated, if it is whole: each
/// of its `data:` payloads is a complete JSON value or `[DONE]` (as some servers end `data:
/// [DONE]` without the blank line). `None` for an event cut short.
pub fn terminated(rest: &[u8]) -> Option<Bytes> {
    let whole = payloads(rest).all(|p| p == b"[DONE]" || serde_json::from_slice::<serde::de::IgnoredAny>(p).is_ok());
    if !whole {
        return None;
    }
    let body = rest.strip_suffix(b"\n").unwrap_or(rest);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    let mut out = BytesMut::with_capacity(body.len() + 2);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\n\n");
    Some(out.freeze())
}

/// Where the blank line that starts with the newline at `newline` ends, if one does.
fn blank_line_end(data: &[u8], newline: usize) -> Option<usize> {
    match data.get(newline + 1..) {
        Some([b'\n', ..]) => Some(newline + 2),
        Some([b'\r', b'\n', ..]) => Some(newline + 3),
        _ => None,
    }
}

/// The index just past the last blank line. Searched from the end: a chunk usually ends on one.
fn last_boundary(data: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(b'\n', data).find_map(|i| {
        // The last newline of a blank line is preceded by `\n` or `\n\r`.
        let start = match data[..i] {
            [.., b'\n'] => i - 1,
            [.., b'\n', b'\r'] => i - 2,
            _ => return None,
        };
        blank_line_end(data, start)
    })
}

/// The ranges of the events in `bytes`, each with its terminating blank line; bytes after the last
/// blank line form a last, unterminated range.
pub fn events(bytes: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut newlines = memchr::memchr_iter(b'\n', bytes);
    let mut start = 0;
    std::iter::from_fn(move || {
        for i in newlines.by_ref() {
            if i < start {
                continue;
            }
            let Some(end) = blank_line_end(bytes, i) else { continue };
            let event = start..end;
            start = end;
            return Some(event);
        }
        (start < bytes.len()).then(|| {
            let rest = start..bytes.len();
            start = bytes.len();
            rest
        })
    })
}

/// The name an event gives itself on an `event:` line, when that is its first line (as servers
/// write it); `None` for an event that starts otherwise.
pub fn event_name(event: &[u8]) -> Option<&[u8]> {
    let rest = event.strip_prefix(b"event:")?;
    let line = &rest[..memchr::memchr(b'\n', rest).unwrap_or(rest.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some(line.strip_prefix(b" ").unwrap_or(line))
}

/// The `data:` payloads of the lines of `events`, without the field name and its one optional
/// space. Lines are found with memchr: every event of a metered stream passes through here.
pub fn payloads(events: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = std::iter::once(0).chain(memchr::memchr_iter(b'\n', events).map(|i| i + 1));
    let mut next = starts.next();
    std::iter::from_fn(move || {
        let start = next?;
        next = starts.next();
        let end = next.map_or(events.len(), |n| n - 1);
        Some(&events[start..end.max(start)])
    })
    .filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"data:").map(|d| d.strip_prefix(b" ").unwrap_or(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(f: &mut Framer, s: &'static str) -> Option<String> {
        f.push(Bytes::from_static(s.as_bytes())).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn an_event_names_itself_on_its_first_line() {
        assert_eq!(event_name(b"event: response.completed\ndata: {}\n\n"), Some(&b"response.completed"[..]));
        assert_eq!(event_name(b"event:ping\r\ndata: {}\r\n\r\n"), Some(&b"ping"[..]));
        assert_eq!(event_name(b"data: {}\nevent: late\n\n"), None);
        assert_eq!(event_name(b"event: x"), Some(&b"x"[..]));
    }

    #[test]
    fn forwards_whole_events_and_holds_partial_ones() {
        let mut f = Framer::default();
        assert_eq!(push(&mut f, "data: 1\n\n"), Some("data: 1\n\n".into()));
        assert_eq!(push(&mut f, "data: 2\n\ndata: 3"), Some("data: 2\n\n".into()));
        assert_eq!(push(&mut f, "\n"), None);
        assert_eq!(push(&mut f, "\ndata: 4\r\n\r\n"), Some("data: 3\n\ndata: 4\r\n\r\n".into()));
        assert_eq!(push(&mut f, "data: [DONE]"), None);
        assert_eq!(f.finish().map(|b| b.to_vec()), Some(b"data: [DONE]".to_vec()));
        assert_eq!(f.finish(), None);
    }

    #[test]
    fn does_not_buffer_without_bound() {
        let mut f = Framer::default();
        let big = Bytes::from(vec![b'x'; MAX_PENDING + 1]);
        assert_eq!(f.push(big.clone()).map(|b| b.len()), Some(big.len()));
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_ended_if_whole() {
        let end = |s: &str| terminated(s.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap());
        assert_eq!(end("data: [DONE]"), Some("data: [DONE]\n\n".into()));
        assert_eq!(end("data: {\"a\":1}\r\n"), Some("data: {\"a\":1}\n\n".into()));
        assert_eq!(end(": ping"), Some(": ping\n\n".into()));
        assert_eq!(end("data: {\"a\":"), None, "cut short");
        assert_eq!(end("data: {\"a\":1}\ndata: [DO"), None);
    }

    #[test]
    fn events_and_payloads() {
        let bytes = b"data: {\"a\":1}\n\n: comment\r\n\r\ndata:[DONE]\n\nrest";
        let ranges: Vec<_> = events(bytes).map(|r| &bytes[r]).collect();
        assert_eq!(ranges, [&b"data: {\"a\":1}\n\n"[..], b": comment\r\n\r\n", b"data:[DONE]\n\n", b"rest"]);
        assert_eq!(payloads(bytes).collect::<Vec<_>>(), [&b"{\"a\":1}"[..], b"[DONE]"]);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A stream of events with LF or CRLF line ends, and the places it is cut into chunks.
        fn stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
            let line = prop_oneof!["data: [^\r\n]{0,12}", ": [^\r\n]{0,6}", "event: [a-z]{1,5}"];
            let event = (prop::collection::vec(line, 1..3), any::<bool>()).prop_map(|(lines, crlf)| {
                let end = if crlf { "\r\n" } else { "\n" };
                let mut event: String = lines.iter().map(|l| format!("{l}{end}")).collect();
                event.push_str(end);
                event
            });
            (prop::collection::vec(event, 0..6), "[^\r\n]{0,5}").prop_flat_map(|(events, tail)| {
                let bytes = format!("{}{tail}", events.concat()).into_bytes();
                let len = bytes.len();
                (Just(bytes), prop::collection::vec(0..=len, 0..6))
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn framing_loses_and_reorders_nothing_and_cuts_only_at_event_ends((bytes, mut cuts) in stream()) {
                cuts.push(0);
                cuts.push(bytes.len());
                cuts.sort_unstable();
                let mut framer = Framer::default();
                let mut out = Vec::new();
                for w in cuts.windows(2) {
                    if let Some(whole) = framer.push(Bytes::copy_from_slice(&bytes[w[0]..w[1]])) {
                        prop_assert!(whole.ends_with(b"\n\n") || whole.ends_with(b"\n\r\n"), "{:?}", whole);
                        out.extend_from_slice(&whole);
                    }
                }
                out.extend_from_slice(&framer.finish().unwrap_or_default());
                prop_assert_eq!(out, bytes);
            }

            #[test]
            fn any_bytes_frame_and_split_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), cut in any::<prop::sample::Index>()) {
                let at = cut.index(bytes.len() + 1);
                let mut framer = Framer::default();
                let mut out = Vec::new();
                for part in [&bytes[..at], &bytes[at..]] {
                    out.extend_from_slice(&framer.push(Bytes::copy_from_slice(part)).unwrap_or_default());
                }
                out.extend_from_slice(&framer.finish().unwrap_or_default());
                prop_assert_eq!(&out, &bytes);
                prop_assert_eq!(events(&bytes).map(|r| r.len()).sum::<usize>(), bytes.len());
                for payload in payloads(&bytes) {
                    prop_assert!(!payload.contains(&b'\n'));
                }
            }
        }
    }
}
