//! Anthropic's Messages API, as a translation target of OpenAI's Chat Completions: a chat request
//! becomes a Messages request ([`messages_request`]) and the answer a chat completion
//! ([`chat_completion`]), usage with cache reads and writes kept apart. Faithful by construction: what has a Messages equivalent is
//! carried over with its meaning (prompt-cache markers included), what has none and would change
//! the answer is a clear error naming the field, never silently dropped.
//!
//! | Chat Completions | Messages |
//! | --- | --- |
//! | `system` and `developer` messages | `system` text blocks, in order |
//! | `user` text and `image_url` parts (URL or `data:` base64) | `text` and `image` blocks |
//! | `assistant` content and `tool_calls` | `text` and `tool_use` blocks (`arguments` parsed) |
//! | `tool` messages | `tool_result` blocks of the next user turn, ids kept |
//! | `cache_control` on a content part or a tool | the same `cache_control` |
//! | `max_completion_tokens`, `max_tokens` | `max_tokens` (required: the route's default without) |
//! | `stop` | `stop_sequences` |
//! | `temperature` (0-1), `top_p`, `stream`, `user` | the same, `metadata.user_id` |
//! | `tools` (functions), `tool_choice`, `parallel_tool_calls: false` | `tools` with `input_schema`, `tool_choice` (`required` is `any`), `disable_parallel_tool_use` |
//! | `response_format` `json_schema` | `output_format` `json_schema` |
//! | `reasoning_effort` | `thinking` with a token budget (at most three quarters of `max_tokens`) |
//! | an assistant's `reasoning_details` (as an earlier answer carried them) | `thinking` and `redacted_thinking` blocks, signatures unchanged |
//!
//! Left out, as they only tune sampling or the transport: `seed`, `frequency_penalty`,
//! `presence_penalty`, `logit_bias`, `stream_options` (Anthropic streams always report usage),
//! `service_tier`, `store`, `metadata`. Refused with a 400: `n` above 1, `logprobs`, audio,
//! `json_object` without a schema, a temperature above 1, a tool result without its call.

pub mod callers;

use std::sync::LazyLock;

use http::HeaderName;
use memchr::memmem::Finder;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::openai::{self, ChunkInfo, json_string};
use super::{StreamEnd, Untranslatable};
use super::{Usage, untranslatable};

/// The API version every Messages request names.
pub const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
/// Beta features a Messages request opts into, comma-separated.
pub const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
/// Where Messages requests carry their key.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The version sent unless a target's `headers` name another: the one Anthropic's SDKs send.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Thinking budgets for `reasoning_effort`: Anthropic's minimum, then doublings up to a budget
/// that still leaves room for the answer in common `max_tokens`.
const THINKING_BUDGETS: [(&str, u64); 4] = [("minimal", 1024), ("low", 2048), ("medium", 8192), ("high", 24576)];
const MIN_THINKING_BUDGET: u64 = 1024;

/// Translates a Chat Completions request body into a Messages request for `model`;
/// `default_max_tokens` stands in for a missing `max_tokens`, which Anthropic requires.
pub fn messages_request(chat: &[u8], model: &str, default_max_tokens: u64) -> Result<Vec<u8>, Untranslatable> {
    let chat: Value =
        serde_json::from_slice(chat).map_err(|e| untranslatable("", format!("the body is not JSON: {e}")))?;
    let chat = chat.as_object().ok_or_else(|| untranslatable("", "the body is not a JSON object"))?;
    let mut out = Map::new();
    out.insert("model".into(), Value::from(model));

    let (system, messages) = translate_messages(chat.get("messages"))?;
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));

    let max_tokens = match chat.get("max_completion_tokens").or_else(|| chat.get("max_tokens")) {
        None | Some(Value::Null) => default_max_tokens,
        Some(v) => {
            v.as_u64().filter(|n| *n > 0).ok_or_else(|| untranslatable("max_tokens", "must be a positive integer"))?
        }
    };
    out.insert("max_tokens".into(), Value::from(max_tokens));

    for (from, to) in [("top_p", "top_p"), ("stream", "stream")] {
        if let Some(v) = chat.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    if let Some(t) = chat.get("temperature").filter(|v| !v.is_null()) {
        match t.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => {
                out.insert("temperature".into(), json!(t));
            }
            _ => return Err(untranslatable("temperature", "Anthropic models take a temperature from 0 to 1")),
        }
    }
    match chat.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
            out.insert("stop_sequences".into(), Value::Array(list.clone()));
        }
        Some(_) => return Err(untranslatable("stop", "must be a string or an array of strings")),
    }
    if let Some(user) = chat.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(n) = chat.get("n").filter(|v| !v.is_null())
        && n.as_u64() != Some(1)
    {
        return Err(untranslatable("n", "Anthropic models give one choice per request"));
    }
    for field in ["logprobs", "top_logprobs"] {
        if chat.get(field).is_some_and(|v| !v.is_null() && *v != Value::Bool(false)) {
            return Err(untranslatable(field, "Anthropic models do not return log probabilities"));
        }
    }
    if chat.get("audio").is_some_and(|v| !v.is_null())
        || chat.get("modalities").is_some_and(|m| m.to_string().contains("audio"))
    {
        return Err(untranslatable("audio", "Anthropic models do not answer with audio"));
    }

    if let Some(tools) = chat.get("tools").filter(|v| !v.is_null()) {
        out.insert("tools".into(), Value::Array(translate_tools(tools)?));
    }
    let parallel = chat.get("parallel_tool_calls").and_then(Value::as_bool);
    if let Some(choice) = translate_tool_choice(chat.get("tool_choice"), parallel)? {
        out.insert("tool_choice".into(), choice);
    }
    match chat.get("response_format").filter(|v| !v.is_null()) {
        None => {}
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_schema") => {
                let schema = format.pointer("/json_schema/schema").filter(|s| s.is_object()).ok_or_else(|| {
                    untranslatable("response_format.json_schema.schema", "must be a JSON schema object")
                })?;
                out.insert("output_format".into(), json!({"type": "json_schema", "schema": schema}));
            }
            Some("json_object") => {
                return Err(untranslatable(
                    "response_format",
                    "Anthropic models have no JSON mode without a schema: use {\"type\": \"json_schema\"} with a schema",
                ));
            }
            _ => return Err(untranslatable("response_format.type", "must be text, json_schema or json_object")),
        },
    }
    if let Some(effort) = chat.get("reasoning_effort").filter(|v| !v.is_null()) {
        let effort = effort.as_str().unwrap_or_default();
        let (_, budget) = THINKING_BUDGETS
            .iter()
            .find(|(name, _)| *name == effort)
            .ok_or_else(|| untranslatable("reasoning_effort", "must be minimal, low, medium or high"))?;
        // The budget counts within max_tokens: a quarter at least stays for the answer.
        let budget = (*budget).min(max_tokens - max_tokens / 4);
        if budget < MIN_THINKING_BUDGET {
            return Err(untranslatable(
                "reasoning_effort",
                format!("Anthropic models think with at least {MIN_THINKING_BUDGET} tokens: set max_tokens above that"),
            ));
        }
        if out.get("temperature").is_some_and(|t| t.as_f64() != Some(1.0)) {
            return Err(untranslatable("temperature", "Anthropic models think only at temperature 1: leave it unset"));
        }
        out.insert("thinking".into(), json!({"type": "enabled", "budget_tokens": budget}));
    }
    Ok(serde_json::to_vec(&Value::Object(out)).unwrap_or_default())
}

