//! The OpenAI wire format: the few request fields routing needs, the model rewrite, error bodies
//! and the terminal stream event.
//!
//! Requests are not parsed into owned values: the proxy borrows `model` and `stream` from the body
//! and splices the upstream model name into the original bytes.

use std::borrow::Cow;
use std::ops::Range;

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Cutoffs, MaxPrice, Prefs, Sort, StreamEnd, Usage};
use crate::api::units::parse_json_micros;

/// What routing needs from a chat completion request.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    pub model: Cow<'a, str>,
    /// Where the `model` value (with its quotes) sits in the body.
    model_span: Range<usize>,
    pub stream: bool,
    /// OpenRouter's `models` (Anthropic callers' `fallbacks`): routes to try, in order, after
    /// `model`.
    pub models: Vec<Cow<'a, str>>,
    /// OpenRouter's `provider` preferences.
    pub prefs: Prefs<'a>,
    /// `max_completion_tokens`, or the older `max_tokens`, or the Responses API's
    /// `max_output_tokens`.
    pub max_tokens: Option<u64>,
    /// Whether the caller asked for the usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Where the `stream_options` value sits in the body, if present.
    stream_options: Option<(Range<usize>, StreamOptionsShape)>,
}

/// What `stream_options` holds, to know how to turn `include_usage` on.
#[derive(Debug, Clone)]
enum StreamOptionsShape {
    /// `null` or not an object: replaced whole.
    NotAnObject,
    /// An object without `include_usage`: the field is added after `{`.
    Object { empty: bool },
    /// An object whose `include_usage` value sits here.
    WithIncludeUsage(Range<usize>),
}

/// Why a request body was rejected.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    InvalidJson(String),
    MissingModel,
    InvalidModel,
    /// A field has a value the proxy cannot use: (field path, reason).
    InvalidField(&'static str, String),
    /// Valid JSON with a field of the wrong type (`"stream": "yes"`): its path and what was
    /// expected.
    WrongType {
        field: String,
        detail: String,
    },
}

/// A body the peek `T` could not read: a field of the wrong type, named by its path, or JSON
/// that is not valid. The path is found only on this error path, by reading the body again.
#[cold]
#[inline(never)]
fn peek_error<'de, T: Deserialize<'de>>(body: &'de [u8], e: serde_json::Error) -> RequestError {
    if !e.is_data() {
        return RequestError::InvalidJson(e.to_string());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(located) if !located.path().to_string().is_empty() && located.path().to_string() != "." => {
            let message = located.inner().to_string();
            // serde_json adds where the value was; the path says it better.
            let detail = message.rfind(" at line ").map_or(message.as_str(), |at| &message[..at]).to_string();
            RequestError::WrongType { field: located.path().to_string(), detail }
        }
        _ => RequestError::InvalidJson(e.to_string()),
    }
}

// Named for error messages: serde says "expected struct ChatCompletionRequest".
#[derive(Deserialize)]
#[serde(rename = "ChatCompletionRequest")]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default, alias = "fallbacks")]
    models: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    provider: Option<ProviderPeek<'a>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    /// The Responses API's.
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

/// A field's raw value whenever the field is present, `null` included (plain `Option` reads a
/// `null` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct StreamOptionsPeek<'a> {
    #[serde(borrow, default)]
    include_usage: Option<&'a RawValue>,
}

/// OpenRouter's `provider` object. Numbers stay raw text so prices and seconds are read exactly.
#[derive(Deserialize)]
#[serde(rename = "provider")]
struct ProviderPeek<'a> {
    #[serde(borrow, default)]
    order: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    only: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    ignore: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    allow_fallbacks: Option<bool>,
    #[serde(borrow, default)]
    sort: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_price: Option<MaxPricePeek<'a>>,
    #[serde(borrow, default)]
    preferred_max_latency: Option<&'a RawValue>,
    #[serde(borrow, default)]
    preferred_min_throughput: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename = "max_price")]
struct MaxPricePeek<'a> {
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    completion: Option<&'a RawValue>,
    #[serde(borrow, default)]
    request: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PercentilesPeek<'a> {
    #[serde(borrow, default)]
    p50: Option<&'a RawValue>,
    #[serde(borrow, default)]
    p75: Option<&'a RawValue>,
    #[serde(borrow, default)]
    p90: Option<&'a RawValue>,
    #[serde(borrow, default)]
    p99: Option<&'a RawValue>,
}

/// Reads the fields routing needs from a request body, validating that the whole body is JSON.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest<'_>, RequestError> {
    // serde would also read a struct from a JSON array; a request is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b != b'{') {
        return Err(RequestError::InvalidJson("expected a JSON object".into()));
    }
    let peek: Peek<'_> = serde_json::from_slice(body).map_err(|e| peek_error::<Peek<'_>>(body, e))?;
    let raw = peek.model.ok_or(RequestError::MissingModel)?;
    let (model, model_span) = string_at(raw, body).ok_or(RequestError::InvalidModel)?;
    let prefs = match peek.provider {
        Some(p) => prefs(p)?,
        None => Prefs::default(),
    };
    let (include_usage, stream_options) = match peek.stream_options {
        None => (false, None),
        Some(raw) => stream_options(raw, body)?,
    };
    Ok(ChatRequest {
        model,
        model_span,
        stream: peek.stream.unwrap_or(false),
        models: peek.models.unwrap_or_default(),
        prefs,
        max_tokens: peek.max_completion_tokens.or(peek.max_tokens).or(peek.max_output_tokens),
        include_usage,
        stream_options,
    })
}

/// A JSON string read from a body, and its span there (quotes included).
pub type Spanned<'a> = (Cow<'a, str>, Range<usize>);

/// The `model` of a JSON request that need not name one (a call passed through as it is): the
/// name and its span in `body`; `None` without one.
pub fn optional_model(body: &[u8]) -> Result<Option<Spanned<'_>>, RequestError> {
    #[derive(Deserialize)]
    struct ModelPeek<'a> {
        #[serde(borrow, default)]
        model: Option<&'a RawValue>,
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b != b'{') {
        return Err(RequestError::InvalidJson("expected a JSON object".into()));
    }
    let peek: ModelPeek<'_> = serde_json::from_slice(body).map_err(|e| peek_error::<ModelPeek<'_>>(body, e))?;
    match peek.model {
        None => Ok(None),
        Some(raw) => string_at(raw, body).map(Some).ok_or(RequestError::InvalidModel),
    }
}

