//! Messages callers served by Chat Completions upstreams: the other direction of the parent
//! module. A Messages request becomes a chat request ([`chat_request`]), the chat answer a
//! Messages answer ([`messages_answer`]) and a chunk stream a Messages event stream
//! ([`EventStream`]). The same rule holds: what has an equivalent keeps its meaning (prompt-cache
//! markers and thinking signatures included), what has none is a clear error naming the field.
//!
//! | Messages | Chat Completions |
//! | --- | --- |
//! | `system` (a string or text blocks) | one `system` message (text parts keep `cache_control`) |
//! | `user` text and `image` blocks (`base64` or `url`) | `text` and `image_url` parts |
//! | `user` `tool_result` blocks | `tool` messages, before the user's other content, ids kept |
//! | `assistant` text and `tool_use` blocks | `content` and `tool_calls` (`input` as JSON text) |
//! | `assistant` `thinking` / `redacted_thinking` | `reasoning_details`, signatures unchanged |
//! | `max_tokens` | `max_completion_tokens` |
//! | `stop_sequences`, `temperature`, `top_p`, `metadata.user_id` | `stop`, `temperature`, `top_p`, `user` |
//! | `stream` | `stream` with `stream_options.include_usage` |
//! | `tools` (custom), `tool_choice`, `disable_parallel_tool_use` | `tools` (functions), `tool_choice`, `parallel_tool_calls: false` |
//! | `thinking` (enabled, with a budget) | `reasoning_effort` |
//! | `output_format` `json_schema` | `response_format` `json_schema` |

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::providers::Usage;
use crate::providers::openai::{
    self, ChatAnswerPeek, ChunkPeek, ChunkSink, json_string, no_finish, translate_chunks, unknown_finish,
};
use crate::providers::{StreamEnd, Untranslatable, id_suffix, untranslatable};

/// Thinking budgets below these map to the effort beside them; larger ones to `high`.
const EFFORTS: [(u64, &str); 2] = [(4096, "low"), (16384, "medium")];

/// Translates a Messages request body into a Chat Completions request for `model`.
pub fn chat_request(body: &[u8], model: &str) -> Result<Vec<u8>, Untranslatable> {
    let request: Value =
        serde_json::from_slice(body).map_err(|e| untranslatable("", format!("the body is not JSON: {e}")))?;
    let request = request.as_object().ok_or_else(|| untranslatable("", "the body is not a JSON object"))?;
    let mut out = Map::new();
    out.insert("model".into(), Value::from(model));

    let mut messages = Vec::new();
    match request.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
        Some(Value::Array(blocks)) => {
            let parts = blocks
                .iter()
                .enumerate()
                .map(|(k, b)| text_part(b, &format!("system[{k}]")))
                .collect::<Result<Vec<_>, _>>()?;
            messages.push(json!({"role": "system", "content": parts}));
        }
        Some(_) => return Err(untranslatable("system", "must be a string or an array of text blocks")),
    }
    let turns = request
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| untranslatable("messages", "must be a non-empty array"))?;
    let mut calls = std::collections::HashSet::new();
    for (i, turn) in turns.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].{field}");
        let content = turn.get("content").ok_or_else(|| untranslatable(at("content"), "missing"))?;
        match turn.get("role").and_then(Value::as_str) {
            Some("user") => user_turn(content, &at("content"), &calls, &mut messages)?,
            Some("assistant") => messages.push(assistant_turn(content, &at("content"), &mut calls)?),
            _ => return Err(untranslatable(at("role"), "must be user or assistant")),
        }
    }
    out.insert("messages".into(), Value::Array(messages));

    let max_tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .ok_or_else(|| untranslatable("max_tokens", "is required: a positive integer"))?;
    out.insert("max_completion_tokens".into(), Value::from(max_tokens));
    for field in ["temperature", "top_p"] {
        if let Some(v) = request.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(stops) = request.get("stop_sequences").filter(|v| !v.is_null()) {
        out.insert("stop".into(), stops.clone());
    }
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
        // Messages streams always end with usage; the chat stream must report it to say so.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(user) = request.get("metadata").and_then(|m| m.get("user_id")).and_then(Value::as_str) {
        out.insert("user".into(), Value::from(user));
    }
    if let Some(tools) = request.get("tools").filter(|v| !v.is_null()) {
        out.insert("tools".into(), Value::Array(tools_of(tools)?));
    }
    if let Some(choice) = request.get("tool_choice").filter(|v| !v.is_null()) {
        let kind = choice.get("type").and_then(Value::as_str);
        let mapped = match kind {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                let name = choice
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| untranslatable("tool_choice.name", "missing"))?;
                json!({"type": "function", "function": {"name": name}})
            }
            _ => return Err(untranslatable("tool_choice.type", "must be auto, any, tool or none")),
        };
        out.insert("tool_choice".into(), mapped);
        if choice.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    match request.get("thinking").filter(|v| !v.is_null()) {
        None => {}
        Some(thinking) => match thinking.get("type").and_then(Value::as_str) {
            Some("enabled") => {
                let budget = thinking
                    .get("budget_tokens")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| untranslatable("thinking.budget_tokens", "missing"))?;
                let effort = EFFORTS.iter().find(|(below, _)| budget < *below).map_or("high", |(_, e)| e);
                out.insert("reasoning_effort".into(), Value::from(effort));
            }
            Some("disabled") => {}
            _ => return Err(untranslatable("thinking.type", "must be enabled or disabled")),
        },
    }
    if let Some(format) = request.get("output_format").filter(|v| !v.is_null()) {
        let schema = format
            .get("schema")
            .filter(|s| s.is_object() && format.get("type").and_then(Value::as_str) == Some("json_schema"))
            .ok_or_else(|| untranslatable("output_format", "must be {\"type\": \"json_schema\", \"schema\": {...}}"))?;
        out.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
        );
    }
    for field in ["mcp_servers", "container"] {
        if request.get(field).is_some_and(|v| !v.is_null()) {
            return Err(untranslatable(field, "has no Chat Completions equivalent"));
        }
    }
    Ok(serde_json::to_vec(&Value::Object(out)).unwrap_or_default())
}

