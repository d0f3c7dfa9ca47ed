//! A fixed batch of requests through the sidecar's API service, in process, against a minimal upstream
//! on 127.0.0.1 that answers with canned bytes. Run under `valgrind --tool=callgrind`, it counts
//! the instructions the request path costs; `.ci/run` fails when the count grows more than 20%
//! over `bench/hot_path.instructions`.
//!
//! One route with three targets and one budget, as in the load benchmark: JSON and streamed
//! requests, each with an API key. The budget is kept as the first argument says:
//!
//! - `standalone` (the default): the embedded ledger, as counted by `.ci/run`;
//! - `leased`: leased from the operator's ledger, which runs in process on its own thread (so
//!   callgrind counts it apart) behind HTTPS, with an in-memory status store;
//! - `low`: the same budget below its `lowBalanceThreshold`, so that every request reserves and
//!   settles with the ledger (sent 100 at a time);
//! - `low-latency`: per-request mode timed rather than counted: 200 requests/s, open loop, for
//!   10 s, against a status store whose writes take 10 ms (as an API server's), beside the same
//!   requests to a route without a budget; prints the latency percentiles of both and the status
//!   writes per second (docs/benchmarks.md, "Per-request mode's latency");
//! - `leased-latency`: the same timing with a fresh budget in state Active, spent from leases
//!   from its first second.
//!
//!
//! Then the two APIs across the two wire formats, with the standalone budget (for the 1.5x bound
//! a translated request keeps to a passthrough one):
//!
//! - `to-anthropic`: chat completions to targets that speak Anthropic's Messages API (translated);
//! - `messages`: `/v1/messages` to Anthropic targets (passed through);
//! - `messages-to-openai`: `/v1/messages` to OpenAI-compatible targets (translated);
//! - `responses`: `/v1/responses` to targets that speak it (passed through);
//! - `responses-to-chat`: `/v1/responses` to chat-only targets (translated);
//! - `embeddings`: `/v1/embeddings` (JSON only), beside chat's passthrough.
//!
//! And what observing requests costs, with the standalone budget:
//!
//! - `observed`: the access log (JSON lines to standard error) and the generation store (1,000
//!   records) on;
//! - `traced`: traces exported over OTLP/HTTP to a receiver on 127.0.0.1 (on its own thread, so
//!   callgrind counts it apart), every request sampled; the run ends once every span is exported.
//!
//! It prints the wall time per request and, for the ledger, the calls it answered.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use futures::future::BoxFuture;
use sideyard::api::ApiKeyBudgetStatus;
use sideyard::config::{Budget, Documents, MapResolver, compile, parse_file};
use sideyard::operator::leader::Leadership;
use sideyard::operator::ledger::{BoundPod, FleetService, Review, Reviewer, StatusStore, router};
use sideyard::operator::metrics::OperatorMetrics;
use sideyard::operator::tls::{CertStore, certified_key, issue, serve_https};
use sideyard::sidecar::{Clients, FleetOptions, Limits, ObserverOptions, Observers, Shared, api_service};
use sideyard::traces::{TraceArgs, Traces};

const JSON_ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the upstream, all good."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;
const STREAM_ANSWER: &str = concat!(
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\n",
    "data: [DONE]\n\n",
);
const MESSAGES_ANSWER: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"Hello from the upstream, all good."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":8}}"#;
const MESSAGES_STREAM: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" there\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);
const RESPONSES_ANSWER: &str = r#"{"id":"resp_1","object":"response","created_at":1,"status":"completed","error":null,"incomplete_details":null,"model":"m","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hello from the upstream, all good.","annotations":[]}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},"output_tokens":8,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":20}}"#;
const RESPONSES_STREAM: &str = concat!(
    "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}\n\n",
    "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"sequence_number\":1,\"output_index\":0,\"item\":{\"type\":\"message\",\"id\":\"msg_1\",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]}}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hello\"}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":3,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" there\"}\n\n",
    "event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"sequence_number\":4,\"output_index\":0,\"item\":{\"type\":\"message\",\"id\":\"msg_1\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hello there\",\"annotations\":[]}]}}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":5,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"m\",\"output\":[{\"type\":\"message\",\"id\":\"msg_1\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hello there\",\"annotations\":[]}]}],\"usage\":{\"input_tokens\":12,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":2,\"total_tokens\":14}}}\n\n",
);
const EMBEDDINGS_ANSWER: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0123,-0.0456,0.0789,0.0012,-0.0345,0.0678,-0.0901,0.0234]}],"model":"m","usage":{"prompt_tokens":4,"total_tokens":4}}"#;
const REQUESTS: usize = 2000;
const MODES: [&str; 13] = [
    "standalone",
    "observed",
    "traced",
    "leased",
    "low",
    "low-latency",
    "leased-latency",
    "to-anthropic",
    "messages",
    "messages-to-openai",
    "responses",
    "responses-to-chat",
    "embeddings",
];
const KEY: &str = "sk-hot-path";