/// Whether `stream_options` asks for usage, and how to make it ask.
type StreamOptionsFound = (bool, Option<(Range<usize>, StreamOptionsShape)>);

fn stream_options(raw: &RawValue, body: &[u8]) -> Result<StreamOptionsFound, RequestError> {
    let text = raw.get();
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    let span = start..start + text.len();
    if !text.starts_with('{') {
        return Ok((false, Some((span, StreamOptionsShape::NotAnObject))));
    }
    let invalid = |e: serde_json::Error| RequestError::InvalidField("stream_options", e.to_string());
    let peek: StreamOptionsPeek<'_> = serde_json::from_str(text).map_err(invalid)?;
    match peek.include_usage {
        None => {
            let empty = text[1..].trim_start().starts_with('}');
            Ok((false, Some((span, StreamOptionsShape::Object { empty }))))
        }
        Some(value) => {
            let include: bool = serde_json::from_str(value.get()).map_err(invalid)?;
            let at = value.get().as_ptr() as usize - body.as_ptr() as usize;
            Ok((include, Some((span, StreamOptionsShape::WithIncludeUsage(at..at + value.get().len())))))
        }
    }
}

/// A JSON string value borrowed from `body`, decoded, with its span (quotes included) in `body`.
fn string_at<'a>(raw: &'a RawValue, body: &[u8]) -> Option<Spanned<'a>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    let value: Cow<'a, str> = serde_json::from_str(text).ok()?;
    // `raw` borrows from `body`, so its address locates the value within the body.
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    Some((value, start..start + text.len()))
}

fn prefs(p: ProviderPeek<'_>) -> Result<Prefs<'_>, RequestError> {
    let number = |field: &'static str, raw: Option<&RawValue>| -> Result<Option<u64>, RequestError> {
        raw.map(|r| parse_json_micros(r.get()).map_err(|e| RequestError::InvalidField(field, e))).transpose()
    };
    let max_price = match p.max_price {
        None => MaxPrice::default(),
        Some(m) => MaxPrice {
            prompt: number("provider.max_price.prompt", m.prompt)?,
            completion: number("provider.max_price.completion", m.completion)?,
            request: number("provider.max_price.request", m.request)?,
        },
    };
    let sort = match p.sort {
        None => None,
        Some(raw) => {
            #[derive(Deserialize)]
            struct By<'a> {
                #[serde(borrow)]
                by: Cow<'a, str>,
            }
            let by: Cow<'_, str> = serde_json::from_str(raw.get())
                .or_else(|_| serde_json::from_str::<By<'_>>(raw.get()).map(|b| b.by))
                .map_err(|_| {
                    RequestError::InvalidField("provider.sort", "expected a string or {\"by\": ...}".into())
                })?;
            Some(match by.as_ref() {
                "price" => Sort::Price,
                "throughput" => Sort::Throughput,
                "latency" => Sort::Latency,
                other => {
                    let message = format!("{other:?} is not one of price, throughput, latency");
                    return Err(RequestError::InvalidField("provider.sort", message));
                }
            })
        }
    };
    // Latency in seconds (kept in microseconds); throughput in tokens per second (kept times 1000).
    let cutoffs = |field: &'static str, raw: Option<&RawValue>, divide: u64| -> Result<Cutoffs, RequestError> {
        let Some(raw) = raw else { return Ok(Cutoffs::default()) };
        let scaled = |r: Option<&RawValue>| number(field, r).map(|v| v.map(|v| v / divide));
        if raw.get().starts_with('{') {
            let q: PercentilesPeek<'_> = serde_json::from_str(raw.get()).map_err(|e| {
                RequestError::InvalidField(field, format!("expected a number or {{p50, p75, p90, p99}}: {e}"))
            })?;
            Ok(Cutoffs([scaled(q.p50)?, scaled(q.p75)?, scaled(q.p90)?, scaled(q.p99)?]))
        } else {
            Ok(Cutoffs([scaled(Some(raw))?, None, None, None]))
        }
    };
    Ok(Prefs {
        order: p.order.unwrap_or_default(),
        only: p.only,
        ignore: p.ignore.unwrap_or_default(),
        allow_fallbacks: p.allow_fallbacks.unwrap_or(true),
        sort,
        max_price,
        max_latency: cutoffs("provider.preferred_max_latency", p.preferred_max_latency, 1)?,
        min_throughput: cutoffs("provider.preferred_min_throughput", p.preferred_min_throughput, 1000)?,
    })
}