/// `system` blocks and the conversation, with tool results in the user turns that follow their
/// calls, and every result matched to a call.
fn translate_messages(messages: Option<&Value>) -> Result<(Vec<Value>, Vec<Value>), Untranslatable> {
    let messages = messages
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| untranslatable("messages", "must be a non-empty array"))?;
    let mut system = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    let mut calls = std::collections::HashSet::new();
    for (i, message) in messages.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].{field}");
        let role = message.get("role").and_then(Value::as_str).unwrap_or_default();
        let content = message.get("content").filter(|c| !c.is_null());
        match role {
            "system" | "developer" => system.extend(text_blocks(content, &at("content"))?),
            "user" => push(&mut out, "user", content_blocks(content, &at("content"))?),
            "assistant" => {
                let mut blocks = thinking_blocks(message.get("reasoning_details"), &at("reasoning_details"))?;
                blocks.extend(text_blocks(content, &at("content"))?);
                for (k, call) in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
                    let call_at = |f: &str| format!("messages[{i}].tool_calls[{k}].{f}");
                    let id = call
                        .get("id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| untranslatable(call_at("id"), "missing"))?;
                    let function =
                        call.get("function").ok_or_else(|| untranslatable(call_at("function"), "missing"))?;
                    let name = function
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| untranslatable(call_at("function.name"), "missing"))?;
                    let arguments = function.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                    let input: Value = if arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(arguments)
                            .map_err(|e| untranslatable(call_at("function.arguments"), format!("is not JSON: {e}")))?
                    };
                    calls.insert(id.to_string());
                    blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
                }
                push(&mut out, "assistant", blocks);
            }
            "tool" => {
                let id = message
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| untranslatable(at("tool_call_id"), "missing"))?;
                if !calls.contains(id) {
                    return Err(untranslatable(
                        at("tool_call_id"),
                        format!("no earlier assistant message has a tool call with id {id:?}"),
                    ));
                }
                let mut result = json!({"type": "tool_result", "tool_use_id": id});
                match content {
                    Some(Value::String(text)) => result["content"] = Value::from(text.as_str()),
                    other => result["content"] = Value::Array(content_blocks(other, &at("content"))?),
                }
                if let Some(cache) = message.get("cache_control") {
                    result["cache_control"] = cache.clone();
                }
                push(&mut out, "user", vec![result]);
            }
            "" => return Err(untranslatable(at("role"), "missing")),
            other => return Err(untranslatable(at("role"), format!("{other:?} has no Messages equivalent"))),
        }
    }
    Ok((system, out))
}

/// Appends `blocks` to the conversation, joining a turn of the same role (tool results and the
/// user's next words are one user turn), tool results first.
fn push(out: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = out.last_mut().filter(|m| m["role"] == role)
        && let Some(content) = last["content"].as_array_mut()
    {
        content.extend(blocks);
        content.sort_by_key(|b| b["type"] != "tool_result");
        return;
    }
    out.push(json!({"role": role, "content": blocks}));
}

/// Text blocks of a string or of `text` parts (with their `cache_control`).
fn text_blocks(content: Option<&Value>, at: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        None => Ok(Vec::new()),
        Some(Value::String(text)) if text.is_empty() => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![json!({"type": "text", "text": text})]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(k, part)| match part.get("type").and_then(Value::as_str) {
                Some("text") => text_part(part, &format!("{at}[{k}]")),
                _ => Err(untranslatable(format!("{at}[{k}].type"), "only text parts are allowed here")),
            })
            .collect(),
        Some(_) => Err(untranslatable(at, "must be a string or an array of parts")),
    }
}

