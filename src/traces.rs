//! OpenTelemetry traces over OTLP/HTTP (protobuf), for the sidecar and the operator. Their owners
//! build each span after the fact, with explicit ids and times, from what they recorded anyway;
//! here they are sampled, batched and exported by a background task, so that nothing waits on the
//! collector. Off unless an endpoint is configured: `--otlp-endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (with
//! `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`, `OTEL_SERVICE_NAME` and `OTEL_SDK_DISABLED` as the
//! specification says).

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanExporter, SpanLinks};
use tokio::sync::mpsc;

use crate::metrics::header;

/// Spans waiting for export; beyond, new spans are dropped (and counted).
const QUEUE: usize = 4096;
/// Spans per export.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_millis(500);

/// What reaches the collector, over TLS or not.
pub type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// How the process exports traces.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TraceArgs {
    /// OTLP/HTTP endpoint of the trace collector (`http://collector:4318`; `/v1/traces` is
    /// appended). Without it, the standard `OTEL_EXPORTER_OTLP_ENDPOINT` and
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` are read; with neither, nothing is traced.
    #[arg(long, env = "SIDEYARD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The fraction of traces started here that are recorded, from 0 to 1; a request that comes
    /// with a `traceparent` follows its sampled flag.
    #[arg(long, env = "SIDEYARD_TRACE_SAMPLING_RATIO", default_value = "1", value_parser = parse_ratio)]
    pub trace_sampling_ratio: f64,
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{text:?} is not a ratio from 0 to 1, such as 0.1")),
    }
}

/// The exporter's queue and what it did.
pub struct Traces {
    queue: mpsc::Sender<SpanData>,
    /// Asks the export task to send what is queued now, and says when it has.
    flushes: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    /// Trace ids at or below this are sampled (the specification's TraceIdRatioBased).
    threshold: u64,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
    pub dropped: AtomicU64,
    pub exported: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

/// A span's place in its trace: the trace, its own id, its parent's, and whether it is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub trace: TraceId,
    pub span: SpanId,
    /// The caller's span, when the trace came with the request.
    pub parent: Option<SpanId>,
    pub sampled: bool,
}

impl Place {
    /// The `traceparent` that makes a callee's spans children of this one.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace, self.span, u8::from(self.sampled))
    }
}

impl Traces {
    /// Starts the export task when traces are configured; `Ok(None)` when they are not. Must run
    /// inside the Tokio runtime. `connector` reaches the collector; `None`: one that trusts the
    /// Mozilla roots bundled in the binary.
    pub fn start(
        args: &TraceArgs,
        service: &'static str,
        connector: Option<Connector>,
    ) -> Result<Option<Arc<Traces>>, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let configured = args.otlp_endpoint.is_some()
            || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
        if !configured {
            return Ok(None);
        }
        let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(p) = protocol.filter(|p| p != "http/protobuf") {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported: Sideyard exports OTLP over HTTP with protobuf (the collector's port 4318); set it to http/protobuf or leave it unset"
            ));
        }
        let connector = match connector {
            Some(connector) => connector,
            None => hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
                .map_err(|e| format!("TLS for the trace collector: {e}"))?
                .https_or_http()
                .enable_http1()
                .build(),
        };
        let timeout = Duration::from_secs(10);
        let client = opentelemetry_http::hyper::HyperClient::new(connector, timeout, None);
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http().with_http_client(client);
        if let Some(endpoint) = &args.otlp_endpoint {
            let url: http::Uri = endpoint.parse().map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
            if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
                return Err(format!("--otlp-endpoint {endpoint:?} is not an http:// or https:// URL"));
            }
            builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
        }
        let mut exporter = builder.build().map_err(|e| format!("the OTLP trace exporter: {e}"))?;
        let service_name = env("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_string());
        exporter.set_resource(&Resource::builder().with_service_name(service_name).build());
        let (queue, spans) = mpsc::channel(QUEUE);
        let (flushes, flush_requests) = mpsc::channel(1);
        let traces = Arc::new(Traces {
            queue,
            flushes,
            threshold: (args.trace_sampling_ratio * u64::MAX as f64) as u64,
            ids: RandomIdGenerator::default(),
            scope: InstrumentationScope::builder("sideyard").with_version(env!("CARGO_PKG_VERSION")).build(),
            dropped: AtomicU64::new(0),
            exported: Arc::default(),
            failed: Arc::default(),
        });
        tokio::spawn(export(exporter, spans, flush_requests, traces.exported.clone(), traces.failed.clone()));
        Ok(Some(traces))
    }

    /// Where a new span goes: under the caller's `traceparent` when it has a valid one (sampled as
    /// it says), else at the root of a new trace (sampled by the ratio).
    pub fn place(&self, traceparent: Option<&[u8]>) -> Place {
        let span = self.ids.new_span_id();
        match traceparent.and_then(parse_traceparent) {
            Some((trace, parent, sampled)) => Place { trace, span, parent: Some(parent), sampled },
            None => {
                let trace = self.ids.new_trace_id();
                // The lower 8 bytes of a random trace id are random.
                let low = u64::from_be_bytes(trace.to_bytes()[8..].try_into().unwrap_or_default());
                Place { trace, span, parent: None, sampled: low <= self.threshold }
            }
        }
    }

    /// Records one span that started at `start` and ends now, with no children: under `traceparent`
    /// when the caller sent one, else at the root of a new trace; if it is sampled.
    pub fn record(
        &self,
        traceparent: Option<&[u8]>,
        kind: SpanKind,
        name: impl Into<Cow<'static, str>>,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        error: Option<String>,
    ) {
        let place = self.place(traceparent);
        if !place.sampled {
            return;
        }
        let status = error.map_or(Status::Unset, Status::error);
        let remote_parent = place.parent.is_some();
        let span =
            Span { place, remote_parent, kind, name: name.into(), start, end: SystemTime::now(), attributes, status };
        self.export(span);
    }

    /// Sends what is queued, waiting at most `within`: at shutdown, so that the last requests'
    /// spans are not lost with the process.
    pub async fn flush(&self, within: Duration) {
        let (done, exported) = tokio::sync::oneshot::channel();
        let flushed = async {
            if self.flushes.send(done).await.is_ok() {
                let _ = exported.await;
            }
        };
        if tokio::time::timeout(within, flushed).await.is_err() {
            tracing::warn!(within = ?within, "the last spans were not all exported before shutdown");
        }
    }

    /// What became of the spans, as Prometheus text.
    pub fn render(&self, out: &mut String) {
        header(
            out,
            "sideyard_trace_spans_total",
            "counter",
            "Spans by what became of them: exported, failed (the collector refused them or could not be reached) or dropped (the export queue was full).",
        );
        for (result, n) in [("exported", &*self.exported), ("failed", &*self.failed), ("dropped", &self.dropped)] {
            let _ = writeln!(out, "sideyard_trace_spans_total{{result=\"{result}\"}} {}", n.load(Relaxed));
        }
    }

    /// Queues a finished span for export; never waits. A full queue drops it.
    pub fn export(&self, span: Span) {
        let data = SpanData {
            span_context: SpanContext::new(
                span.place.trace,
                span.place.span,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: span.place.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: span.remote_parent,
            span_kind: span.kind,
            name: span.name,
            start_time: span.start,
            end_time: span.end,
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: span.status,
            instrumentation_scope: self.scope.clone(),
        };
        if self.queue.try_send(data).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// The process's traces, for code that has no handle of its own to pass them through (the
/// operator's reconciles and ledger calls), as OpenTelemetry's global provider would be.
static GLOBAL: std::sync::OnceLock<Arc<Traces>> = std::sync::OnceLock::new();

impl Traces {
    /// Makes `traces` the process's own; the first call wins.
    pub fn set_global(traces: Arc<Traces>) {
        let _ = GLOBAL.set(traces);
    }

    pub fn global() -> Option<&'static Arc<Traces>> {
        GLOBAL.get()
    }
}

/// A finished span, as its owner built it.
pub struct Span {
    pub place: Place,
    /// The parent is another process's span (the caller's).
    pub remote_parent: bool,
    pub kind: SpanKind,
    pub name: Cow<'static, str>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub status: Status,
}

/// Exports batches of up to [`BATCH`] spans, each sent when full or [`LINGER`] after its first
/// span, or at once when a flush asks; until the queue closes.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut spans: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    exported: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let send = |batch: Vec<SpanData>| {
        let n = batch.len() as u64;
        let export = exporter.export(batch);
        let (exported, failed) = (exported.clone(), failed.clone());
        async move {
            match export.await {
                Ok(()) => exported.fetch_add(n, Relaxed),
                Err(e) => {
                    tracing::warn!(spans = n, error = %e, "exporting traces failed; the spans are dropped");
                    failed.fetch_add(n, Relaxed)
                }
            };
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut deadline = None;
    loop {
        let linger = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            span = spans.recv() => match span {
                Some(span) => {
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + LINGER);
                    batch.push(span);
                    if batch.len() < BATCH {
                        continue;
                    }
                }
                None => {
                    if !batch.is_empty() {
                        send(batch).await;
                    }
                    return;
                }
            },
            () = linger => {}
            Some(done) = flushes.recv() => {
                while let Ok(span) = spans.try_recv() {
                    batch.push(span);
                }
                for chunk in std::mem::take(&mut batch).chunks(BATCH) {
                    send(chunk.to_vec()).await;
                }
                deadline = None;
                let _ = done.send(());
                continue;
            }
        }
        deadline = None;
        if !batch.is_empty() {
            send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).await;
        }
    }
}

/// A W3C `traceparent` (`00-<trace>-<parent>-<flags>`): the trace, the caller's span, and whether
/// it is sampled; `None` for anything else, or for the all-zero ids the format forbids.
pub fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, bool)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; a later version may add some after them.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    fn hex(s: &str, len: usize) -> Option<&str> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(s)
    }
    u8::from_str_radix(hex(version, 2)?, 16).ok()?;
    let trace = TraceId::from_hex(hex(trace, 32)?).ok().filter(|t| *t != TraceId::INVALID)?;
    let parent = SpanId::from_hex(hex(parent, 16)?).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(hex(flags, 2)?, 16).ok()?;
    Some((trace, parent, flags & 1 == 1))
}

/// A span id derived from `base` for the `n`th child, so that a child's id is known before the
/// child is recorded (it goes upstream in `traceparent`) without keeping it anywhere.
pub fn child_span(base: SpanId, n: usize) -> SpanId {
    // splitmix64: distinct `n` give distinct, well-spread ids.
    let mut z = u64::from_be_bytes(base.to_bytes()).wrapping_add((n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    SpanId::from_bytes(z.max(1).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_traceparent_is_read_as_the_w3c_format_says() {
        let valid = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, parent, sampled) = parse_traceparent(valid).expect("valid");
        assert_eq!(trace.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.to_string(), "00f067aa0ba902b7");
        assert!(sampled);
        assert_eq!(
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").map(|t| t.2),
            Some(false)
        );
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6-00f067aa0ba902b7-01",
            b"",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version may carry more fields.
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
    }

    #[test]
    fn a_place_written_as_traceparent_reads_back() {
        let place = Place {
            trace: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            span: child_span(SpanId::from_bytes([1; 8]), 3),
            parent: None,
            sampled: true,
        };
        assert_eq!(parse_traceparent(place.traceparent().as_bytes()), Some((place.trace, place.span, true)));
    }

    proptest! {
        #[test]
        fn any_bytes_are_a_traceparent_or_none(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_traceparent(&bytes);
        }

        #[test]
        fn children_of_one_span_have_distinct_valid_ids(base in any::<[u8; 8]>()) {
            let ids: std::collections::HashSet<SpanId> = (0..32).map(|n| child_span(SpanId::from_bytes(base), n)).collect();
            prop_assert_eq!(ids.len(), 32);
            prop_assert!(!ids.contains(&SpanId::INVALID));
        }
    }
}
