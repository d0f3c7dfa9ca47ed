//! OpenAI's Responses API (`POST /v1/responses`), for callers whose target does not speak it: the
//! request becomes a Chat Completions request ([`chat_request`]), the chat answer a response
//! ([`response_answer`]) and a chunk stream the Responses event sequence ([`ResponseStream`]).
//! Chat Completions is the hub: an `api: anthropic` target gets the chat request translated on to
//! Messages, and its answer comes back the same way, so each format pair has one translation.
//! Stateless only: what needs a store of earlier responses is refused, naming the field.
//!
//! | Responses | Chat Completions |
//! | --- | --- |
//! | `instructions` | a leading `system` message |
//! | `input` as a string | one `user` message |
//! | `message` items (`user`, `system`, `developer`, `assistant`) | messages of the same role |
//! | `input_text`, `input_image` (URL, `file_id`), `input_file` parts | `text`, `image_url`, `file` parts |
//! | `output_text` and `refusal` parts of `assistant` messages | `content` and `refusal` |
//! | `function_call` items | the assistant's `tool_calls`, `call_id` as the call's `id` |
//! | `function_call_output` items | `tool` messages, `call_id` as `tool_call_id` |
//! | `reasoning` items | left out: reasoning of earlier turns is not sent back |
//! | `tools` (functions), `tool_choice`, `parallel_tool_calls` | `tools`, `tool_choice`, `parallel_tool_calls` |
//! | `text.format` (`json_object`, `json_schema`) | `response_format` |
//! | `max_output_tokens` | `max_completion_tokens` |
//! | `reasoning.effort` | `reasoning_effort` (thinking budgets for Anthropic) |
//! | `temperature`, `top_p`, `user`, `stream` | the same (`stream` with `stream_options.include_usage`) |
//!
//! Answers: reasoning becomes a `reasoning` item with its text as a summary, never output text;
//! content an `output_text` part of a `message` item; each tool call a `function_call` item with
//! its `call_id`; `finish_reason` the status (`length`: `incomplete` with `max_output_tokens`,
//! `content_filter`: `incomplete` with `content_filter`); usage the Responses shape.

use std::borrow::Cow;
use std::io::Write;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::openai::{
    self, ChatAnswerPeek, ChunkInfo, ChunkPeek, ChunkSink, json_string, no_finish, translate_chunks, unknown_finish,
};
use super::{StreamEnd, Untranslatable, Usage, id_suffix, sse, untranslatable};

/// Request fields that only make sense with a store of earlier responses, and what each does.
const NEEDS_STORE: [(&str, &str); 4] = [
    ("previous_response_id", "continues a stored response"),
    ("conversation", "continues a stored conversation"),
    ("prompt", "names a stored prompt template"),
    ("background", "runs the response in the background, to be fetched later"),
];

/// Translates a Responses request body into a Chat Completions request for `model`.
pub fn chat_request(body: &[u8], model: &str) -> Result<Vec<u8>, Untranslatable> {
    let request: Value =
        serde_json::from_slice(body).map_err(|e| untranslatable("", format!("the body is not JSON: {e}")))?;
    let request = request.as_object().ok_or_else(|| untranslatable("", "the body is not a JSON object"))?;
    for (field, what) in NEEDS_STORE {
        let set = match request.get(field) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(needs_store(field, what));
        }
    }
    if request.get("store").and_then(Value::as_bool) == Some(true) {
        return Err(needs_store("store", "keeps the response to be read or continued later"));
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::from(model));

    let mut messages = Vec::new();
    match request.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
        Some(_) => return Err(untranslatable("instructions", "must be a string")),
    }
    match request.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => input_items(items, &mut messages)?,
        _ => return Err(untranslatable("input", "must be a string or an array of input items")),
    }
    out.insert("messages".into(), Value::Array(messages));

    if let Some(max) = request.get("max_output_tokens").filter(|v| !v.is_null()) {
        let max = max
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| untranslatable("max_output_tokens", "must be a positive integer"))?;
        out.insert("max_completion_tokens".into(), Value::from(max));
    }
    for field in ["temperature", "top_p", "user", "parallel_tool_calls"] {
        if let Some(v) = request.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(effort) = request.get("reasoning").and_then(|r| r.get("effort")).filter(|v| !v.is_null()) {
        out.insert("reasoning_effort".into(), effort.clone());
    }
    if let Some(format) = request.get("text").and_then(|t| t.get("format")).filter(|v| !v.is_null()) {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                out.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                let mut schema = Map::new();
                for field in ["name", "schema", "strict", "description"] {
                    if let Some(v) = format.get(field) {
                        schema.insert(field.into(), v.clone());
                    }
                }
                out.insert("response_format".into(), json!({"type": "json_schema", "json_schema": schema}));
            }
            _ => return Err(untranslatable("text.format.type", "must be text, json_object or json_schema")),
        }
    }
    if let Some(tools) = request.get("tools").filter(|v| !v.is_null()) {
        let tools = tools_of(tools)?;
        // Chat Completions refuses an empty list.
        if !tools.is_empty() {
            out.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = request.get("tool_choice").filter(|v| !v.is_null()) {
        let choice = match choice {
            Value::String(mode) if ["auto", "none", "required"].contains(&mode.as_str()) => choice.clone(),
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or_default()}})
            }
            _ => return Err(untranslatable("tool_choice", "must be auto, none, required or a function")),
        };
        out.insert("tool_choice".into(), choice);
    }
    if request.get("top_logprobs").is_some_and(|v| !v.is_null()) {
        return Err(untranslatable("top_logprobs", "log probabilities cannot be translated"));
    }
    if request.get("truncation").and_then(Value::as_str) == Some("auto") {
        return Err(untranslatable("truncation", "auto truncation needs the provider's own context management"));
    }
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
        // A response always ends with its usage: the chat stream must report it.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    serde_json::to_vec(&Value::Object(out)).map_err(|e| untranslatable("", e.to_string()))
}

