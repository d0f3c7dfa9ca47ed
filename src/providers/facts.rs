//! What a record of a request wants from an answer beyond its usage: the answer's `id` and why it
//! ended. The same fields in every format the sidecar answers in are read with one shape, so the
//! caller's format need not be known: chat and legacy completions (`id`,
//! `choices[].finish_reason`), Messages (`id`, `stop_reason`; in a stream `message.id` and
//! `delta.stop_reason`), Responses (`id` or `response.id`, `status`, and
//! `incomplete_details.reason`).
//!
//! Read only when something records requests, so it parses rather than scans.

use std::borrow::Cow;

use serde::Deserialize;

/// An answer's id and finish reason, each when the bytes have one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Facts {
    pub id: Option<String>,
    pub finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Peek<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    incomplete_details: Option<Incomplete<'a>>,
    /// A Messages stream's `message_start`.
    #[serde(borrow, default)]
    message: Option<Box<Peek<'a>>>,
    /// A Messages stream's `message_delta`.
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    /// A Responses stream's `response.*` events.
    #[serde(borrow, default)]
    response: Option<Box<Peek<'a>>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Incomplete<'a> {
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

impl Peek<'_> {
    fn facts(self) -> Facts {
        let nested = self.message.or(self.response).map(|p| p.facts()).unwrap_or_default();
        let from_choices = self.choices.and_then(|c| c.into_iter().find_map(|c| c.finish_reason));
        // A Responses answer that is `incomplete` says why; one that is `completed` has no
        // other reason. In-progress statuses are not an end.
        let from_status = match self.status.as_deref() {
            Some("completed" | "failed" | "cancelled") => self.status,
            Some("incomplete") => self.incomplete_details.and_then(|d| d.reason).or(self.status),
            _ => None,
        };
        let finish = from_choices
            .or(self.stop_reason)
            .or(self.delta.and_then(|d| d.stop_reason))
            .or(from_status)
            .map(Cow::into_owned);
        Facts { id: self.id.map(Cow::into_owned).or(nested.id), finish_reason: finish.or(nested.finish_reason) }
    }
}

/// The facts of a JSON answer or of one stream event's payload; nothing from bytes that are not
/// a JSON object of the expected shape.
pub fn facts(json: &[u8]) -> Facts {
    serde_json::from_slice::<Peek<'_>>(json).map(Peek::facts).unwrap_or_default()
}

/// Whether a stream payload may carry a finish reason, so that only those are parsed: a key
/// ending in `reason` with a string value (every chat chunk has `"finish_reason":null`), or a
/// `status` that is not an in-progress one.
pub fn may_end(payload: &[u8]) -> bool {
    let string_after = |key: &[u8], not: &[&[u8]]| {
        memchr::memmem::find_iter(payload, key).any(|at| {
            let rest = &payload[at + key.len()..];
            let rest = rest.trim_ascii_start().strip_prefix(b":").map(<[u8]>::trim_ascii_start);
            rest.and_then(|r| r.strip_prefix(b"\"")).is_some_and(|value| !not.iter().any(|n| value.starts_with(n)))
        })
    };
    string_after(b"reason\"", &[]) || string_after(b"\"status\"", &[b"in_progress\"", b"queued\""])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn of(value: serde_json::Value) -> Facts {
        facts(value.to_string().as_bytes())
    }

    #[test]
    fn every_format_s_id_and_finish_reason() {
        let chat = json!({"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "length"}]});
        assert_eq!(of(chat), Facts { id: Some("chatcmpl-1".into()), finish_reason: Some("length".into()) });
        let messages = json!({"id": "msg_1", "type": "message", "stop_reason": "end_turn"});
        assert_eq!(of(messages), Facts { id: Some("msg_1".into()), finish_reason: Some("end_turn".into()) });
        let start = json!({"type": "message_start", "message": {"id": "msg_2", "stop_reason": null}});
        assert_eq!(of(start), Facts { id: Some("msg_2".into()), finish_reason: None });
        let delta = json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}});
        assert_eq!(of(delta).finish_reason.as_deref(), Some("tool_use"));
        let done = json!({"type": "response.completed", "response": {"id": "resp_1", "status": "completed"}});
        assert_eq!(of(done), Facts { id: Some("resp_1".into()), finish_reason: Some("completed".into()) });
        let cut =
            json!({"id": "resp_2", "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}});
        assert_eq!(of(cut).finish_reason.as_deref(), Some("max_output_tokens"));
        let running = json!({"type": "response.created", "response": {"id": "resp_3", "status": "in_progress"}});
        assert_eq!(of(running.clone()).finish_reason, None, "in progress is not an end");
        let chunk = json!({"id": "c", "choices": [{"delta": {"content": "hi"}, "finish_reason": null}]});
        assert_eq!(of(chunk.clone()).finish_reason, None);
        assert!(!may_end(chunk.to_string().as_bytes()), "a chunk without a reason is not parsed");
        assert!(!may_end(running.to_string().as_bytes()), "nor an in-progress response");
        assert!(may_end(br#"{"choices":[{"finish_reason" : "stop"}]}"#));
        assert_eq!(facts(b"[DONE]"), Facts::default());
    }

    proptest! {
        #[test]
        fn any_bytes_give_facts_or_none_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = facts(&bytes);
            let _ = may_end(&bytes);
        }

        #[test]
        fn key_order_does_not_matter(reason in "[a-z_]{1,12}", id in "[a-z0-9-]{1,12}") {
            let forward = format!(r#"{{"id":"{id}","choices":[{{"finish_reason":"{reason}","index":0}}]}}"#);
            let backward = format!(r#"{{"choices":[{{"index":0,"finish_reason":"{reason}"}}],"id":"{id}"}}"#);
            prop_assert_eq!(facts(forward.as_bytes()), facts(backward.as_bytes()));
            prop_assert!(may_end(forward.as_bytes()));
        }
    }
}