fn text_part(part: &Value, at: &str) -> Result<Value, Untranslatable> {
    let text =
        part.get("text").and_then(Value::as_str).ok_or_else(|| untranslatable(format!("{at}.text"), "missing"))?;
    let mut block = json!({"type": "text", "text": text});
    if let Some(cache) = part.get("cache_control") {
        block["cache_control"] = cache.clone();
    }
    Ok(block)
}

/// Blocks of a user message: text and images.
fn content_blocks(content: Option<&Value>, at: &str) -> Result<Vec<Value>, Untranslatable> {
    let Some(Value::Array(parts)) = content else { return text_blocks(content, at) };
    let mut blocks = Vec::with_capacity(parts.len());
    for (k, part) in parts.iter().enumerate() {
        let part_at = format!("{at}[{k}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => blocks.push(text_part(part, &part_at)?),
            Some("image_url") => {
                let url = part
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| untranslatable(format!("{part_at}.image_url.url"), "missing"))?;
                let source = match url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")) {
                    Some((media_type, data)) => json!({"type": "base64", "media_type": media_type, "data": data}),
                    None if url.starts_with("data:") => {
                        return Err(untranslatable(format!("{part_at}.image_url.url"), "a data: URL must be base64"));
                    }
                    None => json!({"type": "url", "url": url}),
                };
                let mut block = json!({"type": "image", "source": source});
                if let Some(cache) = part.get("cache_control") {
                    block["cache_control"] = cache.clone();
                }
                blocks.push(block);
            }
            Some(other) => {
                return Err(untranslatable(
                    format!("{part_at}.type"),
                    format!("{other:?} parts have no Messages equivalent"),
                ));
            }
            None => return Err(untranslatable(format!("{part_at}.type"), "missing")),
        }
    }
    Ok(blocks)
}

/// Thinking blocks an earlier Anthropic answer carried back as OpenRouter-style
/// `reasoning_details`, byte for byte with their signatures; none is ever made up.
fn thinking_blocks(details: Option<&Value>, at: &str) -> Result<Vec<Value>, Untranslatable> {
    let Some(details) = details.filter(|d| !d.is_null()) else { return Ok(Vec::new()) };
    let details = details.as_array().ok_or_else(|| untranslatable(at, "must be an array"))?;
    let mut blocks = Vec::new();
    for (k, detail) in details.iter().enumerate() {
        match detail.get("type").and_then(Value::as_str) {
            Some("reasoning.text") => {
                let (Some(text), Some(signature)) =
                    (detail.get("text").and_then(Value::as_str), detail.get("signature").and_then(Value::as_str))
                else {
                    return Err(untranslatable(format!("{at}[{k}]"), "thinking needs its text and its signature"));
                };
                blocks.push(json!({"type": "thinking", "thinking": text, "signature": signature}));
            }
            Some("reasoning.encrypted") => {
                let data = detail
                    .get("data")
                    .and_then(Value::as_str)
                    .ok_or_else(|| untranslatable(format!("{at}[{k}].data"), "missing"))?;
                blocks.push(json!({"type": "redacted_thinking", "data": data}));
            }
            // Summaries carry no signature Anthropic could check: they stay behind.
            _ => {}
        }
    }
    Ok(blocks)
}

fn translate_tools(tools: &Value) -> Result<Vec<Value>, Untranslatable> {
    let tools = tools.as_array().ok_or_else(|| untranslatable("tools", "must be an array"))?;
    tools
        .iter()
        .enumerate()
        .map(|(k, tool)| {
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(untranslatable(
                    format!("tools[{k}].type"),
                    "only function tools have a Messages equivalent",
                ));
            }
            let function =
                tool.get("function").ok_or_else(|| untranslatable(format!("tools[{k}].function"), "missing"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| untranslatable(format!("tools[{k}].function.name"), "missing"))?;
            let mut out = json!({"name": name});
            if let Some(description) = function.get("description").filter(|d| !d.is_null()) {
                out["description"] = description.clone();
            }
            out["input_schema"] = function
                .get("parameters")
                .filter(|p| p.is_object())
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            if let Some(cache) = tool.get("cache_control").or_else(|| function.get("cache_control")) {
                out["cache_control"] = cache.clone();
            }
            Ok(out)
        })
        .collect()
}

fn translate_tool_choice(choice: Option<&Value>, parallel: Option<bool>) -> Result<Option<Value>, Untranslatable> {
    let mut out = match choice.filter(|c| !c.is_null()) {
        None => json!({"type": "auto"}),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            _ => return Err(untranslatable("tool_choice", "must be auto, none, required or a function")),
        },
        Some(c) => match c.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if c.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "tool", "name": name})
            }
            _ => return Err(untranslatable("tool_choice", "must be auto, none, required or a function")),
        },
    };
    if parallel == Some(false) && out["type"] != "none" {
        out["disable_parallel_tool_use"] = Value::Bool(true);
    } else if choice.is_none_or(Value::is_null) {
        // Nothing to say: Anthropic's default is auto.
        return Ok(None);
    }
    Ok(Some(out))
}

/// Anthropic's error types by the HTTP status that carries them.
const ERROR_TYPES: [(u16, &str); 10] = [
    (400, "invalid_request_error"),
    (401, "authentication_error"),
    (402, "billing_error"),
    (403, "permission_error"),
    (404, "not_found_error"),
    (413, "request_too_large"),
    (429, "rate_limit_error"),
    (529, "overloaded_error"),
    (500, "api_error"),
    (504, "timeout_error"),
];

/// The error type Anthropic names for an HTTP status: `api_error` for any other.
pub fn error_type(status: u16) -> &'static str {
    ERROR_TYPES.iter().find(|(s, _)| *s == status).map_or("api_error", |(_, t)| t)
}

