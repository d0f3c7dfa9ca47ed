//! The OpenAI wire format: the few request fields routing needs, the model rewrite, error bodies
//! and the terminal stream event.
//!
//! Requests are not parsed into owned values: the proxy borrows `model` and `stream` from the body
//! and splices the upstream model name into the original bytes.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// What routing needs from a chat completion request.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    pub model: Cow<'a, str>,
    /// Where the `model` value (with its quotes) sits in the body.
    model_span: Range<usize>,
    pub stream: bool,
}

/// Why a request body was rejected.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    InvalidJson(String),
    MissingModel,
    InvalidModel,
}

// Named for error messages: serde says "expected struct ChatCompletionRequest".
#[derive(Deserialize)]
#[serde(rename = "ChatCompletionRequest")]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Reads `model` and `stream` from a request body, validating that the whole body is JSON.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest<'_>, RequestError> {
    // serde would also read a struct from a JSON array; a request is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b != b'{') {
        return Err(RequestError::InvalidJson("expected a JSON object".into()));
    }
    let peek: Peek<'_> = serde_json::from_slice(body).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    let raw = peek.model.ok_or(RequestError::MissingModel)?;
    let text = raw.get();
    if !text.starts_with('"') {
        return Err(RequestError::InvalidModel);
    }
    let model: Cow<'_, str> = serde_json::from_str(text).map_err(|_| RequestError::InvalidModel)?;
    // `raw` borrows from `body`, so its address locates the value within the body.
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    Ok(ChatRequest { model, model_span: start..start + text.len(), stream: peek.stream.unwrap_or(false) })
}

impl ChatRequest<'_> {
    /// The body with `model` replaced by `model_json` (a JSON string literal, quotes included).
    /// One copy of the body; none when the model is unchanged.
    pub fn with_model(&self, body: &Bytes, model_json: &str) -> Bytes {
        let span = self.model_span.clone();
        if &body[span.clone()] == model_json.as_bytes() {
            return body.clone();
        }
        let mut out = BytesMut::with_capacity(body.len() - span.len() + model_json.len());
        out.extend_from_slice(&body[..span.start]);
        out.extend_from_slice(model_json.as_bytes());
        out.extend_from_slice(&body[span.end..]);
        out.freeze()
    }
}

/// A string as a JSON string literal, quotes included.
pub fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The error body every Switchyard error uses: `{"error": {"message", "type", "code", "metadata"}}`.
pub fn error_body(message: &str, kind: &str, code: &str, metadata: Option<serde_json::Value>) -> serde_json::Value {
    let mut error = serde_json::json!({"message": message, "type": kind, "code": code});
    if let Some(metadata) = metadata {
        error["metadata"] = metadata;
    }
    serde_json::json!({ "error": error })
}

/// The event that ends a stream which broke after it started, in OpenRouter's shape: a chunk with an
/// `error` object and `finish_reason: "error"`. OpenAI's SDKs raise an `APIError` on it.
pub fn stream_error_event(model: &str, provider: &str, code: &str, message: &str, created: u64) -> Bytes {
    let chunk = serde_json::json!({
        "id": "switchyard-error",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "provider": provider,
        "error": {"message": message, "type": "upstream_error", "code": code},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// The `error.message` of an OpenAI-shaped error body, if the body is one.
pub fn upstream_error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Outer {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        message: String,
    }
    serde_json::from_slice::<Outer>(body).ok().map(|o| o.error.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn splice(body: &str, model: &str) -> String {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let req = parse_chat_request(&bytes).unwrap();
        String::from_utf8(req.with_model(&bytes, &json_string(model)).to_vec()).unwrap()
    }

    #[test]
    fn splices_model_and_keeps_every_other_byte() {
        let body =
            r#"{ "messages" : [{"role":"user","content":"hi \"model\": x"}],  "model" : "chat", "temperature":0.5 }"#;
        assert_eq!(
            splice(body, "gpt-4o-2024-08-06"),
            r#"{ "messages" : [{"role":"user","content":"hi \"model\": x"}],  "model" : "gpt-4o-2024-08-06", "temperature":0.5 }"#
        );
        assert_eq!(splice(r#"{"model":"a\u0062c"}"#, "x\"y"), r#"{"model":"x\"y"}"#);
    }

    #[test]
    fn reads_escaped_model_and_stream() {
        let req = parse_chat_request(br#"{"model":"a\u0062c","stream":true}"#).unwrap();
        assert_eq!(req.model, "abc");
        assert!(req.stream);
        assert!(!parse_chat_request(br#"{"model":"m","stream":null}"#).unwrap().stream);
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(parse_chat_request(br#"{"messages":[]}"#).unwrap_err(), RequestError::MissingModel);
        assert_eq!(parse_chat_request(br#"{"model":7}"#).unwrap_err(), RequestError::InvalidModel);
        assert_eq!(parse_chat_request(br#"{"model":null}"#).unwrap_err(), RequestError::MissingModel);
        assert!(matches!(parse_chat_request(br#"{"model":"m""#), Err(RequestError::InvalidJson(_))));
        assert!(matches!(parse_chat_request(br#"[1]"#), Err(RequestError::InvalidJson(_))));
        assert!(matches!(parse_chat_request(br#"{"model":"m","stream":"yes"}"#), Err(RequestError::InvalidJson(_))));
        assert!(matches!(parse_chat_request(br#"{"model":"a","model":"b"}"#), Err(RequestError::InvalidJson(_))));
        assert!(matches!(parse_chat_request(b"{\"model\":\"m\"} trailing"), Err(RequestError::InvalidJson(_))));
    }
}
