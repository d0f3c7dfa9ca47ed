//! An OTLP/HTTP trace receiver on 127.0.0.1, as a collector would be: it decodes what an
//! exporter sends (protobuf) and keeps each span with the service that sent it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use super::eventually_or_explain;

/// What the receiver got: each span, with the service that sent it.
#[derive(Clone, Default)]
pub struct Received(pub Arc<Mutex<Vec<(String, Span)>>>);

async fn receive(State(received): State<Received>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
    for resource_spans in request.resource_spans {
        let attributes = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
        let service = attributes
            .iter()
            .find(|a| a.key == "service.name")
            .and_then(|a| text(a.value.as_ref()))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.0.lock().unwrap().push((service.clone(), span));
            }
        }
    }
    ""
}

/// A receiver on 127.0.0.1: its address, and what it gets.
pub async fn receiver() -> (std::net::SocketAddr, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive)).with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

fn text(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::ArrayValue(a) => {
            Some(format!("{:?}", a.values.iter().map(|v| text(Some(v))).collect::<Vec<_>>()))
        }
        other => Some(format!("{other:?}")),
    }
}

/// A span's attributes as text.
pub fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes.iter().map(|a| (a.key.clone(), text(a.value.as_ref()).unwrap_or_default())).collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of trace `trace` (hex), once `n` have arrived, by start time.
pub async fn spans_of(received: &Received, trace: &str, n: usize) -> Vec<Span> {
    let of = || -> Vec<Span> {
        received.0.lock().unwrap().iter().filter(|(_, s)| hex(&s.trace_id) == trace).map(|(_, s)| s.clone()).collect()
    };
    eventually_or_explain(
        &format!("{n} spans of trace {trace}"),
        || std::future::ready(of().len() >= n),
        || format!("{:#?}", received.0.lock().unwrap()),
    )
    .await;
    let mut spans = of();
    spans.sort_by_key(|s| s.start_time_unix_nano);
    spans
}