/// The HTTP status of an error type, for errors that arrive without one (in a stream): 500 for a
/// type this version does not know.
pub fn error_status(error_type: &str) -> u16 {
    ERROR_TYPES.iter().find(|(_, t)| *t == error_type).map_or(500, |(s, _)| *s)
}

/// An Anthropic error body (`{"type":"error","error":{"type","message"}}`) in OpenAI's shape, its
/// type kept; `None` for a body of another shape.
pub fn openai_error(body: &[u8]) -> Option<Vec<u8>> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let error = body.get("error")?;
    let message = error.get("message")?.as_str()?;
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("api_error");
    serde_json::to_vec(&json!({"error": {"message": message, "type": kind, "param": null, "code": null}})).ok()
}

/// A Messages `stop_reason` as a Chat Completions `finish_reason`; `None` for a reason this
/// version does not know (an error, never a silent `stop`).
pub fn finish_reason(stop_reason: &str) -> Option<&'static str> {
    Some(match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // Anthropic paused a long turn for the caller to continue: not an end, kept apart.
        "pause_turn" => "pause_turn",
        _ => return None,
    })
}

/// Translates a Messages answer into a Chat Completions answer named `model`: text, tool calls
/// (arguments as JSON text), thinking as `reasoning` and, with signatures, `reasoning_details`
/// (so that a caller can send them back), the finish reason, and usage in OpenAI's convention.
pub fn chat_completion(answer: &[u8], model: &str, created: u64) -> Result<(Vec<u8>, Usage), Untranslatable> {
    let answer: AnswerPeek<'_> =
        serde_json::from_slice(answer).map_err(|e| untranslatable("", format!("the answer is not JSON: {e}")))?;
    if answer.kind != "message" {
        return Err(untranslatable("type", "the answer is not a message"));
    }
    let raw = |v: Option<&RawValue>| v.map_or("\"\"", RawValue::get).to_string();
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut details = Vec::new();
    let mut calls = Vec::new();
    for (k, block) in answer.content.iter().flatten().enumerate() {
        match block.kind.as_ref() {
            "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
            "thinking" => {
                let thinking = block.thinking.as_deref().unwrap_or_default();
                reasoning.push_str(thinking);
                let mut detail = String::from(r#"{"type":"reasoning.text","text":"#);
                detail.push_str(&json_string(thinking));
                if let Some(signature) = block.signature {
                    detail.push_str(r#","signature":"#);
                    detail.push_str(signature.get());
                }
                detail.push_str(r#","format":"anthropic-claude-v1"}"#);
                details.push(detail);
            }
            "redacted_thinking" => details.push(format!(
                r#"{{"type":"reasoning.encrypted","data":{},"format":"anthropic-claude-v1"}}"#,
                raw(block.data)
            )),
            "tool_use" => {
                // Compact, as OpenAI writes arguments.
                let input = block.input.and_then(|i| serde_json::from_str::<Value>(i.get()).ok()).unwrap_or(json!({}));
                calls.push(format!(
                    r#"{{"id":{},"type":"function","index":{},"function":{{"name":{},"arguments":{}}}}}"#,
                    raw(block.id),
                    calls.len(),
                    raw(block.name),
                    json_string(&input.to_string())
                ));
            }
            other => {
                return Err(untranslatable(
                    format!("content[{k}].type"),
                    format!("{other:?} blocks have no Chat Completions equivalent"),
                ));
            }
        }
    }
    let stop = answer.stop_reason.as_deref().unwrap_or_default();
    let finish = finish_reason(stop)
        .ok_or_else(|| untranslatable("stop_reason", format!("{stop:?} is not a stop reason this version knows")))?;
    let content =
        if text.is_empty() && (!calls.is_empty() || stop == "refusal") { "null".into() } else { json_string(&text) };
    let mut message = format!(r#"{{"role":"assistant","content":{content}"#);
    if !calls.is_empty() {
        message.push_str(&format!(r#","tool_calls":[{}]"#, calls.join(",")));
    }
    if !reasoning.is_empty() {
        message.push_str(&format!(r#","reasoning":{}"#, json_string(&reasoning)));
    }
    if !details.is_empty() {
        message.push_str(&format!(r#","reasoning_details":[{}]"#, details.join(",")));
    }
    if stop == "refusal" {
        // The refusal's explanation, where OpenAI's callers look for one.
        let explanation = answer
            .stop_details
            .as_ref()
            .and_then(|d| d.explanation.as_deref())
            .unwrap_or("the model declined to answer");
        message.push_str(&format!(r#","refusal":{}"#, json_string(explanation)));
    }
    message.push('}');
    let usage = answer.usage.and_then(openai::usage_of).unwrap_or_default();
    let out = format!(
        r#"{{"id":{},"object":"chat.completion","created":{created},"model":{},"choices":[{{"index":0,"message":{message},"finish_reason":"{finish}"}}],"usage":{}}}"#,
        raw(answer.id),
        json_string(model),
        openai::usage_text(&usage)
    );
    Ok((out.into_bytes(), usage))
}

/// The fields of a Messages answer that the translation reads.
#[derive(Deserialize)]
struct AnswerPeek<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<Vec<ContentPeek<'a>>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stop_details: Option<StopDetailsPeek<'a>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ContentPeek<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    signature: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StopDetailsPeek<'a> {
    #[serde(borrow, default)]
    explanation: Option<Cow<'a, str>>,
}

/// The keys [`event_info`] looks for, with their searchers built once.
struct EventKeys {
    output: [Finder<'static>; 3],
    usage: Finder<'static>,
    tool_use: Finder<'static>,
    block_start: Finder<'static>,
    message_start: Finder<'static>,
    message_stop: Finder<'static>,
    error: Finder<'static>,
    text_delta: Finder<'static>,
}

static EVENT_KEYS: LazyLock<EventKeys> = LazyLock::new(|| EventKeys {
    output: [Finder::new(b"\"text\""), Finder::new(b"\"thinking\""), Finder::new(b"\"partial_json\"")],
    usage: Finder::new(b"\"usage\""),
    tool_use: Finder::new(b"\"tool_use\""),
    block_start: Finder::new(b"\"content_block_start\""),
    message_start: Finder::new(b"\"message_start\""),
    message_stop: Finder::new(b"\"message_stop\""),
    error: Finder::new(b"\"error\""),
    text_delta: Finder::new(b"\"text_delta\""),
});

/// Reads one `data:` payload of a Messages stream, as [`openai::chunk_info`] reads a chunk: its
/// output (text, thinking, tool input), a tool use's start, and its usage (`message_start`
/// reports the prompt, `message_delta` the completion). It scans, without parsing the event.
pub fn event_info(data: &[u8]) -> ChunkInfo {
    if !data.starts_with(b"{") {
        return ChunkInfo::default();
    }
    let keys = &*EVENT_KEYS;
    let output_bytes = openai::string_bytes(data, &keys.output);
    let starts_tool_use = keys.block_start.find(data).is_some() && keys.tool_use.find(data).is_some();
    let usage = openai::usage_in(data, &keys.usage);
    let partial_usage = usage.is_some() && keys.message_start.find(data).is_some();
    ChunkInfo { has_output: output_bytes > 0 || starts_tool_use, output_bytes, usage, partial_usage }
}

/// A Messages request passed through without the routing fields only the sidecar reads
/// (`fallbacks`, or `models`), for `model`. Anthropic refuses fields it does not know.
pub fn without_fallbacks(body: &[u8], model: &str) -> Result<Vec<u8>, Untranslatable> {
    let mut request: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| untranslatable("", format!("the body is not a JSON object: {e}")))?;
    request.remove("fallbacks");
    request.remove("models");
    request.insert("model".into(), Value::from(model));
    serde_json::to_vec(&request).map_err(|e| untranslatable("", e.to_string()))
}

/// Whether `kind` is an error type Anthropic names.
pub fn is_error_type(kind: &str) -> bool {
    ERROR_TYPES.iter().any(|(_, t)| *t == kind)
}

/// SSE events with `message_start`'s `message.model` renamed to `model_json` (a JSON string
/// literal), for answers served by a route other than the one asked for; other events are kept
/// as they are.
pub fn rename_events(events: &[u8], model_json: &str) -> Vec<u8> {
    let Ok(model) = serde_json::from_str::<Value>(model_json) else { return events.to_vec() };
    let mut out = Vec::with_capacity(events.len() + 32);
    for (i, line) in events.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        let renamed = line
            .strip_prefix(b"data: ")
            .filter(|data| EVENT_KEYS.message_start.find(data).is_some())
            .and_then(|data| serde_json::from_slice::<Value>(data.strip_suffix(b"\r").unwrap_or(data)).ok())
            .and_then(|mut value| {
                *value.get_mut("message")?.get_mut("model")? = model.clone();
                Some(value)
            });
        match renamed {
            Some(value) => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(value.to_string().as_bytes());
                if line.ends_with(b"\r") {
                    out.push(b'\r');
                }
            }
            None => out.extend_from_slice(line),
        }
    }
    out
}

/// How one whole event of a Messages stream passed through ends it: an `error` event (its type
/// and message), `message_stop`, or neither. Only events that mention either are parsed.
pub fn event_end(event: &[u8]) -> StreamEnd {
    for data in super::sse::payloads(event) {
        let keys = &*EVENT_KEYS;
        if keys.message_stop.find(data).is_some() {
            return StreamEnd::Done;
        }
        if keys.error.find(data).is_none() {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<Value>(data) else { continue };
        if value.get("type").and_then(Value::as_str) == Some("error") {
            let error = value.get("error").unwrap_or(&Value::Null);
            let field = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            return StreamEnd::Error { kind: field("type"), message: field("message") };
        }
    }
    StreamEnd::Open
}

/// Anthropic's event stream, translated event by event into `chat.completion.chunk` events:
/// nothing is held back (a text delta becomes a chunk as it arrives), several tool calls keep
/// their own indexes, and the stream ends with the finish reason, a usage chunk and
/// `data: [DONE]`, or with the upstream's `error` event as [`StreamEnd::Error`].
///
/// Every event of a translated stream passes through here, so events are read into borrowed
/// fields and chunks are written straight into the output, without building JSON values.
#[derive(Debug, Default)]
pub struct ChunkStream {
    model: String,
    created: u64,
    /// `data: {"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":[{"index":0,"delta":`
    /// for the current message id.
    head: String,
    /// Content block index -> tool call index, for the blocks that are tool uses.
    tools: Vec<(u64, usize)>,
    pub usage: Usage,
    finish: Option<&'static str>,
    /// End with the usage chunk, as OpenAI does when `stream_options.include_usage` is set.
    usage_chunk: bool,
}

/// The fields of a Messages event that the translation reads; the rest stays unread.
#[derive(Deserialize)]
struct EventPeek<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<DeltaPeek<'a>>,
    #[serde(borrow, default)]
    content_block: Option<BlockPeek<'a>>,
    #[serde(borrow, default)]
    message: Option<MessageStartPeek<'a>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// `message_start`'s message.
#[derive(Deserialize)]
struct MessageStartPeek<'a> {
    #[serde(borrow, default)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

/// `content_block_start`'s block.
#[derive(Deserialize)]
struct BlockPeek<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// A `content_block_delta`'s or `message_delta`'s `delta`.
#[derive(Deserialize)]
struct DeltaPeek<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    signature: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
}

/// The text of a `text_delta` event as the JSON string literal it is in the event, found by
/// scanning rather than parsing (text deltas are most of a stream); `None` for any other event,
/// and for one whose text is not a well-formed string or has a second `text` key (which one is
/// the delta's depends on nesting, not order), which the parser then reads.
fn text_delta(data: &[u8]) -> Option<&[u8]> {
    let keys = &*EVENT_KEYS;
    keys.text_delta.find(data)?;
    let mut texts = openai::values_of(data, &keys.output[0]);
    let (Some(value), None) = (texts.next(), texts.next()) else { return None };
    let literal = openai::string_literal(data, value)?;
    serde_json::from_slice::<Cow<'_, str>>(literal).ok()?;
    Some(literal)
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn fault(message: String) -> StreamEnd {
    StreamEnd::Error { kind: "api_error".into(), message }
}

impl ChunkStream {
    pub fn new(model: &str, created: u64) -> ChunkStream {
        let mut stream = ChunkStream { model: model.to_string(), created, usage_chunk: true, ..ChunkStream::default() };
        stream.set_id("");
        stream
    }

    /// Leaves out the usage chunk, for a caller that did not ask for it.
    pub fn without_usage_chunk(mut self) -> ChunkStream {
        self.usage_chunk = false;
        self
    }

    fn set_id(&mut self, id: &str) {
        let mut head = Vec::with_capacity(128);
        head.extend_from_slice(b"data: {\"id\":");
        push_json_str(&mut head, id);
        head.extend_from_slice(
            format!(",\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":", self.created).as_bytes(),
        );
        push_json_str(&mut head, &self.model);
        head.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":");
        self.head = String::from_utf8(head).unwrap_or_default();
    }

    /// Translates one whole event (its lines and blank line) into chunk events appended to `out`.
    pub fn event(&mut self, event: &[u8], out: &mut Vec<u8>) -> StreamEnd {
        let mut end = StreamEnd::Open;
        for data in super::sse::payloads(event) {
            if let Some(text) = text_delta(data) {
                // The text is a JSON string in both formats: copied as it is.
                self.open(out);
                out.extend_from_slice(b"{\"content\":");
                out.extend_from_slice(text);
                self.close(out, b"}", None);
                continue;
            }
            let Ok(data) = serde_json::from_slice::<EventPeek<'_>>(data) else {
                return fault("the provider sent an event that is not JSON".into());
            };
            end = self.data(&data, out);
            if end != StreamEnd::Open {
                break;
            }
        }
        end
    }

    fn data(&mut self, data: &EventPeek<'_>, out: &mut Vec<u8>) -> StreamEnd {
        let index = data.index;
        match data.kind.as_ref() {
            "content_block_delta" => {
                let Some(delta) = &data.delta else {
                    return fault("the provider streamed a content_block_delta without its delta".into());
                };
                match delta.kind.as_deref() {
                    Some("text_delta") => {
                        self.open(out);
                        out.extend_from_slice(b"{\"content\":");
                        push_json_str(out, delta.text.as_deref().unwrap_or_default());
                        self.close(out, b"}", None);
                    }
                    Some("input_json_delta") => {
                        let n = self.tools.iter().find(|(block, _)| *block == index).map_or(0, |(_, n)| *n);
                        self.open(out);
                        out.extend_from_slice(
                            format!("{{\"tool_calls\":[{{\"index\":{n},\"function\":{{\"arguments\":").as_bytes(),
                        );
                        push_json_str(out, delta.partial_json.as_deref().unwrap_or_default());
                        self.close(out, b"}}]}", None);
                    }
                    Some("thinking_delta") => {
                        let thinking = delta.thinking.as_deref().unwrap_or_default();
                        self.open(out);
                        out.extend_from_slice(b"{\"reasoning\":");
                        push_json_str(out, thinking);
                        out.extend_from_slice(b",\"reasoning_details\":[{\"type\":\"reasoning.text\",\"text\":");
                        push_json_str(out, thinking);
                        self.close(out, b",\"format\":\"anthropic-claude-v1\"}]}", None);
                    }
                    Some("signature_delta") => {
                        self.open(out);
                        out.extend_from_slice(b"{\"reasoning_details\":[{\"type\":\"reasoning.text\",\"signature\":");
                        push_json_str(out, delta.signature.as_deref().unwrap_or_default());
                        self.close(out, b",\"format\":\"anthropic-claude-v1\"}]}", None);
                    }
                    other => {
                        return fault(format!(
                            "the provider streamed a {other:?} delta, which has no Chat Completions equivalent"
                        ));
                    }
                }
            }
            "message_start" => {
                if let Some(message) = &data.message {
                    self.set_id(&message.id);
                    self.usage = message.usage.and_then(openai::usage_of).unwrap_or_default();
                }
                self.open(out);
                self.close(out, br#"{"role":"assistant","content":""}"#, None);
            }
            "content_block_start" => {
                let Some(block) = &data.content_block else {
                    return fault("the provider streamed a content_block_start without its block".into());
                };
                let raw = |v: Option<&RawValue>| v.map_or("\"\"", RawValue::get).to_string();
                match Some(block.kind.as_ref()) {
                    Some("text") => {
                        if let Some(text) = block.text.as_deref().filter(|t| !t.is_empty()) {
                            self.open(out);
                            out.extend_from_slice(b"{\"content\":");
                            push_json_str(out, text);
                            self.close(out, b"}", None);
                        }
                    }
                    Some("tool_use") => {
                        let n = self.tools.len();
                        self.tools.push((index, n));
                        let (id, name) = (raw(block.id), raw(block.name));
                        self.open(out);
                        let call = format!(
                            r#"{{"tool_calls":[{{"index":{n},"id":{id},"type":"function","function":{{"name":{name},"arguments":""}}}}]}}"#
                        );
                        self.close(out, call.as_bytes(), None);
                    }
                    Some("thinking") => {}
                    Some("redacted_thinking") => {
                        let data = raw(block.data);
                        self.open(out);
                        let detail = format!(
                            r#"{{"reasoning_details":[{{"type":"reasoning.encrypted","data":{data},"format":"anthropic-claude-v1"}}]}}"#
                        );
                        self.close(out, detail.as_bytes(), None);
                    }
                    other => {
                        return fault(format!(
                            "the provider streamed a {other:?} block, which has no Chat Completions equivalent"
                        ));
                    }
                }
            }
            "message_delta" => {
                // The completion, and in newer versions the prompt again: the larger count is the last.
                if let Some(usage) = data.usage.and_then(openai::usage_of) {
                    self.usage = self.usage.merge(usage);
                }
                if let Some(stop) = data.delta.as_ref().and_then(|d| d.stop_reason.as_deref()) {
                    let Some(finish) = finish_reason(stop) else {
                        return fault(format!(
                            "the provider ended with stop reason {stop:?}, which this version does not know"
                        ));
                    };
                    self.finish = Some(finish);
                    self.open(out);
                    self.close(out, b"{}", Some(finish));
                }
            }
            "message_stop" => {
                if self.usage_chunk {
                    let head = self.head.strip_suffix(r#"[{"index":0,"delta":"#).unwrap_or(&self.head);
                    out.extend_from_slice(head.as_bytes());
                    out.extend_from_slice(b"[],\"usage\":");
                    out.extend_from_slice(openai::usage_text(&self.usage).as_bytes());
                    out.extend_from_slice(b"}\n\n");
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                return StreamEnd::Done;
            }
            "content_block_stop" | "ping" => {}
            "error" => {
                let error: Value = data.error.and_then(|e| serde_json::from_str(e.get()).ok()).unwrap_or(Value::Null);
                let field = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                return StreamEnd::Error { kind: field("type"), message: field("message") };
            }
            // New event types are to be ignored, Anthropic's versioning policy says.
            _ => {}
        }
        StreamEnd::Open
    }

    /// Starts a chunk: everything up to its delta.
    fn open(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.head.as_bytes());
    }

    /// Ends a chunk: the rest of its `delta`, its finish reason, the event's end.
    fn close(&self, out: &mut Vec<u8>, delta_rest: &[u8], finish: Option<&str>) {
        out.extend_from_slice(delta_rest);
        match finish {
            None => out.extend_from_slice(b",\"finish_reason\":null}]}\n\n"),
            Some(finish) => {
                out.extend_from_slice(b",\"finish_reason\":");
                push_json_str(out, finish);
                out.extend_from_slice(b"}]}\n\n");
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::providers::arbitrary::{json, mutated, request, shuffled};
    use proptest::prelude::*;

    /// Messages of every role, their content plausible or anything.
    fn message() -> impl Strategy<Value = Value> {
        let role = prop::sample::select(vec!["system", "developer", "user", "assistant", "tool"]);
        let content = prop_oneof![
            ".{0,8}".prop_map(Value::from),
            Just(json!([{"type": "text", "text": "t", "cache_control": {"type": "ephemeral"}},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])),
            json(),
        ];
        let calls = prop_oneof![
            Just(Value::Null),
            Just(json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}])),
            json(),
        ];
        (role, content, calls).prop_map(|(role, content, calls)| {
            json!({"role": role, "content": content, "tool_calls": calls, "tool_call_id": "c1"})
        })
    }

    /// Chat requests with the fields the translation reads set to anything.
    fn chat() -> impl Strategy<Value = Vec<u8>> {
        let fields = prop::collection::vec(
            (
                prop::sample::select(vec![
                    "messages",
                    "max_tokens",
                    "stop",
                    "temperature",
                    "tools",
                    "tool_choice",
                    "response_format",
                    "reasoning_effort",
                    "n",
                    "user",
                    "parallel_tool_calls",
                ]),
                json(),
            ),
            0..4,
        );
        let messages = prop::collection::vec(message(), 1..5);
        (request(), messages, fields, any::<bool>()).prop_flat_map(|(mut body, messages, fields, bend)| {
            body["messages"] = Value::Array(messages);
            for (name, value) in fields {
                body[name] = value;
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
        })
    }

    /// Messages answers with every kind of block and stop reason, bent or not.
    pub(super) fn answer() -> impl Strategy<Value = Vec<u8>> {
        let block = prop_oneof![
            Just(json!({"type": "text", "text": "hi"})),
            Just(json!({"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1, 2]}})),
            Just(json!({"type": "thinking", "thinking": "hm", "signature": "sig"})),
            Just(json!({"type": "redacted_thinking", "data": "x"})),
            json(),
        ];
        let stop = prop::sample::select(vec![
            "end_turn",
            "stop_sequence",
            "max_tokens",
            "tool_use",
            "refusal",
            "pause_turn",
            "model_context_window_exceeded",
            "unknown",
        ]);
        let usage = (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(i, o, r, w)| {
            json!({"input_tokens": i, "output_tokens": o, "cache_read_input_tokens": r, "cache_creation_input_tokens": w})
        });
        (prop::collection::vec(block, 0..4), stop, usage, any::<bool>()).prop_flat_map(
            |(content, stop, usage, bend)| {
                let body =
                    json!({"id": "m", "type": "message", "content": content, "stop_reason": stop, "usage": usage});
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
            },
        )
    }

    /// Messages events as Anthropic sends them, and arbitrary JSON.
    fn event() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(
                json!({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "model": "claude", "content": [], "usage": {"input_tokens": 3, "cache_read_input_tokens": 1}}})
            ),
            Just(
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}})
            ),
            Just(
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{"}})
            ),
            Just(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}})),
            Just(
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}})
            ),
            Just(
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 2}})
            ),
            Just(json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})),
            Just(json!({"type": "message_stop"})),
            json(),
        ]
    }

    /// Event streams of plausible and arbitrary events, bent or not.
    pub(super) fn events() -> impl Strategy<Value = Vec<u8>> {
        (prop::collection::vec(event(), 0..8), any::<bool>()).prop_flat_map(|(events, bend)| {
            let bytes: Vec<u8> = events.iter().flat_map(|e| format!("event: x\ndata: {e}\n\n").into_bytes()).collect();
            if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_event_stream_becomes_chunks_or_ends_with_an_error(bytes in events()) {
            let mut stream = ChunkStream::new("chat", 0);
            let mut out = Vec::new();
            for range in crate::providers::sse::events(&bytes) {
                let before = out.len();
                let end = stream.event(&bytes[range], &mut out);
                for chunk in crate::providers::sse::payloads(&out[before..]) {
                    prop_assert!(chunk == b"[DONE]" || serde_json::from_slice::<Value>(chunk).is_ok());
                }
                if end != StreamEnd::Open {
                    prop_assert!(end != StreamEnd::Done || out.ends_with(b"data: [DONE]\n\n"));
                    break;
                }
            }
        }

        /// Key order carries no meaning: an event reads, ends and translates the same whatever
        /// the order of its keys (pydantic-based servers write `type` last).
        #[test]
        fn key_order_does_not_change_what_an_event_says(events in prop::collection::vec(event(), 1..8), seed in any::<u64>()) {
            let read = |datas: Vec<Vec<u8>>| {
                let mut stream = ChunkStream::new("chat", 0);
                let mut out = Vec::new();
                let mut seen = Vec::new();
                for data in datas {
                    let event = [b"event: x\ndata: ", &data[..], b"\n\n"].concat();
                    seen.push((event_info(&data), event_end(&event), stream.event(&event, &mut out)));
                }
                (seen, out)
            };
            let sorted = events.iter().map(|e| serde_json::to_vec(e).unwrap_or_default()).collect();
            let shuffled = events.iter().map(|e| shuffled(e, seed)).collect();
            prop_assert_eq!(read(sorted), read(shuffled));
        }

        #[test]
        fn any_passed_through_event_is_read_without_panicking_and_renamed_in_place(bytes in events()) {
            for range in crate::providers::sse::events(&bytes) {
                let event = &bytes[range];
                for payload in crate::providers::sse::payloads(event) {
                    let info = event_info(payload);
                    prop_assert!(info.output_bytes <= payload.len() as u64);
                    prop_assert!(!info.partial_usage || info.usage.is_some());
                }
                let _ = event_end(event);
            }
            let renamed = rename_events(&bytes, "\"other\"");
            prop_assert_eq!(renamed.iter().filter(|&&b| b == b'\n').count(), bytes.iter().filter(|&&b| b == b'\n').count());
        }

        #[test]
        fn any_body_passed_through_keeps_every_field_but_the_routing_ones(body in chat()) {
            if let Ok(out) = without_fallbacks(&body, "claude") {
                let out: Value = serde_json::from_slice(&out).expect("JSON");
                prop_assert_eq!(&out["model"], "claude");
                prop_assert!(out.get("fallbacks").is_none() && out.get("models").is_none());
            }
        }

        #[test]
        fn any_answer_is_translated_or_refused_never_a_silent_stop(body in answer()) {
            // Bytes the full parser refuses may still translate (what is not read is not checked).
            let parsed = serde_json::from_slice::<Value>(&body).ok();
            let stop = parsed.as_ref().and_then(|v| v["stop_reason"].as_str().map(String::from));
            if let Ok((out, usage)) = chat_completion(&body, "chat", 0) {
                let out: Value = serde_json::from_slice(&out).expect("JSON");
                let finish = out["choices"][0]["finish_reason"].as_str().unwrap_or_default().to_string();
                if parsed.is_some() {
                    prop_assert_eq!(Some(finish.as_str()), stop.as_deref().and_then(finish_reason));
                }
                let prompt = out["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                prop_assert!(prompt >= usage.cached_prompt && prompt >= usage.cache_write, "saturating, never wrapped");
            }
        }

        #[test]
        fn any_body_is_translated_or_refused_and_a_translation_is_a_messages_request(body in chat()) {
            if let Ok(out) = messages_request(&body, "claude", 1024) {
                let out: Value = serde_json::from_slice(&out).expect("JSON");
                prop_assert_eq!(&out["model"], "claude");
                prop_assert!(out["max_tokens"].as_u64().is_some_and(|n| n > 0));
                let messages = out["messages"].as_array().expect("messages");
                prop_assert!(messages.iter().all(|m| m["role"] == "user" || m["role"] == "assistant"));
                if let Some(budget) = out.pointer("/thinking/budget_tokens").and_then(Value::as_u64) {
                    prop_assert!(budget >= MIN_THINKING_BUDGET && budget < out["max_tokens"].as_u64().unwrap_or(0));
                }
            }
        }
    }
}