impl ChatRequest<'_> {
    /// The body to send upstream: `model` replaced by `model_json` (a JSON string literal, quotes
    /// included) and, with `force_usage` on a stream, `stream_options.include_usage` turned on so
    /// the cost can be exact. One copy of the body; none when nothing changes.
    pub fn upstream_body(&self, body: &Bytes, model_json: &str, force_usage: bool) -> Bytes {
        let model =
            (&body[self.model_span.clone()] != model_json.as_bytes()).then(|| (self.model_span.clone(), model_json));
        let usage = (force_usage && self.stream && !self.include_usage).then(|| match &self.stream_options {
            None => {
                // Before the closing brace of the request object.
                let end = body.iter().rposition(|&b| b == b'}').unwrap_or(body.len());
                let empty = body[..end].iter().rposition(|b| !b.is_ascii_whitespace()).is_some_and(|i| body[i] == b'{');
                let field = if empty {
                    r#""stream_options":{"include_usage":true}"#
                } else {
                    r#","stream_options":{"include_usage":true}"#
                };
                (end..end, field)
            }
            Some((span, StreamOptionsShape::NotAnObject)) => (span.clone(), r#"{"include_usage":true}"#),
            Some((span, StreamOptionsShape::Object { empty })) => {
                let field = if *empty { r#""include_usage":true"# } else { r#""include_usage":true,"# };
                (span.start + 1..span.start + 1, field)
            }
            Some((_, StreamOptionsShape::WithIncludeUsage(value))) => (value.clone(), "true"),
        });
        let mut edits = [model, usage];
        if edits.iter().all(Option::is_none) {
            return body.clone();
        }
        edits.sort_by_key(|e| e.as_ref().map(|(span, _)| span.start));
        let extra: usize = edits.iter().flatten().map(|(_, text)| text.len()).sum();
        let mut out = BytesMut::with_capacity(body.len() + extra);
        let mut at = 0;
        for (span, text) in edits.iter().flatten() {
            out.extend_from_slice(&body[at..span.start]);
            out.extend_from_slice(text.as_bytes());
            at = span.end;
        }
        out.extend_from_slice(&body[at..]);
        out.freeze()
    }
}

/// Usage as providers report it, in a whole answer or a stream's usage chunk (or event), in
/// OpenAI's convention (`prompt_tokens` includes the cache) or Anthropic's (`input_tokens`
/// excludes it): one reader, one internal model.
#[derive(Deserialize)]
struct UsagePeek {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    /// The Responses API's: its `input_tokens` include the cache's reads, as `prompt_tokens` do.
    #[serde(default)]
    input_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    /// As OpenRouter reports the tokens written to the cache, and the sidecar's own translations.
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

impl From<UsagePeek> for Usage {
    fn from(u: UsagePeek) -> Usage {
        let anthropic = u.prompt_tokens.is_none()
            && u.completion_tokens.is_none()
            && (u.input_tokens.is_some() || u.output_tokens.is_some());
        if anthropic && let Some(details) = u.input_tokens_details {
            return Usage {
                prompt: u.input_tokens.unwrap_or(0),
                completion: u.output_tokens.unwrap_or(0),
                cached_prompt: details.cached_tokens.unwrap_or(0),
                cache_write: details.cache_write_tokens.unwrap_or(0),
            };
        }
        if anthropic {
            let (read, written) = (u.cache_read_input_tokens.unwrap_or(0), u.cache_creation_input_tokens.unwrap_or(0));
            return Usage {
                prompt: u.input_tokens.unwrap_or(0).saturating_add(read).saturating_add(written),
                completion: u.output_tokens.unwrap_or(0),
                cached_prompt: read,
                cache_write: written,
            };
        }
        let details = u.prompt_tokens_details;
        Usage {
            prompt: u.prompt_tokens.unwrap_or(0),
            completion: u.completion_tokens.unwrap_or(0),
            cached_prompt: details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_write: details.and_then(|d| d.cache_write_tokens).unwrap_or(0),
        }
    }
}

/// What a whole answer says for billing: its usage, if reported, the bytes of output it holds
/// (to estimate the tokens when it has no usage), and where its `usage.cost` goes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AnswerInfo {
    pub usage: Option<Usage>,
    pub output_bytes: u64,
    cost_at: Option<CostAt>,
}

/// Where to write `usage.cost` into an answer without reading it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CostAt {
    /// Before the closing brace of the `usage` object (`empty`: it has no fields).
    Usage { close: usize, empty: bool },
    /// Before the closing brace of the answer, as a new `usage` object (`empty`: the answer has
    /// no fields).
    Answer { close: usize, empty: bool },
}

/// Reads a whole chat completion; `Err` if it is not JSON. One pass validates it, reads its usage
/// and finds where the cost goes; the choices are read only for an answer without usage.
pub fn answer_info(body: &[u8]) -> Result<AnswerInfo, serde_json::Error> {
    #[derive(Deserialize)]
    struct AnswerPeek<'a> {
        #[serde(borrow, default)]
        choices: Option<&'a RawValue>,
        #[serde(borrow, default)]
        usage: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow, default)]
        message: Option<Output<'a>>,
        /// Legacy completions' output.
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
    }
    let answer: AnswerPeek<'_> = serde_json::from_slice(body)?;
    let usage = answer.usage.filter(|u| u.get().starts_with('{'));
    let cost_at = CostAt::find(body, usage);
    let usage = usage.and_then(|raw| serde_json::from_str::<UsagePeek>(raw.get()).ok()).map(Usage::from);
    let output_bytes = match (&usage, answer.choices) {
        (None, Some(choices)) => serde_json::from_str::<Vec<Choice<'_>>>(choices.get())
            .map(|c| {
                c.iter()
                    .map(|c| {
                        c.message.as_ref().map_or(0, Output::bytes) + c.text.as_ref().map_or(0, |t| t.len() as u64)
                    })
                    .sum()
            })
            .unwrap_or(0),
        _ => 0,
    };
    Ok(AnswerInfo { usage, output_bytes, cost_at })
}

impl AnswerInfo {
    /// The answer with `usage.cost` set to `cost` (a JSON number's text), as OpenRouter reports it.
    pub fn with_cost(&self, body: &Bytes, cost: &str) -> Bytes {
        match self.cost_at {
            Some(at) => at.insert(body, cost),
            None => body.clone(),
        }
    }
}

impl CostAt {
    /// Where the cost goes in the JSON object `json` whose `usage` value, if any, is `usage`.
    fn find(json: &[u8], usage: Option<&RawValue>) -> Option<CostAt> {
        match usage {
            Some(raw) => {
                let text = raw.get();
                // `raw` borrows from `json`, so its address locates the value within it.
                let close = text.as_ptr() as usize - json.as_ptr() as usize + text.len() - 1;
                Some(CostAt::Usage { close, empty: text[1..].trim_start().starts_with('}') })
            }
            None => {
                let close = json.iter().rposition(|&b| b == b'}')?;
                let open = json.iter().position(|&b| b == b'{')?;
                let empty = json.get(open + 1..close).is_some_and(|inside| inside.iter().all(u8::is_ascii_whitespace));
                Some(CostAt::Answer { close, empty })
            }
        }
    }