/// A text block as a text part, its `cache_control` kept.
fn text_part(block: &Value, at: &str) -> Result<Value, Untranslatable> {
    if block.get("type").and_then(Value::as_str) != Some("text") {
        return Err(untranslatable(format!("{at}.type"), "only text blocks are allowed here"));
    }
    let text =
        block.get("text").and_then(Value::as_str).ok_or_else(|| untranslatable(format!("{at}.text"), "missing"))?;
    let mut part = json!({"type": "text", "text": text});
    if let Some(cache) = block.get("cache_control") {
        part["cache_control"] = cache.clone();
    }
    Ok(part)
}

/// A user turn: its tool results as `tool` messages (answering the calls before), then its text
/// and images as one user message.
fn user_turn(
    content: &Value,
    at: &str,
    calls: &std::collections::HashSet<String>,
    out: &mut Vec<Value>,
) -> Result<(), Untranslatable> {
    let blocks = match content {
        Value::String(text) => {
            out.push(json!({"role": "user", "content": text}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => return Err(untranslatable(at, "must be a string or an array of blocks")),
    };
    let mut parts = Vec::new();
    for (k, block) in blocks.iter().enumerate() {
        let block_at = format!("{at}[{k}]");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(text_part(block, &block_at)?),
            Some("image") => parts.push(image_part(block, &block_at)?),
            Some("tool_result") => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| untranslatable(format!("{block_at}.tool_use_id"), "missing"))?;
                if !calls.contains(id) {
                    return Err(untranslatable(
                        format!("{block_at}.tool_use_id"),
                        format!("no earlier assistant turn has a tool_use with id {id:?}"),
                    ));
                }
                let content = match block.get("content") {
                    None | Some(Value::Null) => Value::from(""),
                    Some(Value::String(text)) => Value::from(text.as_str()),
                    Some(Value::Array(items)) => Value::Array(
                        items
                            .iter()
                            .enumerate()
                            .map(|(j, item)| text_part(item, &format!("{block_at}.content[{j}]")))
                            .collect::<Result<_, _>>()?,
                    ),
                    Some(_) => return Err(untranslatable(format!("{block_at}.content"), "must be text or blocks")),
                };
                if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                    // Chat Completions has no error flag; the model reads it from the text.
                    let text = match &content {
                        Value::Array(parts) => {
                            parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n")
                        }
                        other => other.as_str().unwrap_or_default().to_string(),
                    };
                    out.push(json!({"role": "tool", "tool_call_id": id, "content": format!("Error: {text}")}));
                    continue;
                }
                let mut message = json!({"role": "tool", "tool_call_id": id, "content": content});
                if let Some(cache) = block.get("cache_control") {
                    message["cache_control"] = cache.clone();
                }
                out.push(message);
            }
            Some(other) => {
                return Err(untranslatable(
                    format!("{block_at}.type"),
                    format!("{other:?} blocks have no Chat Completions equivalent"),
                ));
            }
            None => return Err(untranslatable(format!("{block_at}.type"), "missing")),
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_part(block: &Value, at: &str) -> Result<Value, Untranslatable> {
    let source = block.get("source").ok_or_else(|| untranslatable(format!("{at}.source"), "missing"))?;
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let field = |k: &str| {
                source
                    .get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| untranslatable(format!("{at}.source.{k}"), "missing"))
            };
            format!("data:{};base64,{}", field("media_type")?, field("data")?)
        }
        Some("url") => source
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| untranslatable(format!("{at}.source.url"), "missing"))?
            .to_string(),
        _ => return Err(untranslatable(format!("{at}.source.type"), "must be base64 or url")),
    };
    let mut part = json!({"type": "image_url", "image_url": {"url": url}});
    if let Some(cache) = block.get("cache_control") {
        part["cache_control"] = cache.clone();
    }
    Ok(part)
}

