//! What a record of a request wants from an answer beyond its usage: the answer's `id` and why it
//! ended. The same fields in every format the sidecar answers in are read with one shape, so the
//! caller's format need not be known: chat and legacy completions (`id`,
//! `choices[].finish_reason`), Messages (`id`, `stop_reason`; in a stream `message.id` and
//! `delta.stop_reason`), Responses (`id` or `response.id`, `status`, and
//! `incomplete_details.reason`).
//!
//! Read only when something records requests, so it parses rather than scans. The content
//! (`input_messages`, `answer_text`, `delta_text`) is read only for traces that record it.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

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

/// The conversation a request sends, as its own JSON, for traces that record content: its
/// `messages` (with `system` when it has one), or its `input` (Responses, embeddings), or its
/// `prompt` (legacy completions).
pub fn input_messages(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Input<'a> {
        #[serde(borrow, default)]
        system: Option<&'a RawValue>,
        #[serde(borrow, default)]
        messages: Option<&'a RawValue>,
        #[serde(borrow, default)]
        input: Option<&'a RawValue>,
        #[serde(borrow, default)]
        prompt: Option<&'a RawValue>,
    }
    let peek: Input<'_> = serde_json::from_slice(body).ok()?;
    match (peek.system, peek.messages) {
        (Some(system), Some(messages)) => {
            Some(format!(r#"{{"system":{},"messages":{}}}"#, system.get(), messages.get()))
        }
        (_, Some(messages)) => Some(messages.get().to_string()),
        _ => peek.input.or(peek.prompt).map(|raw| raw.get().to_string()),
    }
}

#[derive(Deserialize, Default)]
struct Texts<'a> {
    #[serde(borrow, default)]
    choices: Vec<TextChoice<'a>>,
    /// A Messages answer's blocks.
    #[serde(borrow, default)]
    content: Option<Vec<Block<'a>>>,
    /// A Responses answer's items.
    #[serde(borrow, default)]
    output: Option<Vec<Item<'a>>>,
    /// A Messages `content_block_delta`'s `{"text"}`, or a Responses text delta's string.
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TextChoice<'a> {
    #[serde(borrow, default)]
    message: Option<Block<'a>>,
    #[serde(borrow, default)]
    delta: Option<Block<'a>>,
    /// Legacy completions.
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow, default)]
    content: Option<Vec<Block<'a>>>,
}

/// The text of a whole answer in any format the sidecar answers in; empty when it has none.
pub fn answer_text(json: &[u8]) -> String {
    let peek: Texts<'_> = serde_json::from_slice(json).unwrap_or_default();
    let mut out = String::new();
    for choice in &peek.choices {
        let message = choice.message.as_ref().and_then(|m| m.content.as_deref());
        out.push_str(message.or(choice.text.as_deref()).unwrap_or_default());
    }
    let blocks =
        peek.content.iter().flatten().chain(peek.output.iter().flatten().flat_map(|i| i.content.iter().flatten()));
    for block in blocks {
        out.push_str(block.text.as_deref().unwrap_or_default());
    }
    out
}

/// The text one stream event adds, in any format the sidecar streams in.
pub fn delta_text(payload: &[u8], out: &mut String) {
    let Ok(peek) = serde_json::from_slice::<Texts<'_>>(payload) else { return };
    for choice in &peek.choices {
        let delta = choice.delta.as_ref().and_then(|d| d.content.as_deref());
        out.push_str(delta.or(choice.text.as_deref()).unwrap_or_default());
    }
    match peek.delta.map(RawValue::get) {
        Some(text) if text.starts_with('"') => {
            out.push_str(&serde_json::from_str::<Cow<'_, str>>(text).unwrap_or_default())
        }
        Some(block) => {
            let text = serde_json::from_str::<Block<'_>>(block).ok().and_then(|b| b.text);
            out.push_str(text.as_deref().unwrap_or_default());
        }
        None => {}
    }
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

    #[test]
    fn the_content_of_requests_answers_and_events_in_every_format() {
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(input_messages(chat).as_deref(), Some(r#"[{"role":"user","content":"hi"}]"#), "as sent");
        let messages = json!({"model": "m", "system": "be brief", "messages": []});
        assert_eq!(
            input_messages(messages.to_string().as_bytes()).as_deref(),
            Some(r#"{"system":"be brief","messages":[]}"#)
        );
        assert_eq!(input_messages(br#"{"model":"m","input":"hello"}"#).as_deref(), Some(r#""hello""#));
        assert_eq!(input_messages(b"[1]"), None);

        let answers = [
            json!({"choices": [{"message": {"role": "assistant", "content": "Hello"}}]}),
            json!({"type": "message", "content": [{"type": "text", "text": "Hello"}]}),
            json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": "Hello"}]}]}),
            json!({"choices": [{"text": "Hello"}]}),
        ];
        for answer in answers {
            assert_eq!(answer_text(answer.to_string().as_bytes()), "Hello", "{answer}");
        }
        let mut out = String::new();
        for event in [
            json!({"choices": [{"delta": {"content": "He"}}]}),
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "l"}}),
            json!({"type": "response.output_text.delta", "delta": "l"}),
            json!({"choices": [{"text": "o"}]}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        ] {
            delta_text(event.to_string().as_bytes(), &mut out);
        }
        assert_eq!(out, "Hello");
    }

    proptest! {
        #[test]
        fn any_bytes_give_facts_or_none_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = facts(&bytes);
            let _ = may_end(&bytes);
            let _ = input_messages(&bytes);
            let _ = answer_text(&bytes);
            delta_text(&bytes, &mut String::new());
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