/// An OTLP/HTTP receiver on its own thread and runtime, answering every export with 200.
fn collector() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let service = service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                        let _ = request.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
    });
    addr
}

async fn upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                    let path = request.uri().path().to_string();
                    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
                    let (json, events) = match path.rsplit('/').next() {
                        Some("messages") => (MESSAGES_ANSWER, MESSAGES_STREAM),
                        Some("responses") => (RESPONSES_ANSWER, RESPONSES_STREAM),
                        Some("embeddings") => (EMBEDDINGS_ANSWER, ""),
                        _ => (JSON_ANSWER, STREAM_ANSWER),
                    };
                    let (content_type, answer) =
                        if stream { ("text/event-stream", events) } else { ("application/json", json) };
                    let response = http::Response::builder()
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from_static(answer.as_bytes())))
                        .expect("response");
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// Every token is pod `bench` of the namespace the budgets are compiled into.
struct AnyToken;

impl Reviewer for AnyToken {
    fn review<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Review, String>> {
        Box::pin(async {
            Ok(Review::Authenticated {
                username: "system:serviceaccount:default:default".into(),
                pod: Some(BoundPod { name: "bench".into(), uid: None }),
            })
        })
    }
}

/// Statuses in memory; a write takes `write_time`, as an API server's would.
#[derive(Default)]
struct Memory {
    statuses: std::sync::Mutex<std::collections::HashMap<String, ApiKeyBudgetStatus>>,
    write_time: std::time::Duration,
}

impl StatusStore for Memory {
    fn load<'a>(&'a self, _: &'a str, name: &'a str) -> BoxFuture<'a, Result<Option<ApiKeyBudgetStatus>, String>> {
        Box::pin(async move { Ok(self.statuses.lock().expect("store").get(name).cloned()) })
    }

    fn save<'a>(&'a self, _: &'a str, name: &'a str, status: ApiKeyBudgetStatus) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if !self.write_time.is_zero() {
                tokio::time::sleep(self.write_time).await;
            }
            self.statuses.lock().expect("store").insert(name.to_string(), status);
            Ok(())
        })
    }

    /// The benchmark's budgets have no top-up: nothing to tell.
    fn tell<'a>(&'a self, _: &'a str, _: &'a str, _: &'a str, _: String) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// The operator's ledger on its own thread and runtime: its port, its metrics, and the CA to
/// trust it by.
fn ledger(budgets: Vec<Budget>, write_time: std::time::Duration) -> (u16, Arc<OperatorMetrics>, String) {
    let cert = issue(&["localhost".into()], None, std::time::SystemTime::now()).expect("certificate");
    let (ready, started) = std::sync::mpsc::channel();
    let ca = cert.ca_cert.clone();
    std::thread::Builder::new()
        .name("ledger".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let metrics = Arc::new(OperatorMetrics::default());
                let (_, leader_url) = tokio::sync::watch::channel(None);
                let service = FleetService::new(
                    "bench".into(),
                    Leadership::fixed(true),
                    Arc::new(AnyToken),
                    Arc::new(Memory { write_time, ..Memory::default() }),
                    metrics.clone(),
                    leader_url,
                );
                service.sync_namespace("default", &budgets).await.expect("budgets");
                tokio::spawn(service.clone().keep_persisted(std::future::pending()));
                let certs = Arc::new(CertStore::default());
                certs.set(certified_key(&cert.cert, &cert.key).expect("key"));
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let port = listener.local_addr().expect("addr").port();
                ready.send((port, metrics)).expect("main thread");
                serve_https(listener, router(service), certs, std::future::pending()).await;
            });
        })
        .expect("ledger thread");
    let (port, metrics) = started.recv().expect("ledger started");
    (port, metrics, ca)
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "standalone".into());
    assert!(MODES.contains(&mode.as_str()), "usage: hot_path [{}]", MODES.join("|"));
    let cluster = ["leased", "low", "low-latency", "leased-latency"].contains(&mode.as_str());
    // The targets speak Anthropic's API in these modes, OpenAI's otherwise.
    let (api, path) =
        if ["to-anthropic", "messages"].contains(&mode.as_str()) { ("anthropic", "") } else { ("openai", "/v1") };
    let endpoint = match mode.split('-').next() {
        Some("messages") => "/v1/messages",
        Some("responses") => "/v1/responses",
        Some("embeddings") => "/v1/embeddings",
        _ => "/v1/chat/completions",
    };
    // Extra spec and target fields of the modes that need them.
    let spec = if mode == "embeddings" { "\n  serves: embeddings" } else { "" };
    let native = if mode == "responses" { ", nativeResponses: true" } else { "" };
    // Above the limit: the budget is Low from the start.
    let low = if mode.starts_with("low") { r#", lowBalanceThreshold: "1000001""# } else { "" };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let addr = upstream().await;
        let yaml = format!(
            r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: chat}}