/// An assistant turn as one assistant message: text, tool calls, and thinking as
/// `reasoning_details` (signatures unchanged, so a later Anthropic target can check them).
fn assistant_turn(
    content: &Value,
    at: &str,
    calls: &mut std::collections::HashSet<String>,
) -> Result<Value, Untranslatable> {
    let blocks = match content {
        Value::String(text) => return Ok(json!({"role": "assistant", "content": text})),
        Value::Array(blocks) => blocks,
        _ => return Err(untranslatable(at, "must be a string or an array of blocks")),
    };
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    let mut details = Vec::new();
    for (k, block) in blocks.iter().enumerate() {
        let block_at = format!("{at}[{k}]");
        let field = |key: &str| {
            block.get(key).and_then(Value::as_str).ok_or_else(|| untranslatable(format!("{block_at}.{key}"), "missing"))
        };
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(field("text")?),
            Some("tool_use") => {
                let id = field("id")?;
                calls.insert(id.to_string());
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                tool_calls.push(json!({"id": id, "type": "function",
                    "function": {"name": field("name")?, "arguments": input.to_string()}}));
            }
            Some("thinking") => {
                let mut detail =
                    json!({"type": "reasoning.text", "text": field("thinking")?, "format": "anthropic-claude-v1"});
                if let Some(signature) = block.get("signature").filter(|s| s.as_str().is_some_and(|s| !s.is_empty())) {
                    detail["signature"] = signature.clone();
                }
                details.push(detail);
            }
            Some("redacted_thinking") => {
                details.push(
                    json!({"type": "reasoning.encrypted", "data": field("data")?, "format": "anthropic-claude-v1"}),
                );
            }
            Some(other) => {
                return Err(untranslatable(
                    format!("{block_at}.type"),
                    format!("{other:?} blocks have no Chat Completions equivalent"),
                ));
            }
            None => return Err(untranslatable(format!("{block_at}.type"), "missing")),
        }
    }
    let content = if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::from(text) };
    let mut message = json!({"role": "assistant", "content": content});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    if !details.is_empty() {
        message["reasoning_details"] = Value::Array(details);
    }
    Ok(message)
}

fn tools_of(tools: &Value) -> Result<Vec<Value>, Untranslatable> {
    let tools = tools.as_array().ok_or_else(|| untranslatable("tools", "must be an array"))?;
    tools
        .iter()
        .enumerate()
        .map(|(k, tool)| {
            // Server tools (web search, code execution, ...) run at Anthropic: nothing to translate.
            if tool.get("type").and_then(Value::as_str).is_some_and(|t| t != "custom") {
                return Err(untranslatable(
                    format!("tools[{k}].type"),
                    "only custom tools have a Chat Completions equivalent",
                ));
            }
            let name = tool
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| untranslatable(format!("tools[{k}].name"), "missing"))?;
            let mut function = json!({"name": name});
            if let Some(description) = tool.get("description").filter(|d| !d.is_null()) {
                function["description"] = description.clone();
            }
            function["parameters"] = tool.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}));
            let mut out = json!({"type": "function", "function": function});
            if let Some(cache) = tool.get("cache_control") {
                out["cache_control"] = cache.clone();
            }
            Ok(out)
        })
        .collect()
}