    fn insert(self, json: &[u8], cost: &str) -> Bytes {
        let (at, insert) = match self {
            CostAt::Usage { close, empty: true } => (close, format!(r#""cost":{cost}"#)),
            CostAt::Usage { close, empty: false } => (close, format!(r#","cost":{cost}"#)),
            CostAt::Answer { close, empty: true } => (close, format!(r#""usage":{{"cost":{cost}}}"#)),
            CostAt::Answer { close, empty: false } => (close, format!(r#","usage":{{"cost":{cost}}}"#)),
        };
        let mut out = BytesMut::with_capacity(json.len() + insert.len());
        out.extend_from_slice(&json[..at]);
        out.extend_from_slice(insert.as_bytes());
        out.extend_from_slice(&json[at..]);
        out.freeze()
    }
}

/// The generated parts of a message or a stream delta.
#[derive(Deserialize)]
struct Output<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

impl Output<'_> {
    fn bytes(&self) -> u64 {
        let len = |s: &Option<Cow<'_, str>>| s.as_deref().map_or(0, str::len) as u64;
        len(&self.content)
            + len(&self.refusal)
            + len(&self.reasoning)
            + len(&self.reasoning_content)
            + self.tool_calls.map_or(0, |t| t.get().len() as u64)
    }
}

/// A JSON object (an answer, or a stream's usage chunk) with `usage.cost` set to `cost` (a JSON
/// number's text), as OpenRouter reports it. Adds a `usage` object if there is none.
pub fn with_cost(json: &[u8], cost: &str) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct UsageOnly<'a> {
        #[serde(borrow, default)]
        usage: Option<&'a RawValue>,
    }
    let peek: UsageOnly<'_> = serde_json::from_slice(json).ok()?;
    Some(CostAt::find(json, peek.usage.filter(|u| u.get().starts_with('{')))?.insert(json, cost))
}

/// A JSON object with its top-level `model` replaced by `model_json`, if it has a string `model`:
/// for answers served by a route other than the one asked for (`models` fallback).
pub fn rename_model(json: &[u8], model_json: &str) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct ModelOnly<'a> {
        #[serde(borrow, default)]
        model: Option<&'a RawValue>,
    }
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let peek: ModelOnly<'_> = serde_json::from_slice(json).ok()?;
    let (_, span) = string_at(peek.model?, json)?;
    Some(super::splice(json, span, model_json.as_bytes()))
}

/// SSE events with each `data:` payload's `model` renamed (see [`rename_model`]); other lines and
/// payloads are kept as they are.
pub fn rename_events(events: &[u8], model_json: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(events.len() + 32);
    for (i, line) in events.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\n");
        }
        let (body, cr) = match line.strip_suffix(b"\r") {
            Some(body) => (body, &b"\r"[..]),
            None => (line, &b""[..]),
        };
        match body.strip_prefix(b"data: ").and_then(|payload| rename_model(payload, model_json)) {
            Some(renamed) => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&renamed);
            }
            None => out.extend_from_slice(body),
        }
        out.extend_from_slice(cr);
    }
    out.freeze()
}

/// Whether an upstream error answer says the prompt is too long for the model's context window,
/// in the words OpenAI, Anthropic, vLLM and others use.
pub fn is_context_length_error(status: u16, body: &[u8]) -> bool {
    if status != 400 && status != 413 {
        return false;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).to_ascii_lowercase();
    ["context_length_exceeded", "maximum context length", "context length", "prompt is too long", "too many tokens"]
        .iter()
        .any(|phrase| text.contains(phrase))
}

/// What a streamed chunk carries: whether it has output (content, a refusal, reasoning or a tool
/// call), how many bytes of it (to estimate tokens when no usage comes), and a usage report.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    pub has_output: bool,
    pub output_bytes: u64,
    pub usage: Option<Usage>,
    /// The usage is a first report that a later event completes (Anthropic's `message_start`).
    pub partial_usage: bool,
}

/// Reads one SSE `data:` payload of a chat completion stream.
///
/// Every event of a metered stream passes through here, so it scans bytes instead of parsing: in
/// well-formed JSON a quote inside a string is escaped, so `"content":` can only be a key. Only a
/// usage object, when there is one, is parsed.
pub fn chunk_info(data: &[u8]) -> ChunkInfo {
    // `[DONE]` and other non-objects carry nothing.
    if !data.starts_with(b"{") {
        return ChunkInfo::default();
    }
    let keys = &*KEYS;
    let output_bytes = string_bytes(data, &keys.output);
    let has_tool_call = values_of(data, &keys.tool_calls)
        .any(|v| data.get(v) == Some(&b'[') && data.get(skip_whitespace(data, v + 1)).is_some_and(|&b| b != b']'));
    let usage = usage_in(data, &keys.usage);
    ChunkInfo { has_output: output_bytes > 0 || has_tool_call, output_bytes, usage, partial_usage: false }
}

/// Reads one SSE `data:` payload of a legacy completions stream, whose output is `choices[].text`.
pub fn text_chunk_info(data: &[u8]) -> ChunkInfo {
    if !data.starts_with(b"{") {
        return ChunkInfo::default();
    }
    let keys = &*KEYS;
    let output_bytes = string_bytes(data, &keys.text);
    let usage = usage_in(data, &keys.usage);
    ChunkInfo { has_output: output_bytes > 0, output_bytes, usage, partial_usage: false }
}

/// A usage object's text, read in either convention.
pub(super) fn usage_of(usage: &RawValue) -> Option<Usage> {
    usage_at(usage.get().as_bytes(), 0)
}

/// Usage in OpenAI's convention, as JSON text: `prompt_tokens` includes the cache's reads and
/// writes, which are also reported apart, as OpenRouter reports them.
pub fn usage_text(usage: &Usage) -> String {
    format!(
        r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"cache_write_tokens":{}}}}}"#,
        usage.prompt,
        usage.completion,
        usage.total(),
        usage.cached_prompt,
        usage.cache_write
    )
}

/// The usage object under `key` in `data`. Only a stray object nests another `usage`; of several,
/// the largest is taken, so that where each stands in the text cannot change the answer.
pub(super) fn usage_in(data: &[u8], key: &Finder<'static>) -> Option<Usage> {
    values_of(data, key)
        .filter_map(|value| usage_at(data, value))
        .max_by_key(|u| (u.prompt, u.completion, u.cached_prompt, u.cache_write))
}

/// The usage object at or after `value` (the start of a `usage` value), read in either
/// convention.
pub(super) fn usage_at(data: &[u8], value: usize) -> Option<Usage> {
    let mut values = serde_json::Deserializer::from_slice(data.get(value..)?).into_iter::<UsagePeek>();
    values.next()?.ok().map(Usage::from)
}