spec:
  model: chat{spec}
  targets:
    - {{name: primary, api: {api}, baseUrl: "http://{addr}{path}", model: upstream-model, pricing: {{prompt: "2.5", completion: "10"}}{native}}}
    - {{name: secondary, api: {api}, baseUrl: "http://{addr}/b{path}", pricing: {{prompt: "3", completion: "15"}}{native}}}
    - {{name: tertiary, api: {api}, baseUrl: "http://{addr}/c{path}", pricing: {{prompt: "1", completion: "2"}}{native}}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ApiKeyBudget
metadata: {{name: bench}}
spec: {{key: {{secretRef: {{name: key, key: key}}}}, limit: "1000000"{low}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: key}}
stringData: {{key: {KEY}}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: open}}
spec:
  model: open
  targets:
    - {{name: primary, api: {api}, baseUrl: "http://{addr}{path}", model: upstream-model}}
"#
        );
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        parse_file("hot_path.yaml", &yaml, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let config = compile(&docs, &MapResolver::default()).expect("config");
        let state_dir = std::env::temp_dir().join(format!("sideyard-hot-path-{}", std::process::id()));
        let limits = Limits { max_request_bytes: 1 << 20, max_response_bytes: 1 << 20 };
        let clients = Clients::new(None).expect("clients");
        let mut fleet = FleetOptions::default();
        let mut ledger_metrics = None;
        if cluster {
            std::fs::create_dir_all(&state_dir).expect("state dir");
            let write_time = std::time::Duration::from_millis(if mode.ends_with("-latency") { 10 } else { 0 });
            let (port, metrics, ca) = ledger(config.budgets.clone(), write_time);
            let (ca_file, token_file) = (state_dir.join("ca.pem"), state_dir.join("token"));
            std::fs::write(&ca_file, ca).expect("CA file");
            std::fs::write(&token_file, "bench").expect("token file");
            fleet = FleetOptions { url: Some(format!("https://localhost:{port}")), ca_file: Some(ca_file), token_file };
            ledger_metrics = Some(metrics);
        }
        let mut shared = Shared::new(&config, None, limits, clients, false, state_dir.clone(), fleet).expect("shared");
        let mut traces = None;
        if mode == "observed" {
            sideyard::logs::init(&format!("warn,{}=info", sideyard::sidecar::ACCESS_LOG_TARGET), true);
            shared.observers = Observers::new(ObserverOptions { access_log: true, generations: 1000, ..Default::default() }, None);
        }
        if mode == "traced" {
            let args = TraceArgs { otlp_endpoint: Some(format!("http://{}", collector())), trace_sampling_ratio: 1.0 };
            traces = Traces::start(&args, "hot-path", None).expect("traces");
            shared.observers = Observers::new(ObserverOptions::default(), traces.clone());
        }
        let shared = Arc::new(shared);
        let app = api_service(shared.clone());

        let (json, stream): (&'static [u8], &'static [u8]) = match endpoint {
            "/v1/responses" => (
                br#"{"model":"chat","max_output_tokens":64,"input":"Say hello."}"#,
                br#"{"model":"chat","stream":true,"max_output_tokens":64,"input":"Say hello."}"#,
            ),
            // Embeddings are never streamed.
            "/v1/embeddings" => (br#"{"model":"chat","input":"Say hello."}"#, br#"{"model":"chat","input":"Say hello."}"#),
            _ => (
                br#"{"model":"chat","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#,
                br#"{"model":"chat","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#,
            ),
        };
        let request = |i: usize| {
            let body = Bytes::from_static(if i.is_multiple_of(2) { json } else { stream });
            let request = http::Request::post(endpoint)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {KEY}"))
                .body(axum::body::Body::from(body))
                .expect("request");
            let app = app.clone();
            async move {
                let response = hyper::service::Service::call(&app, request).await.expect("infallible");
                let status = response.status();
                let bytes = response.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
                assert!(!bytes.is_empty());
            }
        };
        if mode.ends_with("-latency") {
            let budgeted = timed(&app, br#"{"model":"chat","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#).await;
            let open = timed(&app, br#"{"model":"open","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#).await;
            let writes = ledger_metrics.as_ref().map_or(0, |m| {
                let text = m.render();
                text.lines().find_map(|l| l.strip_prefix("sideyard_operator_status_writes_total ")).and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0)
            });
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            let what = if mode == "low-latency" { "per-request mode" } else { "leases of a fresh budget" };
            println!(
                "{what} at {RATE} req/s, status writes of 10 ms: p50 {:.2} ms, p99 {:.2} ms; without a budget p50 {:.2} ms, p99 {:.2} ms; added p50 {:.2} ms, p99 {:.2} ms; {:.1} status writes a second",
                ms(budgeted.0), ms(budgeted.1), ms(open.0), ms(open.1),
                ms(budgeted.0.saturating_sub(open.0)), ms(budgeted.1.saturating_sub(open.1)),
                writes as f64 / (2.0 * SECONDS as f64)
            );
            if let Some(m) = &ledger_metrics {
                let waits: Vec<String> = m.render().lines().filter(|l| l.starts_with("sideyard_ledger_persist_waits_total{") && !l.ends_with(" 0")).map(String::from).collect();
                println!("calls answered after a write: {}", if waits.is_empty() { "none".into() } else { waits.join(", ") });
            }
            return;
        }
        let started = Instant::now();
        if mode == "low" {
            for batch in (0..REQUESTS).collect::<Vec<_>>().chunks(100) {
                futures::future::join_all(batch.iter().map(|&i| request(i))).await;
            }
        } else {
            for i in 0..REQUESTS {
                request(i).await;
            }
        }
        if let Some(traces) = &traces {
            // A request and its one attempt: two spans each.
            let spans = 2 * REQUESTS as u64;
            let deadline = Instant::now() + std::time::Duration::from_secs(60);
            while traces.exported.load(std::sync::atomic::Ordering::Relaxed) < spans {
                assert!(Instant::now() < deadline, "the spans were not all exported");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let elapsed = started.elapsed();
        println!("{mode}: {:.1} µs per request (wall time)", elapsed.as_secs_f64() * 1e6 / REQUESTS as f64);
        if let Some(metrics) = ledger_metrics {
            let calls: Vec<String> =
                metrics.render().lines().filter(|l| l.starts_with("sideyard_ledger_calls_total{")).map(String::from).collect();
            println!("ledger calls answered: {}", calls.join(", "));
        }
        if let Some(ledger) = shared.ledger() {
            ledger.close();
        }
        let _ = std::fs::remove_dir_all(state_dir);
    });
}

/// The open-loop rate and duration of `low-latency`.
const RATE: u64 = 200;
const SECONDS: u64 = 10;

/// `body` sent with the key at [`RATE`] a second for [`SECONDS`], each on time whatever the last
/// one took: the 50th and 99th percentiles of the time each took.
async fn timed(app: &sideyard::sidecar::ApiService, body: &'static [u8]) -> (std::time::Duration, std::time::Duration) {
    let mut tick = tokio::time::interval(std::time::Duration::from_micros(1_000_000 / RATE));
    let mut running = Vec::new();
    for _ in 0..RATE * SECONDS {
        tick.tick().await;
        let request = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {KEY}"))
            .body(axum::body::Body::from(Bytes::from_static(body)))
            .expect("request");
        let app = app.clone();
        running.push(tokio::spawn(async move {
            let started = Instant::now();
            let response = hyper::service::Service::call(&app, request).await.expect("infallible");
            let status = response.status();
            let bytes = response.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
            started.elapsed()
        }));
    }
    let mut times: Vec<std::time::Duration> =
        futures::future::join_all(running).await.into_iter().map(|t| t.expect("request")).collect();
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}
