//! A traced request's spans, built from its record when it ends: one for the request (a server
//! span, the child of the caller's `traceparent` when it sent one) and one for each attempt (a
//! client span, whose id went upstream in the attempt's `traceparent`), with the attributes of
//! OpenTelemetry's GenAI semantic conventions and Sideyard's own. Never a prompt, an answer or a
//! credential.

use std::borrow::Cow;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, KeyValue, StringValue, Value};

use super::{End, Exchange};
use crate::api::units::format_micros;
use crate::traces::{Place, Span, Traces, child_span};

/// The `traceparent` of attempt `n` (from 0) of a request placed at `request`.
pub fn attempt_traceparent(request: &Place, n: usize) -> String {
    Place { span: child_span(request.span, n), parent: Some(request.span), ..*request }.traceparent()
}

pub fn export(x: &Exchange, place: Place, traces: &Traces) {
    let at = |offset| x.created + offset;
    let operation = x.route().map_or("chat", |r| r.serves.as_str());
    let model = x.model.as_deref().unwrap_or_default();
    let mut attributes = vec![
        KeyValue::new("http.request.method", x.method.to_string()),
        KeyValue::new("url.path", x.path.clone()),
        KeyValue::new("http.response.status_code", i64::from(x.status)),
        KeyValue::new("sideyard.attempts", x.attempts as i64),
        KeyValue::new("sideyard.hedged", x.hedged),
        KeyValue::new("sideyard.end", x.end.as_str().to_string()),
    ];
    if x.routed {
        attributes.push(KeyValue::new("gen_ai.operation.name", operation));
    }
    if !model.is_empty() {
        attributes.push(KeyValue::new("gen_ai.request.model", model.to_string()));
    }
    if let Some(route) = x.route() {
        attributes.push(KeyValue::new("sideyard.route", route.id.clone()));
    }
    if let Some(target) = x.target() {
        attributes.push(KeyValue::new("sideyard.target", target.name.clone()));
        attributes.push(KeyValue::new("gen_ai.provider.name", target.provider.clone()));
        attributes.push(KeyValue::new("gen_ai.response.model", target.model.clone()));
    }
    if let Some(reason) = x.fallback {
        attributes.push(KeyValue::new("sideyard.fallback_reason", reason.as_str()));
    }
    if let Some(cost) = x.cost {
        attributes.push(KeyValue::new("sideyard.cost", format_micros(cost)));
    }
    if let Some(budget) = &x.budget {
        attributes.push(KeyValue::new("sideyard.budget", budget.clone()));
    }
    if let Some(id) = &x.request_id {
        attributes.push(KeyValue::new("sideyard.request_id", id.clone()));
    }
    let answer = answer_attributes(x);
    attributes.extend(answer.iter().cloned());
    if let Some(content) = &x.content {
        attributes.push(KeyValue::new("gen_ai.input.messages", content.input.clone()));
        let output = serde_json::json!([{
            "role": "assistant",
            "parts": [{"type": "text", "content": content.output}],
            "finish_reason": x.finish_reason,
        }]);
        attributes.push(KeyValue::new("gen_ai.output.messages", output.to_string()));
    }
    let failed = x.status >= 500 || matches!(x.end, End::Broken(_));
    let status = if failed { Status::error(format!("{} {}", x.status, x.end.as_str())) } else { Status::Unset };
    // A call passed through is named as HTTP names it; a routed one as the GenAI conventions do.
    let name = match (x.routed, model) {
        (false, _) => Cow::Owned(format!("{} {}", x.method, x.path)),
        (true, "") => Cow::Borrowed(operation),
        (true, model) => Cow::Owned(format!("{operation} {model}")),
    };
    traces.export(Span {
        place,
        remote_parent: place.parent.is_some(),
        kind: SpanKind::Server,
        name,
        start: x.created,
        end: at(x.duration),
        attributes,
        status,
    });

    for (n, t) in x.tries.iter().enumerate() {
        let target = t.target();
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", t.route.serves.as_str()),
            KeyValue::new("gen_ai.provider.name", target.provider.clone()),
            KeyValue::new("gen_ai.request.model", target.model.clone()),
            KeyValue::new("sideyard.route", t.route.id.clone()),
            KeyValue::new("sideyard.target", target.name.clone()),
            KeyValue::new("sideyard.attempt", n as i64 + 1),
            KeyValue::new("sideyard.hedge", t.hedge),
        ];
        let status = match t.failure {
            Some((reason, upstream)) => {
                attributes.push(KeyValue::new("error.type", reason.as_str()));
                attributes.push(KeyValue::new("sideyard.fallback_reason", reason.as_str()));
                if let Some(code) = upstream {
                    attributes.push(KeyValue::new("http.response.status_code", i64::from(code)));
                }
                Status::error(reason.as_str())
            }
            None if t.cancelled => {
                attributes.push(KeyValue::new("error.type", "cancelled"));
                Status::Unset
            }
            None => {
                attributes.push(KeyValue::new("gen_ai.response.model", target.model.clone()));
                attributes.push(KeyValue::new("http.response.status_code", i64::from(x.status)));
                attributes.extend(answer.iter().cloned());
                Status::Unset
            }
        };
        let child = Place { span: child_span(place.span, n), parent: Some(place.span), ..place };
        traces.export(Span {
            place: child,
            remote_parent: false,
            kind: SpanKind::Client,
            name: Cow::Owned(format!("{} {}", t.route.serves.as_str(), target.model)),
            start: at(t.started),
            end: t.ended.map_or_else(|| at(x.duration), at),
            attributes,
            status,
        });
    }
}

/// What the answer says: its id, usage and finish reason.
fn answer_attributes(x: &Exchange) -> Vec<KeyValue> {
    let mut out = Vec::new();
    if let Some(id) = &x.answer_id {
        out.push(KeyValue::new("gen_ai.response.id", id.clone()));
    }
    if let Some(usage) = &x.usage {
        out.push(KeyValue::new("gen_ai.usage.input_tokens", usage.prompt as i64));
        out.push(KeyValue::new("gen_ai.usage.output_tokens", usage.completion as i64));
        out.push(KeyValue::new("gen_ai.usage.cache_read.input_tokens", usage.cached_prompt as i64));
    }
    if let Some(reason) = &x.finish_reason {
        let reasons = Array::String(vec![StringValue::from(reason.clone())]);
        out.push(KeyValue::new("gen_ai.response.finish_reasons", Value::Array(reasons)));
    }
    out
}