/// The bytes of every string value of the `keys` (each quoted), wherever they are in `data`.
pub(super) fn string_bytes(data: &[u8], keys: &[Finder<'static>]) -> u64 {
    let mut bytes = 0;
    for key in keys {
        let mut from = 0;
        while let Some(value) = value_of(data, key, from) {
            from = value;
            if data.get(value) == Some(&b'"') {
                let len = string_len(&data[value + 1..]);
                bytes += len as u64;
                from = value + 1 + len;
            }
        }
    }
    bytes
}

/// The JSON string literal (quotes included) that starts at `value`, if one does and ends.
pub(super) fn string_literal(data: &[u8], value: usize) -> Option<&[u8]> {
    if data.get(value) != Some(&b'"') {
        return None;
    }
    let end = value + 1 + string_len(data.get(value + 1..)?);
    (data.get(end) == Some(&b'"')).then(|| &data[value..=end])
}

/// Where the value of the next `key` (quoted) at or after `from` starts: the key must be followed
/// by a colon, which tells it from a string value that happens to read the same.
pub(super) fn value_of(data: &[u8], key: &Finder<'static>, mut from: usize) -> Option<usize> {
    let len = key.needle().len();
    loop {
        let at = from + key.find(&data[from..])?;
        let colon = skip_whitespace(data, at + len);
        if data.get(colon) == Some(&b':') {
            return Some(skip_whitespace(data, colon + 1));
        }
        from = at + len;
    }
}

/// Where the value of every `key` (quoted) in `data` starts, first to last.
pub(super) fn values_of<'d>(data: &'d [u8], key: &'d Finder<'static>) -> impl Iterator<Item = usize> + 'd {
    let mut from = 0;
    std::iter::from_fn(move || {
        let value = value_of(data, key, from)?;
        from = value;
        Some(value)
    })
}

/// The keys [`chunk_info`] looks for, with their searchers built once.
struct Keys {
    output: [Finder<'static>; 5],
    tool_calls: Finder<'static>,
    usage: Finder<'static>,
    /// Legacy completions' output.
    text: [Finder<'static>; 1],
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    output: [
        Finder::new(b"\"content\""),
        Finder::new(b"\"refusal\""),
        Finder::new(b"\"reasoning\""),
        Finder::new(b"\"reasoning_content\""),
        Finder::new(b"\"arguments\""),
    ],
    tool_calls: Finder::new(b"\"tool_calls\""),
    usage: Finder::new(b"\"usage\""),
    text: [Finder::new(b"\"text\"")],
});

/// Whether complete events mention usage, so that only those are read for it.
pub fn mentions_usage(events: &[u8]) -> bool {
    KEYS.usage.find(events).is_some()
}

fn skip_whitespace(data: &[u8], mut i: usize) -> usize {
    while data.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// The length of a JSON string's content, up to its closing (unescaped) quote.
/// An unterminated string (an event cut short) runs to the end of `s`, even after a lone backslash.
fn string_len(s: &[u8]) -> usize {
    let mut i = 0;
    while let Some(at) = s.get(i..).and_then(|rest| memchr::memchr2(b'"', b'\\', rest)) {
        i += at;
        if s[i] == b'"' {
            return i;
        }
        i += 2; // A backslash escapes the next byte.
    }
    s.len()
}

/// A string as a JSON string literal, quotes included.
pub fn json_string(s: &str) -> String {
    // Serialising a string cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

/// The error body every Sideyard error uses: `{"error": {"message", "type", "code", "metadata"}}`.
pub fn error_body(message: &str, kind: &str, code: &str, metadata: Option<serde_json::Value>) -> serde_json::Value {
    let mut error = serde_json::json!({"message": message, "type": kind, "code": code});
    if let Some(metadata) = metadata {
        error["metadata"] = metadata;
    }
    serde_json::json!({ "error": error })
}

/// The event that ends a stream which broke after it started, in OpenRouter's shape: a chunk with an
/// `error` object and `finish_reason: "error"`. OpenAI's SDKs raise an `APIError` on it.
pub fn stream_error_event(model: &str, provider: &str, kind: &str, code: &str, message: &str, created: u64) -> Bytes {
    let chunk = serde_json::json!({
        "id": "sideyard-error",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "provider": provider,
        "error": {"message": message, "type": kind, "code": code},
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

/// The fields of a chat completion that translations into other formats read.
#[derive(Deserialize)]
pub(crate) struct ChatAnswerPeek<'a> {
    #[serde(borrow, default)]
    pub(crate) id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) choices: Option<Vec<ChatChoicePeek<'a>>>,
    #[serde(borrow, default)]
    pub(crate) usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(crate) struct ChatChoicePeek<'a> {
    #[serde(borrow, default)]
    pub(crate) message: Option<ChatMessagePeek<'a>>,
    #[serde(borrow, default)]
    pub(crate) finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(crate) struct ChatMessagePeek<'a> {
    #[serde(borrow, default)]
    pub(crate) content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) reasoning: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) refusal: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) reasoning_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) tool_calls: Option<&'a RawValue>,
}

/// A translation of a chat completion chunk stream into another format's events.
pub(crate) trait ChunkSink {
    /// Translates one chunk; `Err` ends the stream.
    fn chunk(&mut self, chunk: &ChunkPeek<'_>, out: &mut Vec<u8>) -> Result<(), StreamEnd>;
    /// The stream's `[DONE]`: its last events.
    fn finish(&mut self, out: &mut Vec<u8>) -> StreamEnd;
}

/// Feeds one whole chunk event (its lines and blank line) to `sink`: each chunk, the end, or the
/// error that a chunk which is not JSON, or the provider's error chunk, is.
pub(crate) fn translate_chunks(sink: &mut impl ChunkSink, event: &[u8], out: &mut Vec<u8>) -> StreamEnd {
    for data in super::sse::payloads(event) {
        if data == b"[DONE]" {
            return sink.finish(out);
        }
        let Ok(chunk) = serde_json::from_slice::<ChunkPeek<'_>>(data) else {
            return StreamEnd::Error {
                kind: "api_error".into(),
                message: "the provider sent a chunk that is not JSON".into(),
            };
        };
        if let Some(error) = chunk.error {
            let error: serde_json::Value = serde_json::from_str(error.get()).unwrap_or_default();
            let message = error.get("message").and_then(serde_json::Value::as_str).unwrap_or("the provider failed");
            return StreamEnd::Error { kind: "api_error".into(), message: message.to_string() };
        }
        if let Err(end) = sink.chunk(&chunk, out) {
            return end;
        }
    }
    StreamEnd::Open
}

/// The fields of a chat completion chunk that translations into other formats read.
#[derive(Deserialize)]
pub(crate) struct ChunkPeek<'a> {
    #[serde(borrow, default)]
    pub(crate) id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) choices: Option<Vec<ChoicePeek<'a>>>,
    #[serde(borrow, default)]
    pub(crate) usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(crate) struct ChoicePeek<'a> {
    #[serde(borrow, default)]
    pub(crate) delta: Option<ChatDelta<'a>>,
    #[serde(borrow, default)]
    pub(crate) finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(crate) struct ChatDelta<'a> {
    #[serde(borrow, default)]
    pub(crate) content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) reasoning: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) reasoning_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) tool_calls: Option<&'a RawValue>,
}