fn needs_store(field: &str, what: &str) -> Untranslatable {
    untranslatable(
        field,
        format!(
            "{what}, which needs a response store; only a target that speaks the Responses API natively keeps one (send the whole conversation in `input` instead)"
        ),
    )
}

/// The chat messages of `input` items. Consecutive assistant output (text and function calls)
/// becomes one assistant message, as chat completions carry it.
fn input_items(items: &[Value], messages: &mut Vec<Value>) -> Result<(), Untranslatable> {
    // The assistant message being assembled from consecutive assistant items.
    let mut assistant: Option<Map<String, Value>> = None;
    let flush = |assistant: &mut Option<Map<String, Value>>, messages: &mut Vec<Value>| {
        if let Some(message) = assistant.take() {
            messages.push(Value::Object(message));
        }
    };
    for (i, item) in items.iter().enumerate() {
        let at = |field: &str| format!("input[{i}].{field}");
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            None | Some("message") => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                let content = item.get("content").ok_or_else(|| untranslatable(at("content"), "missing"))?;
                match role {
                    "assistant" => {
                        let message = assistant
                            .get_or_insert_with(|| Map::from_iter([("role".to_string(), Value::from("assistant"))]));
                        assistant_content(content, &at("content"), message)?;
                    }
                    "user" | "system" | "developer" => {
                        flush(&mut assistant, messages);
                        let content = match content {
                            Value::String(_) => content.clone(),
                            Value::Array(parts) => Value::Array(
                                parts
                                    .iter()
                                    .enumerate()
                                    .map(|(k, p)| input_part(p, &at(&format!("content[{k}]"))))
                                    .collect::<Result<_, _>>()?,
                            ),
                            _ => return Err(untranslatable(at("content"), "must be a string or an array of parts")),
                        };
                        messages.push(json!({"role": role, "content": content}));
                    }
                    _ => return Err(untranslatable(at("role"), "must be user, assistant, system or developer")),
                }
            }
            Some("function_call") => {
                let text = |field: &str| {
                    item.get(field).and_then(Value::as_str).ok_or_else(|| untranslatable(at(field), "must be a string"))
                };
                let call = json!({"id": text("call_id")?, "type": "function",
                    "function": {"name": text("name")?, "arguments": text("arguments")?}});
                let message =
                    assistant.get_or_insert_with(|| Map::from_iter([("role".to_string(), Value::from("assistant"))]));
                if let Value::Array(calls) = message.entry("tool_calls").or_insert_with(|| Value::Array(Vec::new())) {
                    calls.push(call);
                }
            }
            Some("function_call_output") => {
                flush(&mut assistant, messages);
                let call_id = item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| untranslatable(at("call_id"), "must be a string"))?;
                let output = match item.get("output") {
                    Some(Value::String(text)) => Value::from(text.as_str()),
                    Some(Value::Array(parts)) => Value::Array(
                        parts
                            .iter()
                            .enumerate()
                            .map(|(k, p)| input_part(p, &at(&format!("output[{k}]"))))
                            .collect::<Result<_, _>>()?,
                    ),
                    _ => return Err(untranslatable(at("output"), "must be a string or an array of parts")),
                };
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            // Earlier reasoning is the provider's own; no other provider can read it back.
            Some("reasoning") => {}
            Some("item_reference") => {
                return Err(needs_store(&at("type"), "refers to a stored item"));
            }
            Some(other) => {
                return Err(untranslatable(
                    at("type"),
                    format!("{other:?} items cannot be translated (messages, function calls and their outputs can)"),
                ));
            }
        }
    }
    flush(&mut assistant, messages);
    Ok(())
}

/// An assistant message's content, added to the chat message being assembled.
fn assistant_content(content: &Value, at: &str, message: &mut Map<String, Value>) -> Result<(), Untranslatable> {
    let mut text = String::new();
    match content {
        Value::String(s) => text.push_str(s),
        Value::Array(parts) => {
            for (k, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("output_text" | "input_text" | "text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default());
                    }
                    Some("refusal") => {
                        let refusal = part.get("refusal").and_then(Value::as_str).unwrap_or_default();
                        message.insert("refusal".into(), Value::from(refusal));
                    }
                    _ => {
                        return Err(untranslatable(format!("{at}[{k}].type"), "must be output_text or refusal"));
                    }
                }
            }
        }
        _ => return Err(untranslatable(at, "must be a string or an array of parts")),
    }
    if !text.is_empty() {
        let joined = match message.get("content").and_then(Value::as_str) {
            Some(earlier) => format!("{earlier}{text}"),
            None => text,
        };
        message.insert("content".into(), Value::from(joined));
    }
    Ok(())
}