/// A chat `finish_reason` as a Messages `stop_reason`; `None` for one this version does not know.
pub fn stop_reason(finish_reason: &str) -> Option<&'static str> {
    Some(match finish_reason {
        "stop" => "end_turn",
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        "pause_turn" => "pause_turn",
        _ => return None,
    })
}

/// What Anthropic requires beside a `refusal` stop reason.
fn stop_details(explanation: Option<&str>) -> Value {
    json!({"type": "refusal", "category": null,
        "explanation": explanation.unwrap_or("The provider's content filter stopped the answer.")})
}

/// Usage in Anthropic's convention, as JSON text: `input_tokens` without the cache's reads and
/// writes.
pub fn usage_text(usage: &Usage) -> String {
    let input = usage.prompt.saturating_sub(usage.cached_prompt).saturating_sub(usage.cache_write);
    format!(
        r#"{{"input_tokens":{input},"output_tokens":{},"cache_read_input_tokens":{},"cache_creation_input_tokens":{}}}"#,
        usage.completion, usage.cached_prompt, usage.cache_write
    )
}

/// Translates a chat completion into a Messages answer named `model`.
pub fn messages_answer(answer: &[u8], model: &str) -> Result<Vec<u8>, Untranslatable> {
    let answer: ChatAnswerPeek<'_> =
        serde_json::from_slice(answer).map_err(|e| untranslatable("", format!("the answer is not JSON: {e}")))?;
    let choice = answer
        .choices
        .as_ref()
        .and_then(|c| c.first())
        .ok_or_else(|| untranslatable("choices", "the answer has no choice"))?;
    let message = choice.message.as_ref();
    let string = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<Cow<'_, str>>(r.get()).ok());
    let mut content: Vec<String> = Vec::new();
    if let Some(details) = message.and_then(|m| m.reasoning_details) {
        let details: Value = serde_json::from_str(details.get()).unwrap_or(Value::Null);
        content.extend(details.as_array().into_iter().flatten().filter_map(thinking_block).map(|b| b.to_string()));
    }
    if content.is_empty()
        && let Some(reasoning) = string(message.and_then(|m| m.reasoning)).filter(|r| !r.is_empty())
    {
        // Reasoning without a signature: shown, with an empty signature, never a made-up one.
        content.push(format!(r#"{{"type":"thinking","thinking":{},"signature":""}}"#, json_string(&reasoning)));
    }
    if let Some(text) = string(message.and_then(|m| m.content)).filter(|t| !t.is_empty()) {
        content.push(format!(r#"{{"type":"text","text":{}}}"#, json_string(&text)));
    }
    if let Some(calls) = message.and_then(|m| m.tool_calls) {
        let calls: Value = serde_json::from_str(calls.get()).unwrap_or(Value::Null);
        for (k, call) in calls.as_array().into_iter().flatten().enumerate() {
            let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
            let input: Value = if arguments.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(arguments).map_err(|e| {
                    untranslatable(format!("tool_calls[{k}].function.arguments"), format!("is not JSON: {e}"))
                })?
            };
            let block = json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or_default(),
                "name": call.pointer("/function/name").cloned().unwrap_or_default(), "input": input});
            content.push(block.to_string());
        }
    }
    let finish = choice.finish_reason.as_deref().unwrap_or_default();
    let stop = stop_reason(finish).ok_or_else(|| {
        untranslatable("finish_reason", format!("{finish:?} is not a finish reason this version knows"))
    })?;
    let usage = answer.usage.and_then(openai::usage_of).unwrap_or_default();
    let refusal = match stop {
        "refusal" => format!(r#","stop_details":{}"#, stop_details(string(message.and_then(|m| m.refusal)).as_deref())),
        _ => String::new(),
    };
    let out = format!(
        r#"{{"id":"msg_{}","type":"message","role":"assistant","model":{},"content":[{}],"stop_reason":"{stop}","stop_sequence":null{refusal},"usage":{}}}"#,
        id_suffix(&string(answer.id).unwrap_or_default()),
        json_string(model),
        content.join(","),
        usage_text(&usage)
    );
    Ok(out.into_bytes())
}

/// A `reasoning_details` entry as the thinking block it came from, if it carries one.
fn thinking_block(detail: &Value) -> Option<Value> {
    match detail.get("type").and_then(Value::as_str)? {
        "reasoning.text" => Some(json!({"type": "thinking", "thinking": detail.get("text")?.as_str()?,
            "signature": detail.get("signature").and_then(Value::as_str).unwrap_or_default()})),
        "reasoning.encrypted" => Some(json!({"type": "redacted_thinking", "data": detail.get("data")?.as_str()?})),
        _ => None,
    }
}

/// An error answer in Anthropic's shape.
pub fn error_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": "error", "error": {"type": kind, "message": message}})).unwrap_or_default()
}

/// The event that ends a Messages stream which broke after it started.
pub fn error_event(kind: &str, message: &str) -> Bytes {
    let data = json!({"type": "error", "error": {"type": kind, "message": message}});
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

/// The open block of an [`EventStream`]: which kind, at which Messages index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    /// A tool call, by its index among the answer's tool calls.
    Tool(u64),
}

/// A chat completion chunk stream, translated chunk by chunk into Messages events: text,
/// reasoning and each tool call become their own content blocks (a tool call's argument deltas
/// go to its block, by its index), and `[DONE]` closes the message with its stop reason and
/// usage (which the upstream was asked to report).
#[derive(Debug, Default)]
pub struct EventStream {
    model: String,
    started: bool,
    /// Every block so far, by Messages index.
    blocks: Vec<Block>,
    /// The blocks not stopped yet: at most one text or thinking block, and the tool calls whose
    /// arguments may still come (interleaved, by their index).
    open: Vec<usize>,
    stop: Option<&'static str>,
    refusal: Option<String>,
    usage: Usage,
}

impl EventStream {
    pub fn new(model: &str) -> EventStream {
        EventStream { model: model.to_string(), ..EventStream::default() }
    }

    /// Translates one whole chunk event (its lines and blank line) into Messages events.
    pub fn event(&mut self, event: &[u8], out: &mut Vec<u8>) -> StreamEnd {
        translate_chunks(self, event, out)
    }

    /// A tool call's delta: its block started when the call first appears, its arguments as
    /// `input_json_delta`s of that block.
    fn tool_call(&mut self, call: &Value, out: &mut Vec<u8>) {
        let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let at = match self.blocks.iter().position(|b| *b == Block::Tool(n)) {
            Some(at) => at,
            None => {
                self.close(out, |b| !matches!(b, Block::Tool(_)));
                let block = json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or_default(),
                    "name": call.pointer("/function/name").cloned().unwrap_or_default(), "input": {}});
                self.start(Block::Tool(n), &block.to_string(), out)
            }
        };
        if let Some(arguments) = call.pointer("/function/arguments").and_then(Value::as_str).filter(|a| !a.is_empty()) {
            block_delta(out, at, "input_json_delta", "partial_json", arguments);
        }
    }

    /// Makes `kind` (text or thinking) the open block, unless it already is; it closes the others.
    fn open_block(&mut self, kind: Block, out: &mut Vec<u8>) {
        if self.open.last().is_some_and(|&at| self.blocks[at] == kind) {
            return;
        }
        self.close(out, |_| true);
        let block = match kind {
            Block::Thinking => r#"{"type":"thinking","thinking":"","signature":""}"#,
            _ => r#"{"type":"text","text":""}"#,
        };
        self.start(kind, block, out);
    }

    /// Starts block `block` (its JSON text) of kind `kind`; returns its index.
    fn start(&mut self, kind: Block, block: &str, out: &mut Vec<u8>) -> usize {
        let at = self.blocks.len();
        self.blocks.push(kind);
        self.open.push(at);
        out.extend_from_slice(
            format!("event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":{at},\"content_block\":{block}}}\n\n")
                .as_bytes(),
        );
        at
    }

    /// A delta of the open text or thinking block: `{"type": kind, field: text}`.
    fn text_delta(&self, out: &mut Vec<u8>, kind: &str, field: &str, text: &str) {
        block_delta(out, self.open.last().copied().unwrap_or(0), kind, field, text);
    }

    /// Stops the open blocks that `which` selects, in index order.
    fn close(&mut self, out: &mut Vec<u8>, which: impl Fn(Block) -> bool) {
        let blocks = &self.blocks;
        let (stop, keep): (Vec<usize>, Vec<usize>) = self.open.iter().partition(|&&at| which(blocks[at]));
        self.open = keep;
        for at in stop {
            out.extend_from_slice(
                format!("event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":{at}}}\n\n")
                    .as_bytes(),
            );
        }
    }
}

