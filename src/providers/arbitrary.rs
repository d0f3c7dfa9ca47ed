//! Generators for property tests of the readers of outside bytes: JSON values shaped like what
//! callers and upstreams send, and byte strings that are almost that.

use proptest::prelude::*;
use serde_json::{Map, Value};

/// Keys that the readers look for, and some they do not.
const KEYS: [&str; 24] = [
    "model",
    "models",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "max_completion_tokens",
    "provider",
    "order",
    "sort",
    "max_price",
    "prompt",
    "messages",
    "role",
    "content",
    "choices",
    "delta",
    "message",
    "tool_calls",
    "arguments",
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "error",
];

pub fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => proptest::sample::select(&KEYS[..]).prop_map(str::to_string), 1 => ".{0,8}"]
}

/// Numbers as providers and callers write them, huge and negative ones included.
pub fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..1000).prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
        Just(serde_json::from_str("1e300").unwrap_or(Value::Null)),
        Just(serde_json::from_str("123456789012345678901234567890").unwrap_or(Value::Null)),
    ]
}

pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        ".{0,12}".prop_map(Value::from),
        key().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A JSON object with a string `model` among arbitrary fields.
pub fn request() -> impl Strategy<Value = Value> {
    (".{0,10}", prop::collection::vec((key(), json()), 0..6)).prop_map(|(model, fields)| {
        let mut object: Map<String, Value> = fields.into_iter().filter(|(k, _)| k != "model").collect();
        object.insert("model".into(), Value::from(model));
        Value::Object(object)
    })
}

/// `bytes` with a few bytes replaced, inserted or cut.
pub fn mutated(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = bytes.len().max(1);
    prop::collection::vec((0..len, any::<u8>(), 0u8..3), 1..4).prop_map(move |edits| {
        let mut out = bytes.clone();
        for (at, byte, kind) in edits {
            let at = at.min(out.len());
            match kind {
                0 if at < out.len() => out[at] = byte,
                1 => out.insert(at, byte),
                _ => out.truncate(at),
            }
        }
        out
    })
}

/// Chat answers with every finish reason, tool calls and reasoning, bent or not.
pub fn chat_answer() -> impl Strategy<Value = Vec<u8>> {
    let finish = prop::sample::select(vec!["stop", "length", "tool_calls", "content_filter", "pause_turn", "eos"]);
    let message = prop_oneof![
        Just(serde_json::json!({"role": "assistant", "content": "hi"})),
        Just(
            serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{\"a\":1}"}}]})
        ),
        Just(
            serde_json::json!({"role": "assistant", "content": "x", "reasoning_details": [{"type": "reasoning.text", "text": "r", "signature": "s"}]})
        ),
        json(),
    ];
    let usage = (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(p, c, r, w)| {
        serde_json::json!({"prompt_tokens": p, "completion_tokens": c, "prompt_tokens_details": {"cached_tokens": r, "cache_write_tokens": w}})
    });
    (message, finish, usage, any::<bool>()).prop_flat_map(|(message, finish, usage, bend)| {
        let body = serde_json::json!({"id": "x", "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage});
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
    })
}

/// Chunk streams of plausible and arbitrary chunks, bent or not.
pub fn chunks() -> impl Strategy<Value = Vec<u8>> {
    let data = prop_oneof![
        Just(serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]}).to_string()),
        Just(serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"reasoning": "r", "reasoning_details": [{"type": "reasoning.text", "signature": "s"}]}}]}).to_string()),
        Just(serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "t", "function": {"name": "f", "arguments": "{"}}]}}]}).to_string()),
        Just(serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}).to_string()),
        Just(serde_json::json!({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).to_string()),
        Just("[DONE]".to_string()),
        json().prop_map(|v| v.to_string()),
    ];
    (prop::collection::vec(data, 0..8), any::<bool>()).prop_flat_map(|(chunks, bend)| {
        let bytes: Vec<u8> = chunks.iter().flat_map(|c| format!("data: {c}\n\n").into_bytes()).collect();
        if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
    })
}