/// An input content part as a chat content part.
fn input_part(part: &Value, at: &str) -> Result<Value, Untranslatable> {
    let field = |name: &str| part.get(name).filter(|v| !v.is_null());
    match part.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => {
            Ok(json!({"type": "text", "text": field("text").cloned().unwrap_or_default()}))
        }
        Some("input_image") => {
            let mut image = Map::new();
            match (field("image_url"), field("file_id")) {
                (Some(url), _) => image.insert("url".into(), url.clone()),
                (None, Some(_)) => {
                    return Err(untranslatable(
                        format!("{at}.file_id"),
                        "images by file id cannot be translated; send image_url (a URL or a data: URL)",
                    ));
                }
                (None, None) => return Err(untranslatable(format!("{at}.image_url"), "missing")),
            };
            if let Some(detail) = field("detail") {
                image.insert("detail".into(), detail.clone());
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        Some("input_file") => {
            let mut file = Map::new();
            for name in ["file_id", "file_data", "filename"] {
                if let Some(v) = field(name) {
                    file.insert(name.into(), v.clone());
                }
            }
            if field("file_url").is_some() {
                return Err(untranslatable(
                    format!("{at}.file_url"),
                    "files by URL cannot be translated; send file_data",
                ));
            }
            Ok(json!({"type": "file", "file": file}))
        }
        _ => Err(untranslatable(format!("{at}.type"), "must be input_text, input_image or input_file")),
    }
}

/// Function tools as chat tools; other kinds (web search, file search, MCP, ...) are the
/// provider's own and cannot be translated.
fn tools_of(tools: &Value) -> Result<Vec<Value>, Untranslatable> {
    let tools = tools.as_array().ok_or_else(|| untranslatable("tools", "must be an array"))?;
    tools
        .iter()
        .enumerate()
        .map(|(k, tool)| {
            let kind = tool.get("type").and_then(Value::as_str).unwrap_or_default();
            if kind != "function" {
                return Err(untranslatable(
                    format!("tools[{k}].type"),
                    format!("{kind:?} tools are the provider's own; only function tools can be translated"),
                ));
            }
            let mut function = Map::new();
            for field in ["name", "description", "parameters", "strict"] {
                if let Some(v) = tool.get(field).filter(|v| !v.is_null()) {
                    function.insert(field.into(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

/// Usage in the Responses shape: `input_tokens` include the cache's reads and writes.
pub fn usage_text(usage: &Usage) -> String {
    format!(
        r#"{{"input_tokens":{},"input_tokens_details":{{"cached_tokens":{}}},"output_tokens":{},"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":{}}}"#,
        usage.prompt,
        usage.cached_prompt,
        usage.completion,
        usage.total()
    )
}

/// The status of a response that ended with `finish_reason`, and why it is incomplete.
fn status_of(finish_reason: &str) -> Option<(&'static str, Option<&'static str>)> {
    match finish_reason {
        "stop" | "tool_calls" | "function_call" => Some(("completed", None)),
        "length" => Some(("incomplete", Some("max_output_tokens"))),
        "content_filter" => Some(("incomplete", Some("content_filter"))),
        _ => None,
    }
}

/// A response object: `output` is its items' JSON texts, `status` and `incomplete` as
/// [`status_of`] says.
fn response_json(
    id: &str,
    model: &str,
    created: u64,
    status: &str,
    incomplete: Option<&str>,
    output: &[String],
    usage: Option<&Usage>,
) -> String {
    let incomplete = incomplete.map_or_else(|| "null".to_string(), |reason| format!(r#"{{"reason":"{reason}"}}"#));
    let usage = usage.map_or_else(|| "null".to_string(), usage_text);
    format!(
        r#"{{"id":"resp_{id}","object":"response","created_at":{created},"status":"{status}","error":null,"incomplete_details":{incomplete},"instructions":null,"metadata":{{}},"model":{},"output":[{}],"parallel_tool_calls":true,"temperature":null,"tool_choice":"auto","tools":[],"top_p":null,"usage":{usage}}}"#,
        json_string(model),
        output.join(",")
    )
}

/// A reasoning item; `item_id` is the item's own id.
fn reasoning_item(item_id: &str, text: &str) -> String {
    format!(
        r#"{{"type":"reasoning","id":"{item_id}","summary":[{{"type":"summary_text","text":{}}}]}}"#,
        json_string(text)
    )
}

/// A message item; `item_id` is the item's own id.
fn message_item(item_id: &str, status: &str, parts: &[String]) -> String {
    format!(
        r#"{{"type":"message","id":"{item_id}","status":"{status}","role":"assistant","content":[{}]}}"#,
        parts.join(",")
    )
}

fn text_part(text: &str) -> String {
    format!(r#"{{"type":"output_text","text":{},"annotations":[]}}"#, json_string(text))
}

fn refusal_part(refusal: &str) -> String {
    format!(r#"{{"type":"refusal","refusal":{}}}"#, json_string(refusal))
}

fn function_call_item(call_id: &str, name: &str, arguments: &str, status: &str) -> String {
    format!(
        r#"{{"type":"function_call","id":"fc_{}","call_id":{},"name":{},"arguments":{},"status":"{status}"}}"#,
        id_suffix(call_id),
        json_string(call_id),
        json_string(name),
        json_string(arguments)
    )
}

/// Translates a chat completion into a response named `model`, created at `created`.
pub fn response_answer(answer: &[u8], model: &str, created: u64) -> Result<Vec<u8>, Untranslatable> {
    let answer: ChatAnswerPeek<'_> =
        serde_json::from_slice(answer).map_err(|e| untranslatable("", format!("the answer is not JSON: {e}")))?;
    let choice = answer
        .choices
        .as_ref()
        .and_then(|c| c.first())
        .ok_or_else(|| untranslatable("choices", "the answer has no choice"))?;
    let message = choice.message.as_ref();
    let string = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<Cow<'_, str>>(r.get()).ok());
    let chat_id = answer.id.and_then(|r| serde_json::from_str::<Cow<'_, str>>(r.get()).ok()).unwrap_or_default();
    let id = id_suffix(&chat_id);
    let mut output = Vec::new();
    let reasoning = string(message.and_then(|m| m.reasoning))
        .filter(|r| !r.is_empty())
        .or_else(|| message.and_then(|m| m.reasoning_details).and_then(reasoning_text).map(Cow::Owned));
    if let Some(reasoning) = reasoning {
        output.push(reasoning_item(&format!("rs_{id}"), &reasoning));
    }
    let mut parts = Vec::new();
    if let Some(text) = string(message.and_then(|m| m.content)).filter(|t| !t.is_empty()) {
        parts.push(text_part(&text));
    }
    if let Some(refusal) = string(message.and_then(|m| m.refusal)).filter(|t| !t.is_empty()) {
        parts.push(refusal_part(&refusal));
    }
    if !parts.is_empty() {
        output.push(message_item(&format!("msg_{id}"), "completed", &parts));
    }
    if let Some(calls) = message.and_then(|m| m.tool_calls) {
        let calls: Value = serde_json::from_str(calls.get()).unwrap_or(Value::Null);
        for call in calls.as_array().into_iter().flatten() {
            let text = |pointer: &str| call.pointer(pointer).and_then(Value::as_str).unwrap_or_default();
            output.push(function_call_item(
                text("/id"),
                text("/function/name"),
                text("/function/arguments"),
                "completed",
            ));
        }
    }
    let finish = choice.finish_reason.as_deref().unwrap_or_default();
    let (status, incomplete) = status_of(finish).ok_or_else(|| {
        untranslatable("finish_reason", format!("{finish:?} is not a finish reason this version knows"))
    })?;
    let usage = answer.usage.and_then(openai::usage_of).unwrap_or_default();
    Ok(response_json(&id, model, created, status, incomplete, &output, Some(&usage)).into_bytes())
}

/// The text of `reasoning_details` entries (as Anthropic's thinking comes back), joined.
fn reasoning_text(details: &RawValue) -> Option<String> {
    let details: Vec<Value> = serde_json::from_str(details.get()).ok()?;
    let text: String = details.iter().filter_map(|d| d.get("text").and_then(Value::as_str)).collect();
    (!text.is_empty()).then_some(text)
}

/// The kind of an output item of a [`ResponseStream`].
#[derive(Debug)]
enum Item {
    Reasoning {
        text: String,
    },
    /// Its content parts in the order they started: text, or (`true`) a refusal.
    Message {
        parts: Vec<(bool, String)>,
    },
    /// A tool call, by its index among the chat answer's tool calls.
    Call {
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// A chat completion chunk stream, translated chunk by chunk into the Responses event sequence:
/// `response.created` and `response.in_progress`, each output item's `added` / deltas / `done`
/// events (reasoning as a summary, text and refusal as content parts of a message, each tool call
/// a function call with its argument deltas), and `response.completed` (or `response.incomplete`)
/// with the whole response, usage included (which the upstream was asked to report).
#[derive(Debug, Default)]
pub struct ResponseStream {
    model: String,
    created: u64,
    id: String,
    started: bool,
    sequence: u64,
    items: Vec<Item>,
    /// Each item's id, by output index.
    ids: Vec<String>,
    /// The item still receiving deltas: reasoning or a message. Tool calls stay open until the end,
    /// as their arguments may come interleaved.
    open: Option<usize>,
    finish: Option<(&'static str, Option<&'static str>)>,
    usage: Usage,
}

impl ResponseStream {
    pub fn new(model: &str, created: u64) -> ResponseStream {
        ResponseStream { model: model.to_string(), created, ..ResponseStream::default() }
    }

    /// Translates one whole chunk event (its lines and blank line) into Responses events.
    pub fn event(&mut self, event: &[u8], out: &mut Vec<u8>) -> StreamEnd {
        translate_chunks(self, event, out)
    }

    /// The id of new item `at`; a second message (or reasoning) of the response gets a suffix.
    fn new_item_id(&self, at: usize) -> String {
        let kind = std::mem::discriminant(&self.items[at]);
        let earlier = self.items[..at].iter().filter(|i| std::mem::discriminant(*i) == kind).count();
        let suffix = if earlier == 0 { String::new() } else { format!("_{earlier}") };
        match &self.items[at] {
            Item::Reasoning { .. } => format!("rs_{}{suffix}", self.id),
            Item::Message { .. } => format!("msg_{}{suffix}", self.id),
            Item::Call { call_id, .. } => format!("fc_{}", id_suffix(call_id)),
        }
    }

    /// A delta's item and the part of it the delta goes to: opens the item if it is not open.
    fn open(&mut self, kind: Item, out: &mut Vec<u8>) -> usize {
        if let Some(at) = self.open {
            if std::mem::discriminant(&self.items[at]) == std::mem::discriminant(&kind) {
                return at;
            }
            self.close(at, out);
        }
        let at = self.items.len();
        self.items.push(kind);
        self.ids.push(self.new_item_id(at));
        self.open = Some(at);
        let item_id = &self.ids[at];
        let item = match &self.items[at] {
            Item::Reasoning { .. } => format!(r#"{{"type":"reasoning","id":"{item_id}","summary":[]}}"#),
            Item::Message { .. } => message_item(item_id, "in_progress", &[]),
            Item::Call { call_id, name, .. } => function_call_item(call_id, name, "", "in_progress"),
        };
        emit(
            &mut self.sequence,
            out,
            "response.output_item.added",
            format_args!(r#""output_index":{at},"item":{item}"#),
        );
        at
    }

    fn reasoning_delta(&mut self, text: &str, out: &mut Vec<u8>) {
        let fresh = !matches!(self.open.map(|at| &self.items[at]), Some(Item::Reasoning { .. }));
        let at = self.open(Item::Reasoning { text: String::new() }, out);
        let item_id = &self.ids[at];
        if fresh {
            emit(
                &mut self.sequence,
                out,
                "response.reasoning_summary_part.added",
                format_args!(
                    r#""item_id":"{item_id}","output_index":{at},"summary_index":0,"part":{{"type":"summary_text","text":""}}"#
                ),
            );
        }
        delta(
            &mut self.sequence,
            out,
            "response.reasoning_summary_text.delta",
            format_args!(r#""item_id":"{item_id}","output_index":{at},"summary_index":0"#),
            text,
        );
        if let Item::Reasoning { text: all } = &mut self.items[at] {
            all.push_str(text);
        }
    }

    /// Text (or, with `refusal`, a refusal) of the message item; each is one content part.
    fn message_delta(&mut self, text: &str, refusal: bool, out: &mut Vec<u8>) {
        let at = self.open(Item::Message { parts: Vec::new() }, out);
        let item_id = &self.ids[at];
        let Item::Message { parts } = &mut self.items[at] else { return };
        let (index, fresh) = match parts.iter().position(|(r, _)| *r == refusal) {
            Some(index) => (index, false),
            None => {
                parts.push((refusal, String::new()));
                (parts.len() - 1, true)
            }
        };
        parts[index].1.push_str(text);
        let (part, event) = if refusal {
            (r#"{"type":"refusal","refusal":""}"#, "response.refusal.delta")
        } else {
            (r#"{"type":"output_text","text":"","annotations":[]}"#, "response.output_text.delta")
        };
        let at_part = format!(r#""item_id":"{item_id}","output_index":{at},"content_index":{index}"#);
        if fresh {
            emit(&mut self.sequence, out, "response.content_part.added", format_args!(r#"{at_part},"part":{part}"#));
        }
        delta(&mut self.sequence, out, event, format_args!("{at_part}"), text);
    }

    /// A tool call's delta: its item added when the call first appears, its arguments as deltas.
    fn tool_call(&mut self, call: &Value, out: &mut Vec<u8>) {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let at = match self.items.iter().position(|item| matches!(item, Item::Call { index: i, .. } if *i == index)) {
            Some(at) => at,
            None => {
                if let Some(open) = self.open.take() {
                    self.close(open, out);
                }
                let text =
                    |pointer: &str| call.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_string();
                let item =
                    Item::Call { index, call_id: text("/id"), name: text("/function/name"), arguments: String::new() };
                let at = self.open(item, out);
                // Calls stay open until the end; text after them opens a new message.
                self.open = None;
                at
            }
        };
        if let Some(arguments) = call.pointer("/function/arguments").and_then(Value::as_str).filter(|a| !a.is_empty()) {
            let item_id = &self.ids[at];
            delta(
                &mut self.sequence,
                out,
                "response.function_call_arguments.delta",
                format_args!(r#""item_id":"{item_id}","output_index":{at}"#),
                arguments,
            );
            if let Item::Call { arguments: all, .. } = &mut self.items[at] {
                all.push_str(arguments);
            }
        }
    }

    /// The item as it ends: its JSON text.
    fn done_item(&self, at: usize) -> String {
        let item_id = &self.ids[at];
        match &self.items[at] {
            Item::Reasoning { text } => reasoning_item(item_id, text),
            Item::Message { parts } => {
                let parts: Vec<String> =
                    parts.iter().map(|(refusal, s)| if *refusal { refusal_part(s) } else { text_part(s) }).collect();
                message_item(item_id, "completed", &parts)
            }
            Item::Call { call_id, name, arguments, .. } => function_call_item(call_id, name, arguments, "completed"),
        }
    }

    /// The `done` events of item `at`.
    fn close(&mut self, at: usize, out: &mut Vec<u8>) {
        let item_id = &self.ids[at];
        match &self.items[at] {
            Item::Reasoning { text } => {
                let (text, part) =
                    (json_string(text), format!(r#""item_id":"{item_id}","output_index":{at},"summary_index":0"#));
                emit(
                    &mut self.sequence,
                    out,
                    "response.reasoning_summary_text.done",
                    format_args!(r#"{part},"text":{text}"#),
                );
                emit(
                    &mut self.sequence,
                    out,
                    "response.reasoning_summary_part.done",
                    format_args!(r#"{part},"part":{{"type":"summary_text","text":{text}}}"#),
                );
            }
            Item::Message { parts } => {
                for (index, (is_refusal, content)) in parts.clone().into_iter().enumerate() {
                    let at_part = format!(r#""item_id":"{item_id}","output_index":{at},"content_index":{index}"#);
                    let value = json_string(&content);
                    let (event, field, part) = if is_refusal {
                        ("response.refusal.done", "refusal", refusal_part(&content))
                    } else {
                        ("response.output_text.done", "text", text_part(&content))
                    };
                    emit(&mut self.sequence, out, event, format_args!(r#"{at_part},"{field}":{value}"#));
                    emit(
                        &mut self.sequence,
                        out,
                        "response.content_part.done",
                        format_args!(r#"{at_part},"part":{part}"#),
                    );
                }
            }
            Item::Call { arguments, .. } => {
                let arguments = json_string(arguments);
                emit(
                    &mut self.sequence,
                    out,
                    "response.function_call_arguments.done",
                    format_args!(r#""item_id":"{item_id}","output_index":{at},"arguments":{arguments}"#),
                );
            }
        }
        let item = self.done_item(at);
        emit(
            &mut self.sequence,
            out,
            "response.output_item.done",
            format_args!(r#""output_index":{at},"item":{item}"#),
        );
    }
}

impl ChunkSink for ResponseStream {
    fn chunk(&mut self, chunk: &ChunkPeek<'_>, out: &mut Vec<u8>) -> Result<(), StreamEnd> {
        if !self.started {
            self.started = true;
            self.id = id_suffix(chunk.id.as_deref().unwrap_or_default());
            let response = response_json(&self.id, &self.model, self.created, "in_progress", None, &[], None);
            emit(&mut self.sequence, out, "response.created", format_args!(r#""response":{response}"#));
            emit(&mut self.sequence, out, "response.in_progress", format_args!(r#""response":{response}"#));
        }
        if let Some(usage) = chunk.usage.and_then(openai::usage_of) {
            self.usage = usage;
        }
        let Some(choice) = chunk.choices.as_ref().and_then(|c| c.first()) else { return Ok(()) };
        if let Some(delta) = &choice.delta {
            let reasoning = delta.reasoning_text();
            if let Some(reasoning) = reasoning {
                self.reasoning_delta(reasoning, out);
            }
            if let Some(content) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                self.message_delta(content, false, out);
            }
            if let Some(refusal) = delta.refusal.as_deref().filter(|t| !t.is_empty()) {
                self.message_delta(refusal, true, out);
            }
            for call in delta.tool_call_deltas() {
                self.tool_call(&call, out);
            }
        }
        if let Some(finish) = choice.finish_reason.as_deref() {
            self.finish = Some(status_of(finish).ok_or_else(|| unknown_finish(finish))?);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> StreamEnd {
        let Some((status, incomplete)) = self.finish else {
            return no_finish();
        };
        if let Some(open) = self.open.take() {
            self.close(open, out);
        }
        let calls: Vec<usize> =
            (0..self.items.len()).filter(|&at| matches!(self.items[at], Item::Call { .. })).collect();
        for at in calls {
            self.close(at, out);
        }
        let output: Vec<String> = (0..self.items.len()).map(|at| self.done_item(at)).collect();
        let usage = self.usage;
        let response = response_json(&self.id, &self.model, self.created, status, incomplete, &output, Some(&usage));
        let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
        emit(&mut self.sequence, out, kind, format_args!(r#""response":{response}"#));
        StreamEnd::Done
    }
}

/// Writes one event: its name, then `fields` (JSON object members) after its type and number.
fn emit(sequence: &mut u64, out: &mut Vec<u8>, kind: &str, fields: std::fmt::Arguments<'_>) {
    let n = *sequence;
    *sequence += 1;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{n},{fields}}}\n\n");
}

/// A delta event, its text written straight out: deltas are most of a stream.
fn delta(sequence: &mut u64, out: &mut Vec<u8>, kind: &str, fields: std::fmt::Arguments<'_>, text: &str) {
    let n = *sequence;
    *sequence += 1;
    let _ = write!(out, "event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{n},{fields},\"delta\":");
    let _ = serde_json::to_writer(&mut *out, text);
    out.extend_from_slice(b"}\n\n");
}

/// The keys [`event_info`] and [`event_end`] look for, found without parsing.
struct Keys {
    delta: [Finder<'static>; 1],
    usage: Finder<'static>,
    terminal: [Finder<'static>; 2],
    failed: [Finder<'static>; 2],
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    delta: [Finder::new(b"\"delta\"")],
    usage: Finder::new(b"\"usage\""),
    terminal: [Finder::new(b"\"response.completed\""), Finder::new(b"\"response.incomplete\"")],
    failed: [Finder::new(b"\"response.failed\""), Finder::new(b"\"error\"")],
});

/// Reads one `data:` payload of a Responses event stream: output is any `delta` (text, refusal,
/// reasoning or function-call arguments); usage comes with the final response.
pub fn event_info(data: &[u8]) -> ChunkInfo {
    if !data.starts_with(b"{") {
        return ChunkInfo::default();
    }
    let keys = &*KEYS;
    let output_bytes = openai::string_bytes(data, &keys.delta);
    let usage = openai::usage_in(data, &keys.usage);
    ChunkInfo { has_output: output_bytes > 0, output_bytes, usage, partial_usage: false }
}

/// How a Responses event stream passed through stands after `event`: done after
/// `response.completed` or `response.incomplete`, an error on `response.failed` or `error`.
///
/// An event is what its `event:` line names; without one, its `type` is read wherever it stands:
/// servers built on OpenAI's Python types write it after the `response` object, and key order
/// carries no meaning in JSON. Only an event that names one of those types somewhere is parsed
/// (a quote inside a string is escaped, so the quoted name is a key or a whole string value).
pub fn event_end(event: &[u8]) -> StreamEnd {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow, default)]
        kind: Cow<'a, str>,
    }
    #[derive(Deserialize)]
    struct Failure {
        #[serde(default)]
        response: Option<FailedResponse>,
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    #[derive(Deserialize)]
    struct FailedResponse {
        #[serde(default)]
        error: Option<ErrorPeek>,
    }
    #[derive(Deserialize)]
    struct ErrorPeek {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    // An event that names itself says what it is without its data being read.
    match sse::event_name(event) {
        Some(b"response.completed" | b"response.incomplete") => return StreamEnd::Done,
        Some(b"response.failed" | b"error") | None => {}
        Some(_) => return StreamEnd::Open,
    }
    let keys = &*KEYS;
    for data in sse::payloads(event) {
        if !keys.terminal.iter().chain(&keys.failed).any(|k| k.find(data).is_some()) {
            continue;
        }
        let Ok(Kind { kind }) = serde_json::from_slice::<Kind<'_>>(data) else { continue };
        let (code, message) = match kind.as_ref() {
            "response.completed" | "response.incomplete" => return StreamEnd::Done,
            "response.failed" => {
                let failure = serde_json::from_slice::<Failure>(data).ok();
                let error = failure.and_then(|f| f.response).and_then(|r| r.error);
                (error.as_ref().and_then(|e| e.code.clone()), error.and_then(|e| e.message))
            }
            "error" => match serde_json::from_slice::<Failure>(data) {
                Ok(failure) => (failure.code, failure.message),
                Err(_) => (None, None),
            },
            _ => continue,
        };
        let kind = match code.as_deref() {
            Some("rate_limit_exceeded") => "rate_limit_error",
            Some("server_is_overloaded" | "slow_down") => "overloaded_error",
            _ => "api_error",
        };
        return StreamEnd::Error {
            kind: kind.into(),
            message: message.unwrap_or_else(|| "the provider failed".into()),
        };
    }
    StreamEnd::Open
}

/// The event that ends a response stream which broke after it started: `response.failed`, with
/// the error's code and message.
pub fn failed_event(code: &str, message: &str, model: &str) -> Bytes {
    let response = json!({"id": "resp_failed", "object": "response", "created_at": 0, "status": "failed",
        "error": {"code": code, "message": message}, "incomplete_details": null, "model": model, "output": []});
    let data = json!({"type": "response.failed", "response": response});
    Bytes::from(format!("event: response.failed\ndata: {data}\n\n"))
}

/// A final response event (`response.completed`, `response.incomplete`) with `usage.cost` set to
/// `cost` in its response; `None` for other events.
pub fn with_cost(event: &[u8], cost: &str) -> Option<Bytes> {
    in_response(event, |response| openai::with_cost(response, cost))
}

/// An event with its `response` object replaced by what `change` makes of it; `None` for an event
/// without one, or when `change` leaves it as it is.
fn in_response(event: &[u8], change: impl FnOnce(&[u8]) -> Option<Bytes>) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct ResponseOnly<'a> {
        #[serde(borrow)]
        response: &'a RawValue,
    }
    let peek: ResponseOnly<'_> = serde_json::from_slice(event).ok()?;
    let inner = peek.response.get().as_bytes();
    // `inner` borrows from `event`, so its address locates it there.
    let start = inner.as_ptr() as usize - event.as_ptr() as usize;
    let changed = change(inner)?;
    Some(super::splice(event, start..start + inner.len(), &changed))
}

/// Response events with the `model` of each event's `response` renamed to `model_json`.
pub fn rename_events(events: &[u8], model_json: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(events.len() + 32);
    for line in events.split_inclusive(|&b| b == b'\n') {
        let renamed = line.strip_prefix(b"data: ").and_then(|payload| {
            let (payload, end) = match payload.strip_suffix(b"\r\n").or_else(|| payload.strip_suffix(b"\n")) {
                Some(body) => (body, &payload[body.len()..]),
                None => (payload, &b""[..]),
            };
            let renamed = in_response(payload, |response| openai::rename_model(response, model_json))?;
            Some([b"data: ", &renamed[..], end].concat())
        });
        match renamed {
            Some(line) => out.extend_from_slice(&line),
            None => out.extend_from_slice(line),
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::providers::arbitrary::{chat_answer, chunks, json as any_json, mutated, shuffled};

    /// Responses requests with plausible and arbitrary items and fields, bent or not.
    fn request() -> impl Strategy<Value = Vec<u8>> {
        let item = prop_oneof![
            Just(json!({"role": "user", "content": "hi"})),
            Just(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]})),
            Just(json!({"role": "user", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]})),
            Just(json!({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"})),
            Just(json!({"type": "function_call_output", "call_id": "c", "output": "42"})),
            Just(json!({"type": "reasoning", "id": "rs", "summary": []})),
            any_json(),
        ];
        let input = prop_oneof![
            ".{0,8}".prop_map(Value::from),
            prop::collection::vec(item, 0..5).prop_map(Value::Array),
            any_json()
        ];
        let field = (
            prop::sample::select(vec![
                "instructions",
                "tools",
                "tool_choice",
                "text",
                "reasoning",
                "max_output_tokens",
                "store",
                "previous_response_id",
                "truncation",
            ]),
            any_json(),
        );
        (input, prop::collection::vec(field, 0..4), any::<bool>()).prop_flat_map(|(input, fields, bend)| {
            let mut body = json!({"model": "m", "input": input});
            for (name, value) in fields {
                body[name] = value;
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
        })
    }

    /// Response event streams: well-formed events of every kind, arbitrary ones, bent or not.
    /// Response events as providers send them, and arbitrary JSON.
    fn response_event() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(
                json!({"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1", "delta": "hi"})
            ),
            Just(
                json!({"type": "response.completed", "sequence_number": 9, "response": {"id": "resp_1", "status": "completed", "error": null, "model": "m", "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}], "usage": {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 2}}})
            ),
            Just(
                json!({"type": "response.incomplete", "response": {"status": "incomplete", "error": null, "incomplete_details": {"reason": "max_output_tokens"}}})
            ),
            Just(
                json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "error": null, "output": []}})
            ),
            Just(json!({"type": "response.failed", "response": {"error": {"code": "server_error", "message": "x"}}})),
            Just(json!({"type": "error", "code": "rate_limit_exceeded", "message": "slow"})),
            any_json(),
        ]
    }

    fn response_events() -> impl Strategy<Value = Vec<u8>> {
        (prop::collection::vec(response_event(), 0..6), any::<bool>()).prop_flat_map(|(events, bend)| {
            let bytes: Vec<u8> =
                events.iter().flat_map(|e| format!("event: {}\ndata: {e}\n\n", e["type"]).into_bytes()).collect();
            if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
        })
    }

    #[test]
    fn reads_usage_of_the_final_response_with_its_cached_tokens() {
        let event = br#"{"type":"response.completed","response":{"usage":{"input_tokens":30,"input_tokens_details":{"cached_tokens":20},"output_tokens":5,"total_tokens":35}}}"#;
        let info = event_info(event);
        assert_eq!(info.usage, Some(Usage { prompt: 30, completion: 5, cached_prompt: 20, cache_write: 0 }));
        let priced = with_cost(event, "0.25").unwrap();
        let priced: Value = serde_json::from_slice(&priced).unwrap();
        assert_eq!(priced["response"]["usage"]["cost"].to_string(), "0.25");
        assert!(with_cost(br#"{"type":"response.output_text.delta","delta":"x"}"#, "1").is_none());
    }

    #[test]
    fn renames_the_model_of_each_response_and_keeps_every_other_byte() {
        let events = concat!(
            "event: response.created\r\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"model\":\"a\"}}\r\n\r\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"model\"}\n\n",
        );
        let renamed = rename_events(events.as_bytes(), "\"b\"");
        let expected = events.replacen(r#""model":"a""#, r#""model":"b""#, 1);
        assert_eq!(std::str::from_utf8(&renamed).unwrap(), expected);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_request_is_translated_or_refused_and_a_translation_is_a_chat_request(body in request()) {
            if let Ok(out) = chat_request(&body, "gpt") {
                let out: Value = serde_json::from_slice(&out).expect("JSON");
                prop_assert_eq!(&out["model"], "gpt");
                let messages = out["messages"].as_array().expect("messages");
                let roles = ["system", "developer", "user", "assistant", "tool"];
                prop_assert!(messages.iter().all(|m| roles.contains(&m["role"].as_str().unwrap_or_default())));
            }
        }

        #[test]
        fn any_chat_answer_is_a_response_or_refused(body in chat_answer()) {
            if let Ok(out) = response_answer(&body, "gpt", 1) {
                let out: Value = serde_json::from_slice(&out).expect("JSON");
                prop_assert!(["completed", "incomplete"].contains(&out["status"].as_str().unwrap_or_default()));
                prop_assert!(out["usage"]["total_tokens"].as_u64().is_some(), "saturating, never wrapped");
            }
        }

        #[test]
        fn any_chunk_stream_becomes_response_events_or_ends_with_an_error(bytes in chunks()) {
            let mut stream = ResponseStream::new("gpt", 1);
            let mut out = Vec::new();
            for range in sse::events(&bytes) {
                let before = out.len();
                let end = stream.event(&bytes[range], &mut out);
                for data in sse::payloads(&out[before..]) {
                    let event: Value = serde_json::from_slice(data).expect("JSON");
                    prop_assert!(event["type"].as_str().is_some_and(|t| t.starts_with("response.")));
                }
                if end != StreamEnd::Open {
                    let last = sse::payloads(&out).last().map(|d| serde_json::from_slice::<Value>(d).unwrap_or_default());
                    if end == StreamEnd::Done {
                        let kind = last.as_ref().and_then(|l| l["type"].as_str().map(String::from));
                        prop_assert!(matches!(kind.as_deref(), Some("response.completed" | "response.incomplete")));
                    }
                    break;
                }
            }
        }

        /// Key order carries no meaning: an event reads the same whether `type` comes first, last
        /// (as pydantic-based servers write it) or anywhere.
        #[test]
        fn key_order_does_not_change_what_an_event_says(event in response_event(), seed in any::<u64>()) {
            let frame = |data: &[u8]| [b"data: ", data, b"\n\n"].concat();
            // The reference: `type` first, as OpenAI writes it.
            let first = match (event.get("type"), event.as_object()) {
                (Some(kind), Some(object)) => {
                    let rest: serde_json::Map<String, Value> = object.iter().filter(|(k, _)| *k != "type").map(|(k, v)| (k.clone(), v.clone())).collect();
                    let rest = serde_json::to_string(&rest).unwrap_or_default();
                    let sep = if rest == "{}" { "" } else { "," };
                    format!("{{\"type\":{kind}{sep}{}", &rest[1..])
                }
                _ => serde_json::to_string(&event).unwrap_or_default(),
            };
            let end = event_end(&frame(first.as_bytes()));
            for data in [serde_json::to_vec(&event).unwrap_or_default(), shuffled(&event, seed)] {
                prop_assert_eq!(&event_end(&frame(&data)), &end, "{}", String::from_utf8_lossy(&data));
                prop_assert_eq!(event_info(&data), event_info(first.as_bytes()));
            }
            let expected = match event["type"].as_str() {
                Some("response.completed" | "response.incomplete") => Some(true),
                Some("response.failed" | "error") if event.get("response").is_some() || event.get("code").is_some() => Some(false),
                Some("response.output_text.delta" | "response.created") => None,
                _ => return Ok(()),
            };
            match expected {
                Some(true) => prop_assert_eq!(end, StreamEnd::Done),
                Some(false) => prop_assert!(matches!(end, StreamEnd::Error { .. }), "{:?}", end),
                None => prop_assert_eq!(end, StreamEnd::Open),
            }
        }

        #[test]
        fn no_event_makes_the_stream_readers_panic(bytes in response_events(), cost in "(0|[1-9][0-9]{0,3})(\\.[0-9]{1,6})?") {
            for range in sse::events(&bytes) {
                let event = &bytes[range];
                let _ = event_end(event);
                for data in sse::payloads(event) {
                    let _ = event_info(data);
                    let was_json = serde_json::from_slice::<Value>(data).is_ok();
                    if let Some(priced) = with_cost(data, &cost) {
                        prop_assert!(!was_json || serde_json::from_slice::<Value>(&priced).is_ok(), "still JSON");
                    }
                }
            }
            let renamed = rename_events(&bytes, "\"other\"");
            prop_assert_eq!(sse::events(&renamed).count(), sse::events(&bytes).count());
        }
    }
}
