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

/// Chat completion chunks as providers send them, and arbitrary JSON.
pub fn chunk() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(
            serde_json::json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": null}]})
        ),
        Just(
            serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"reasoning": "r", "reasoning_details": [{"type": "reasoning.text", "signature": "s"}]}}]})
        ),
        Just(
            serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "t", "type": "function", "function": {"name": "f", "arguments": "{"}}]}}]})
        ),
        Just(serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})),
        Just(
            serde_json::json!({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}})
        ),
        json(),
    ]
}

/// Chunk streams of plausible and arbitrary chunks, bent or not.
pub fn chunks() -> impl Strategy<Value = Vec<u8>> {
    let data = prop_oneof![6 => chunk().prop_map(|v| v.to_string()), 1 => Just("[DONE]".to_string())];
    (prop::collection::vec(data, 0..8), any::<bool>()).prop_flat_map(|(chunks, bend)| {
        let bytes: Vec<u8> = chunks.iter().flat_map(|c| format!("data: {c}\n\n").into_bytes()).collect();
        if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
    })
}

/// `value` as JSON text with the keys of every object in an order that `seed` picks. Key order
/// carries no meaning in JSON (servers built on pydantic write `type` last, others first), so a
/// reader must read every order the same.
pub fn shuffled(value: &Value, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    write_shuffled(value, seed, &mut out);
    out
}

fn write_shuffled(value: &Value, seed: u64, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            // An order per object: each key ranked by a hash of it and the seed.
            let rank = |key: &str| {
                key.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
            };
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by_key(|(key, _)| rank(key));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::from(key.as_str()).to_string().as_bytes());
                out.push(b':');
                write_shuffled(value, seed.rotate_left(7), out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_shuffled(item, seed, out);
            }
            out.push(b']');
        }
        leaf => out.extend_from_slice(leaf.to_string().as_bytes()),
    }
}
