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