impl ChunkSink for EventStream {
    fn chunk(&mut self, chunk: &ChunkPeek<'_>, out: &mut Vec<u8>) -> Result<(), StreamEnd> {
        if !self.started {
            self.started = true;
            let (id, model) = (id_suffix(chunk.id.as_deref().unwrap_or_default()), json_string(&self.model));
            out.extend_from_slice(
                format!("event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_{id}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{model},\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":0,\"output_tokens\":0}}}}}}\n\n").as_bytes(),
            );
        }
        if let Some(usage) = chunk.usage.and_then(openai::usage_of) {
            self.usage = usage;
        }
        let Some(choice) = chunk.choices.as_ref().and_then(|c| c.first()) else { return Ok(()) };
        if let Some(delta) = &choice.delta {
            let thinking = delta.reasoning_text();
            if let Some(thinking) = thinking {
                self.open_block(Block::Thinking, out);
                self.text_delta(out, "thinking_delta", "thinking", thinking);
            }
            if let Some(details) = delta.reasoning_details {
                let details: Value = serde_json::from_str(details.get()).unwrap_or(Value::Null);
                for detail in details.as_array().into_iter().flatten() {
                    if let Some(signature) = detail.get("signature").and_then(Value::as_str).filter(|s| !s.is_empty()) {
                        self.open_block(Block::Thinking, out);
                        self.text_delta(out, "signature_delta", "signature", signature);
                    }
                }
            }
            if let Some(content) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                self.open_block(Block::Text, out);
                self.text_delta(out, "text_delta", "text", content);
            }
            if let Some(refusal) = delta.refusal.as_deref().filter(|t| !t.is_empty()) {
                self.refusal.get_or_insert_with(String::new).push_str(refusal);
            }
            for call in delta.tool_call_deltas() {
                self.tool_call(&call, out);
            }
        }
        if let Some(finish) = choice.finish_reason.as_deref() {
            self.stop = Some(stop_reason(finish).ok_or_else(|| unknown_finish(finish))?);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> StreamEnd {
        let Some(stop) = self.stop else {
            return no_finish();
        };
        self.close(out, |_| true);
        let mut delta = json!({"stop_reason": stop, "stop_sequence": null});
        if stop == "refusal" {
            delta["stop_details"] = stop_details(self.refusal.as_deref());
        }
        out.extend_from_slice(
            format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{delta},\"usage\":{}}}\n\n",
                usage_text(&self.usage)
            )
            .as_bytes(),
        );
        out.extend_from_slice(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        StreamEnd::Done
    }
}

/// A `content_block_delta` event of block `at`, written straight out: deltas are most of a stream.
fn block_delta(out: &mut Vec<u8>, at: usize, kind: &str, field: &str, text: &str) {
    out.extend_from_slice(
        format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":{at},\"delta\":{{\"type\":\"{kind}\",\"{field}\":").as_bytes(),
    );
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
    out.extend_from_slice(b"}}\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::arbitrary::{chat_answer, chunk, chunks, json, mutated, shuffled};
    use crate::providers::responses::ResponseStream;
    use crate::providers::sse;
    use proptest::prelude::*;

    /// Messages requests with plausible and arbitrary turns, blocks and fields, bent or not.
    fn request() -> impl Strategy<Value = Vec<u8>> {
        let block = prop_oneof![
            Just(json!({"type": "text", "text": "t", "cache_control": {"type": "ephemeral"}})),
            Just(json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}})),
            Just(json!({"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}})),
            Just(
                json!({"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "r"}], "is_error": true})
            ),
            Just(json!({"type": "thinking", "thinking": "hm", "signature": "sig"})),
            json(),
        ];
        let content = prop_oneof![
            ".{0,8}".prop_map(Value::from),
            prop::collection::vec(block, 0..4).prop_map(Value::Array),
            json()
        ];
        let turn = (prop::sample::select(vec!["user", "assistant", "system"]), content)
            .prop_map(|(role, content)| json!({"role": role, "content": content}));
        let field = (
            prop::sample::select(vec![
                "system",
                "max_tokens",
                "tools",
                "tool_choice",
                "thinking",
                "output_format",
                "stop_sequences",
                "metadata",
            ]),
            json(),
        );
        (prop::collection::vec(turn, 0..5), prop::collection::vec(field, 0..4), any::<bool>()).prop_flat_map(
            |(turns, fields, bend)| {
                let mut body = json!({"model": "m", "max_tokens": 16, "messages": turns});
                for (name, value) in fields {
                    body[name] = value;
                }
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_request_is_translated_or_refused_and_a_translation_is_a_chat_request(body in request()) {
            if let Ok(out) = chat_request(&body, "gpt") {
                let out: Value = serde_json::from_slice(&out).expect("JSON");
                prop_assert_eq!(&out["model"], "gpt");
                prop_assert!(out["max_completion_tokens"].as_u64().is_some_and(|n| n > 0));
                let messages = out["messages"].as_array().expect("messages");
                prop_assert!(messages.iter().all(|m| ["system", "user", "assistant", "tool"].contains(&m["role"].as_str().unwrap_or_default())));
            }
        }

        #[test]
        fn any_chat_answer_is_translated_or_refused_never_a_silent_end_turn(body in chat_answer()) {
            // Bytes the full parser refuses may still translate (what is not read is not checked).
            let parsed = serde_json::from_slice::<Value>(&body).ok();
            let finish = parsed.as_ref().and_then(|v| v.pointer("/choices/0/finish_reason").and_then(Value::as_str).map(String::from));
            if let Ok(out) = messages_answer(&body, "claude") {
                let out: Value = serde_json::from_slice(&out).expect("JSON");
                if parsed.is_some() {
                    prop_assert_eq!(out["stop_reason"].as_str(), finish.as_deref().and_then(stop_reason));
                }
                prop_assert!(out["usage"]["input_tokens"].as_u64().is_some(), "saturating, never wrapped");
            }
        }

        /// Key order carries no meaning: a chunk stream reads and translates (to Messages events
        /// and to Responses events) the same whatever the order of its chunks' keys.
        #[test]
        fn key_order_does_not_change_what_a_chunk_says(chunks in prop::collection::vec(chunk(), 1..8), seed in any::<u64>()) {
            let read = |datas: Vec<Vec<u8>>| {
                let (mut messages, mut responses) = (EventStream::new("claude"), ResponseStream::new("gpt", 0));
                let (mut to_messages, mut to_responses) = (Vec::new(), Vec::new());
                let mut seen = Vec::new();
                for data in datas.iter().map(Vec::as_slice).chain([&b"[DONE]"[..]]) {
                    let event = [b"data: ", data, b"\n\n"].concat();
                    let ends = (messages.event(&event, &mut to_messages), responses.event(&event, &mut to_responses));
                    seen.push((openai::chunk_info(data), ends));
                }
                (seen, to_messages, to_responses)
            };
            let sorted = chunks.iter().map(|c| serde_json::to_vec(c).unwrap_or_default()).collect();
            let shuffled = chunks.iter().map(|c| shuffled(c, seed)).collect();
            prop_assert_eq!(read(sorted), read(shuffled));
        }

        #[test]
        fn any_chunk_stream_becomes_events_or_ends_with_an_error(bytes in chunks()) {
            let mut stream = EventStream::new("claude");
            let mut out = Vec::new();
            for range in sse::events(&bytes) {
                let before = out.len();
                let end = stream.event(&bytes[range], &mut out);
                for data in sse::payloads(&out[before..]) {
                    prop_assert!(serde_json::from_slice::<Value>(data).is_ok());
                }
                if end != StreamEnd::Open {
                    let stop: &[u8] = br#"data: {"type":"message_stop"}"#;
                    prop_assert!(end != StreamEnd::Done || out.ends_with(&[stop, b"\n\n"].concat()), "ends with message_stop");
                    break;
                }
            }
        }
    }
}