impl ChatDelta<'_> {
    /// The delta's reasoning text, in whichever field the provider uses.
    pub(crate) fn reasoning_text(&self) -> Option<&str> {
        [&self.reasoning, &self.reasoning_content].into_iter().find_map(|t| t.as_deref().filter(|t| !t.is_empty()))
    }

    /// The delta's tool call deltas, each a JSON object.
    pub(crate) fn tool_call_deltas(&self) -> Vec<serde_json::Value> {
        let calls = self.tool_calls.and_then(|c| serde_json::from_str(c.get()).ok());
        match calls {
            Some(serde_json::Value::Array(calls)) => calls,
            _ => Vec::new(),
        }
    }
}

/// The end of a translated chunk stream whose `[DONE]` came without a finish reason.
pub(crate) fn no_finish() -> StreamEnd {
    StreamEnd::Error { kind: "api_error".into(), message: "the provider's stream ended without a finish reason".into() }
}

/// The end of a translated stream whose finish reason has no equivalent.
pub(crate) fn unknown_finish(finish: &str) -> StreamEnd {
    StreamEnd::Error {
        kind: "api_error".into(),
        message: format!("the provider ended with finish reason {finish:?}, which this version does not know"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::sse;

    fn splice(body: &str, model: &str) -> String {
        rewrite(body, model, false)
    }

    fn rewrite(body: &str, model: &str, force_usage: bool) -> String {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let req = parse_chat_request(&bytes).unwrap();
        String::from_utf8(req.upstream_body(&bytes, &json_string(model), force_usage).to_vec()).unwrap()
    }

    #[test]
    fn turns_include_usage_on_for_streams_whatever_the_stream_options() {
        let cases = [
            (
                r#"{"model":"m","stream":true}"#,
                r#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":null}"#,
                r#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{}}"#,
                r#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#,
                r#"{"model":"x","stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
                r#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
                r#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (r#"{"model":"m"}"#, r#"{"model":"x"}"#),
        ];
        for (body, expected) in cases {
            let out = rewrite(body, "x", true);
            assert_eq!(out, expected);
            serde_json::from_str::<serde_json::Value>(&out).unwrap();
        }
        let asked =
            parse_chat_request(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(asked.include_usage);
        assert!(!parse_chat_request(br#"{"model":"m","stream":true}"#).unwrap().include_usage);
    }

    #[test]
    fn adds_the_cost_to_usage() {
        let with = with_cost(br#"{"id":"a","usage":{"prompt_tokens":3,"completion_tokens":5}}"#, "0.00012").unwrap();
        assert_eq!(&with[..], br#"{"id":"a","usage":{"prompt_tokens":3,"completion_tokens":5,"cost":0.00012}}"#);
        let empty = with_cost(br#"{"usage":{}}"#, "1").unwrap();
        assert_eq!(&empty[..], br#"{"usage":{"cost":1}}"#);
        let none = with_cost(br#"{"id":"a"}"#, "2.5").unwrap();
        assert_eq!(&none[..], br#"{"id":"a","usage":{"cost":2.5}}"#);
        assert_eq!(&with_cost(b"{ }", "3").unwrap()[..], br#"{ "usage":{"cost":3}}"#, "no comma in an empty object");
        assert_eq!(with_cost(b"[DONE]", "1"), None);
    }

    #[test]
    fn reads_usage_and_output_of_a_whole_answer() {
        let answer = br#"{"choices":[{"message":{"role":"assistant","content":"Hello!"}}],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#;
        let info = answer_info(answer).unwrap();
        assert_eq!(info.usage, Some(Usage { prompt: 9, completion: 2, ..Usage::default() }));
        assert_eq!(info.output_bytes, 0, "with usage, the output is not counted");
        let with = info.with_cost(&Bytes::from_static(answer), "0.5");
        assert!(with.ends_with(br#""completion_tokens":2,"cost":0.5}}"#), "{with:?}");

        let bare = br#"{"choices":[{"message":{"role":"assistant","content":"Hello!"}}]}"#;
        let info = answer_info(bare).unwrap();
        assert_eq!((info.usage, info.output_bytes), (None, 6));
        assert_eq!(
            &info.with_cost(&Bytes::from_static(bare), "1")[..],
            &br#"{"choices":[{"message":{"role":"assistant","content":"Hello!"}}],"usage":{"cost":1}}"#[..]
        );
        assert!(answer_info(b"<html>").is_err());
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
    fn reads_openrouter_routing_fields() {
        let body = br#"{"model":"a","models":["b","c"],"max_tokens":100,"max_completion_tokens":50,
            "provider":{"order":["x"],"only":["x","y"],"ignore":["z"],"allow_fallbacks":false,"sort":{"by":"latency"},
            "max_price":{"prompt":1.5,"completion":2e1,"request":0,"image":9},
            "preferred_max_latency":{"p50":0.5,"p99":2},"preferred_min_throughput":30.5,"data_collection":"deny"}}"#;
        let req = parse_chat_request(body).unwrap();
        assert_eq!(req.models, ["b", "c"]);
        assert_eq!(req.max_tokens, Some(50));
        let p = &req.prefs;
        assert_eq!((p.order.len(), p.only.as_ref().map(Vec::len), p.ignore.len()), (1, Some(2), 1));
        assert!(!p.allow_fallbacks);
        assert_eq!(p.sort, Some(Sort::Latency));
        assert_eq!(p.max_price, MaxPrice { prompt: Some(1_500_000), completion: Some(20_000_000), request: Some(0) });
        assert_eq!(p.max_latency, Cutoffs([Some(500_000), None, None, Some(2_000_000)]));
        assert_eq!(p.min_throughput, Cutoffs([Some(30_500), None, None, None]));

        let defaults = parse_chat_request(br#"{"model":"a"}"#).unwrap();
        assert_eq!(defaults.prefs, Prefs::default());
        assert!(defaults.models.is_empty());
    }

    #[test]
    fn rejects_unusable_routing_fields() {
        for (body, field) in [
            (r#"{"model":"a","provider":{"sort":"speed"}}"#, "provider.sort"),
            (r#"{"model":"a","provider":{"max_price":{"prompt":-1}}}"#, "provider.max_price.prompt"),
            (r#"{"model":"a","provider":{"preferred_max_latency":{"p50":"fast"}}}"#, "provider.preferred_max_latency"),
        ] {
            match parse_chat_request(body.as_bytes()) {
                Err(RequestError::InvalidField(f, _)) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_chat_request(br#"{"model":"a","models":"b"}"#),
            Err(RequestError::WrongType { field, .. }) if field == "models"
        ));
    }

    #[test]
    fn renames_the_model_of_an_answer() {
        let renamed = rename_model(br#"{"id":"x","model":"gpt-4o-2024-08-06","choices":[]}"#, r#""chat""#).unwrap();
        assert_eq!(&renamed[..], br#"{"id":"x","model":"chat","choices":[]}"#);
        assert_eq!(rename_model(b"[DONE]", r#""chat""#), None);
    }

    #[test]
    fn renames_the_model_of_each_event() {
        let events = b"data: {\"model\":\"up\",\"x\":1}\r\n\r\n: keep\n\ndata: [DONE]\n\n";
        let renamed = rename_events(events, r#""chat""#);
        assert_eq!(&renamed[..], b"data: {\"model\":\"chat\",\"x\":1}\r\n\r\n: keep\n\ndata: [DONE]\n\n");
    }

    /// Every reader of caller and upstream bytes, on any bytes: an answer or an error, never a
    /// panic.
    fn read_all(input: &[u8]) {
        if let Ok(chat) = parse_chat_request(input) {
            let body = Bytes::copy_from_slice(input);
            let _ = chat.upstream_body(&body, "\"m\"", true);
        }
        if let Ok(info) = answer_info(input) {
            let _ = info.with_cost(&Bytes::copy_from_slice(input), "0.5");
        }
        let _ = with_cost(input, "0.5");
        let _ = rename_model(input, "\"m\"");
        let _ = rename_events(input, "\"m\"");
        let _ = is_context_length_error(400, input);
        let _ = upstream_error_message(input);
        let _ = mentions_usage(input);
        let _ = chunk_info(input);
        let _ = text_chunk_info(input);
        if let Ok(Some((_, span))) = optional_model(input) {
            let _ = crate::providers::splice(input, span, b"\"m\"");
        }
        for payload in sse::payloads(input) {
            let _ = chunk_info(payload);
            let _ = text_chunk_info(payload);
        }
    }

    #[test]
    fn no_cut_or_stray_byte_makes_a_reader_panic() {
        let request = br#"{"model":"chat","models":["b"],"stream":true,"stream_options":{"include_usage":true},"max_tokens":64,"provider":{"order":["x"],"sort":"price"},"messages":[{"role":"user","content":"Say \"hi\"\\"}]}"#;
        let answer = br#"{"id":"c","model":"up","choices":[{"message":{"content":"Hi \"there\"","refusal":null,"tool_calls":[{"function":{"arguments":"{}"}}]}}],"usage":{"prompt_tokens":3,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":1}}}"#;
        let events = b"data: {\"model\":\"up\",\"choices\":[{\"delta\":{\"content\":\"a\\\\\"}}]}\r\n\r\n: keep\n\ndata: {\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let error = br#"{"error":{"message":"This model's maximum context length is 8192 tokens","code":"context_length_exceeded"}}"#;
        for input in [&request[..], answer, events, error] {
            for end in 0..=input.len() {
                read_all(&input[..end]);
            }
            for at in 0..input.len() {
                for stray in [b'"', b'\\', b'{', b'}', b':', b'[', b'\n', 0xff] {
                    let mut bent = input.to_vec();
                    bent[at] = stray;
                    read_all(&bent);
                }
            }
        }
    }

    #[test]
    fn recognises_output_and_usage_in_chunks() {
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(chunk_info(role), ChunkInfo::default());
        let word = br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        assert!(chunk_info(word).has_output);
        let tool = br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#;
        assert!(chunk_info(tool).has_output);
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}}"#;
        let expected = Usage { prompt: 3, completion: 7, cached_prompt: 2, ..Usage::default() };
        assert_eq!(chunk_info(usage), ChunkInfo { usage: Some(expected), ..ChunkInfo::default() });
        assert_eq!(chunk_info(word).output_bytes, 2);
        let escaped =
            br#"{"choices":[{"delta":{"content":"say \"content\":\"x\" \\"},"logprobs":{"content":[{"token":"a"}]}}]}"#;
        assert_eq!(chunk_info(escaped).output_bytes, 24, "escapes stay inside the string; logprobs are not output");
        let spaced = br#"{ "choices": [ { "delta": { "content" : "abc" } } ], "usage" : { "completion_tokens": 3 } }"#;
        let info = chunk_info(spaced);
        assert_eq!((info.has_output, info.output_bytes, info.usage.map(|u| u.completion)), (true, 3, Some(3)));
        let args = br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}]}"#;
        assert_eq!(chunk_info(args), ChunkInfo { has_output: true, output_bytes: 10, ..ChunkInfo::default() });
        assert_eq!(chunk_info(b"[DONE]"), ChunkInfo::default());
        // Garbage from an upstream: events cut off inside a string, after a backslash.
        for (cut, bytes) in [(&b"{\"content\":\"abc\\"[..], 4), (b"{\"content\":\"\\", 1), (b"{\"content\":\"", 0)] {
            assert_eq!(chunk_info(cut).output_bytes, bytes, "{:?}", String::from_utf8_lossy(cut));
        }
        // Every cut of every event above reads without a panic.
        for event in [&role[..], word, tool, usage, escaped, spaced, args] {
            for end in 0..=event.len() {
                chunk_info(&event[..end]);
            }
        }
        let events = b"data: {\"a\":1}\n\n: comment\n\ndata:[DONE]\r\n\r\n";
        assert_eq!(sse::payloads(events).collect::<Vec<_>>(), [&b"{\"a\":1}"[..], b"[DONE]"]);
    }

    #[test]
    fn a_nested_key_of_the_same_name_reads_the_same_before_or_after() {
        let pairs: [(&[u8], &[u8]); 2] = [
            (
                br#"{"models":{"tool_calls":null},"tool_calls":[]}"#,
                br#"{"tool_calls":[],"models":{"tool_calls":null}}"#,
            ),
            (
                br#"{"x":{"usage":{"prompt_tokens":1}},"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
                br#"{"usage":{"prompt_tokens":5,"completion_tokens":2},"x":{"usage":{"prompt_tokens":1}}}"#,
            ),
        ];
        for (one, other) in pairs {
            assert_eq!(chunk_info(one), chunk_info(other), "{}", String::from_utf8_lossy(one));
        }
        assert!(!chunk_info(pairs[0].0).has_output, "an empty tool_calls list is no output");
        assert_eq!(chunk_info(pairs[1].0).usage.map(|u| u.prompt), Some(5));
    }

    #[test]
    fn recognises_context_length_errors() {
        let openai = br#"{"error":{"message":"This model's maximum context length is 8192 tokens.","code":"context_length_exceeded"}}"#;
        assert!(is_context_length_error(400, openai));
        assert!(is_context_length_error(
            400,
            br#"{"type":"error","error":{"message":"prompt is too long: 250000 tokens"}}"#
        ));
        assert!(!is_context_length_error(400, br#"{"error":{"message":"Invalid temperature"}}"#));
        assert!(!is_context_length_error(500, openai));
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(parse_chat_request(br#"{"messages":[]}"#).unwrap_err(), RequestError::MissingModel);
        assert_eq!(parse_chat_request(br#"{"model":7}"#).unwrap_err(), RequestError::InvalidModel);
        assert_eq!(parse_chat_request(br#"{"model":null}"#).unwrap_err(), RequestError::MissingModel);
        assert!(matches!(parse_chat_request(br#"{"model":"m""#), Err(RequestError::InvalidJson(_))));
        assert!(matches!(parse_chat_request(br#"[1]"#), Err(RequestError::InvalidJson(_))));
        assert_eq!(
            parse_chat_request(br#"{"model":"m","stream":"yes"}"#).unwrap_err(),
            RequestError::WrongType {
                field: "stream".into(),
                detail: r#"invalid type: string "yes", expected a boolean"#.into()
            }
        );
        assert!(matches!(
            parse_chat_request(br#"{"model":"m","provider":{"order":[1]}}"#),
            Err(RequestError::WrongType { field, .. }) if field == "provider.order[0]"
        ));
        assert!(matches!(parse_chat_request(br#"{"model":"a","model":"b"}"#), Err(RequestError::InvalidJson(_))));
        assert!(matches!(parse_chat_request(b"{\"model\":\"m\"} trailing"), Err(RequestError::InvalidJson(_))));
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::read_all;
        use super::*;
        use crate::providers::arbitrary::{json, mutated, request};

        fn encodings(value: Value) -> impl Strategy<Value = Vec<u8>> {
            let compact = serde_json::to_vec(&value).unwrap_or_default();
            let pretty = serde_json::to_vec_pretty(&value).unwrap_or_default();
            prop_oneof![Just(compact.clone()), Just(pretty), mutated(compact)]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn no_bytes_make_a_reader_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                read_all(&bytes);
            }

            #[test]
            fn no_near_request_makes_a_reader_panic(bytes in request().prop_flat_map(encodings)) {
                read_all(&bytes);
            }

            #[test]
            fn the_model_splice_changes_model_and_usage_only(
                original in request(),
                body in Just(()).prop_flat_map(|()| prop_oneof![Just(false), Just(true)]),
                force in any::<bool>(),
                model in ".{0,10}",
            ) {
                let bytes = if body { serde_json::to_vec_pretty(&original) } else { serde_json::to_vec(&original) };
                let bytes = Bytes::from(bytes.unwrap_or_default());
                // Compared as read back: serde_json's float printing and parsing do not round-trip.
                let original: Value = serde_json::from_slice(&bytes).expect("JSON");
                let Ok(chat) = parse_chat_request(&bytes) else { return Ok(()) };
                let out = chat.upstream_body(&bytes, &json_string(&model), force);
                let sent: Value = serde_json::from_slice(&out).expect("the upstream body is JSON");
                prop_assert_eq!(&sent["model"], &Value::from(model.as_str()));
                let turned_on = force && chat.stream && !chat.include_usage;
                for (key, value) in original.as_object().into_iter().flatten() {
                    if key == "model" || (turned_on && key == "stream_options") {
                        continue;
                    }
                    prop_assert_eq!(&sent[key], value, "field {}", key);
                }
                if turned_on {
                    prop_assert_eq!(&sent["stream_options"]["include_usage"], &Value::Bool(true));
                }
            }

            #[test]
            fn the_cost_lands_in_usage_of_any_object(object in prop::collection::vec((crate::providers::arbitrary::key(), json()), 0..6)) {
                let object: serde_json::Map<String, Value> = object.into_iter().collect();
                let bytes = Bytes::from(serde_json::to_vec(&object).unwrap_or_default());
                let info = answer_info(&bytes).expect("an object is an answer");
                for out in [info.with_cost(&bytes, "1.5"), with_cost(&bytes, "1.5").expect("an object takes a cost")] {
                    let read: Value = serde_json::from_slice(&out).expect("still JSON");
                    prop_assert_eq!(&read["usage"]["cost"], &Value::from(1.5));
                }
            }

            #[test]
            fn a_chunk_counts_its_content_bytes_and_reads_its_usage(
                content in ".{0,20}",
                prompt in any::<u64>(),
                completion in any::<u64>(),
                with_usage in any::<bool>(),
            ) {
                let mut chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": content}}]});
                if with_usage {
                    chunk["usage"] = serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion});
                }
                let info = chunk_info(&serde_json::to_vec(&chunk).unwrap_or_default());
                let escaped = json_string(&content).len() - 2;
                prop_assert_eq!(info.output_bytes, escaped as u64);
                prop_assert_eq!(info.has_output, !content.is_empty());
                let expected = with_usage.then_some(Usage { prompt, completion, ..Usage::default() });
                prop_assert_eq!(info.usage, expected);
            }

            #[test]
            fn renaming_changes_the_model_only(original in request(), model in ".{0,10}") {
                let bytes = serde_json::to_vec(&original).unwrap_or_default();
                let original: Value = serde_json::from_slice(&bytes).expect("JSON");
                let out = rename_model(&bytes, &json_string(&model)).expect("an object with a string model");
                let mut read: Value = serde_json::from_slice(&out).expect("still JSON");
                prop_assert_eq!(&read["model"], &Value::from(model.as_str()));
                read["model"] = original["model"].clone();
                prop_assert_eq!(read, original);
            }
        }
    }
}
