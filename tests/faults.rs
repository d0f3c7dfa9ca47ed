//! Garbage in, answers out: hundreds of mutated requests from callers and mutated answers from an
//! upstream (bad heads, bad chunk sizes, bad JSON, bad events, huge numbers) through a real
//! sidecar. Every request gets an HTTP answer, and every stream a clean end or a terminal error
//! event; nothing is reset, and the process keeps serving.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "sk-faults";

/// splitmix64: a fixed sequence of mutations, the same on every run.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `bytes` with one to three bytes replaced, inserted or cut away.
    fn mutate(&mut self, bytes: &[u8]) -> Vec<u8> {
        const STRAY: &[u8] = b"\"\\{}[]:,\r\n 0-9e.\xff\x00";
        let mut out = bytes.to_vec();
        for _ in 0..1 + self.below(3) {
            let at = self.below(out.len() + 1);
            let byte = if self.below(2) == 0 { STRAY[self.below(STRAY.len())] } else { self.next() as u8 };
            match self.below(4) {
                0 | 1 if at < out.len() => out[at] = byte,
                2 => out.insert(at, byte),
                _ => out.truncate(at.max(1)),
            }
        }
        out
    }
}

fn json_answer(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

fn chunked(head: &str, body: &str) -> Vec<u8> {
    let mut wire = format!("{head}transfer-encoding: chunked\r\n\r\n").into_bytes();
    for piece in body.as_bytes().chunks(37) {
        wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        wire.extend_from_slice(piece);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    wire
}

const ANSWER: &str = r#"{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

const EVENTS: &str = "data: {\"id\":\"s\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"id\":\"s\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"one \\\"two\\\"\"}}]}\n\ndata: {\"id\":\"s\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";

/// The answers the upstream starts from, each as whole bytes on the wire.
fn base_answers() -> Vec<(Vec<u8>, bool)> {
    let sse_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n";
    let huge = r#"{"id":"c","choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615,"prompt_tokens_details":{"cached_tokens":18446744073709551615}}}"#;
    let huger =
        r#"{"id":"c","choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1e30,"completion_tokens":-1}}"#;
    vec![
        (json_answer(ANSWER), false),
        (chunked("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n", ANSWER), false),
        (json_answer(huge), false),
        (json_answer(huger), false),
        (chunked(sse_head, EVENTS), true),
        (format!("{sse_head}\r\n{EVENTS}").into_bytes(), true),
        (chunked(sse_head, &EVENTS.replace("\"completion_tokens\":2", "\"completion_tokens\":99999999999999999999999")), true),
        (
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1e20\r\nx-ratelimit-reset-tokens: 9999999999999h\r\ncontent-length: 2\r\n\r\n{}"
                .to_vec(),
            false,
        ),
        (
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 33\r\n\r\n{\"error\":{\"message\":\"internal\"}}"
                .to_vec(),
            false,
        ),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n".to_vec(), false),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n{}".to_vec(), false),
        (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n{}".to_vec(), false),
        (b"HTTP/1.1 999 Whatever\r\ncontent-length: 0\r\n\r\n".to_vec(), false),
    ]
}

/// An upstream that answers the request whose `x-request-id` is `i` with `answers[i]` and closes
/// the connection.
async fn garbage_upstream(answers: Arc<Vec<Vec<u8>>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let answers = answers.clone();
            tokio::spawn(async move {
                let Some(head) = read_request(&mut tcp).await else { return };
                let index = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-request-id:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                let _ = tcp.write_all(&answers[index % answers.len()]).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

fn config(upstream: SocketAddr) -> String {
    let target = format!(
        "{{name: up, baseUrl: \"http://{upstream}/v1\", pricing: {{prompt: '1', completion: '2'}}, timeouts: {{connect: 2s, firstByte: 5s, total: 10s}}}}"
    );
    let route = route_yaml("chat", "health: {consecutiveFailures: 100}\n  holdBack: 0s", &[&target]);
    // A budget without a limit: every answer is metered, whatever numbers it reports.
    route + &budget_yaml("faults", KEY, "")
}

/// Sends one request and reads its whole answer: the status, and the body as it ended. A reset,
/// a broken body or a stream that ends mid-event fails the test.
async fn exchange(api: SocketAddr, id: usize, body: Vec<u8>) -> (u16, String) {
    let request = http::Request::post(format!("http://{api}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .header("x-request-id", id.to_string())
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .unwrap_or_else(|_| panic!("request {id}: no answer in time"))
        .unwrap_or_else(|e| panic!("request {id} ({:?}): no HTTP answer: {e:?}", String::from_utf8_lossy(&body)));
    let status = response.status().as_u16();
    let streamed =
        response.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let bytes = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("request {id}: the body did not end in time"))
        .unwrap_or_else(|e| panic!("request {id}: the body broke: {e:?}"))
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if streamed && !text.is_empty() {
        // A stream ends on an event boundary: with the upstream's own last event, or with the
        // sidecar's terminal error event.
        assert!(text.ends_with("\n\n") || text.ends_with("\r\n\r\n"), "request {id}: a stream cut mid-event: {text:?}");
    }
    (status, text)
}

async fn run_all(api: SocketAddr, requests: Vec<(usize, Vec<u8>)>) -> Vec<(usize, u16, String)> {
    let mut out = Vec::new();
    for batch in requests.chunks(16) {
        let running: Vec<_> = batch
            .iter()
            .cloned()
            .map(|(id, body)| tokio::spawn(async move { (id, exchange(api, id, body).await) }))
            .collect();
        for r in running {
            let (id, (status, text)) = r.await.expect("the exchange panicked");
            out.push((id, status, text));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn mutated_upstream_answers_get_answers_or_terminal_events_and_never_a_reset() {
    let mut mix = Mix(12);
    let mut answers = Vec::new();
    let mut streamed = Vec::new();
    for (answer, stream) in base_answers() {
        answers.push(answer.clone());
        streamed.push(stream);
        for _ in 0..24 {
            answers.push(mix.mutate(&answer));
            streamed.push(stream);
        }
    }
    assert!(answers.len() >= 300, "{}", answers.len());
    let answers = Arc::new(answers);
    let upstream = garbage_upstream(answers.clone()).await;
    let sidecar = Sidecar::start(&config(upstream));

    let requests: Vec<(usize, Vec<u8>)> = (0..answers.len())
        .map(|i| {
            let body =
                format!(r#"{{"model":"chat","stream":{},"messages":[{{"role":"user","content":"hi"}}]}}"#, streamed[i]);
            (i, body.into_bytes())
        })
        .collect();
    let results = run_all(sidecar.api, requests).await;
    let mut statuses = std::collections::BTreeMap::new();
    let mut terminal_errors = 0;
    for (id, status, text) in &results {
        *statuses.entry(*status).or_insert(0) += 1;
        if *status == 200 && streamed[*id] {
            terminal_errors +=
                usize::from(sse_data(text).last().is_some_and(|e| e.contains("\"finish_reason\":\"error\"")));
        } else if *status == 200 {
            serde_json::from_str::<serde_json::Value>(text)
                .unwrap_or_else(|e| panic!("request {id}: a 200 JSON answer is JSON ({e}): {text:?}"));
        }
        if *status >= 500 {
            assert!(text.contains("\"error\""), "request {id}: a proxy error is an OpenAI error body: {text:?}");
        }
    }
    assert!(terminal_errors > 0, "some streams broke after they started and ended with the error event");
    // The unmutated answers come through as they are.
    assert_eq!(results[0].1, 200);
    assert!(statuses.contains_key(&502), "some answers are unusable: {statuses:?}");

    let mut sidecar = sidecar;
    assert!(sidecar.process.child.try_wait().unwrap().is_none(), "the sidecar is still running");
    let reply =
        read(send_as(sidecar.api, Some(KEY), "POST", "/v1/chat/completions", r#"{"model":"chat"}"#).await).await;
    assert_eq!(reply.status, 200, "still serving: {}", reply.body);
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert!(metrics.contains("sideyard_budget_spent{budget=\"default/faults\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutated_requests_get_answers_and_the_sidecar_keeps_serving() {
    let answers = Arc::new(vec![json_answer(ANSWER)]);
    let upstream = garbage_upstream(answers).await;
    let mut sidecar = Sidecar::start(&config(upstream));
    let bases = [
        r#"{"model":"chat","messages":[{"role":"user","content":"Say \"hi\"\\"}],"max_tokens":64,"stream":false}"#,
        r#"{"model":"chat","stream":true,"stream_options":{"include_usage":false},"provider":{"order":["up"],"sort":"price","max_price":{"prompt":1.5}},"models":["chat"]}"#,
        r#"{"model":"chat","max_tokens":18446744073709551615,"max_completion_tokens":99999999999999999999999}"#,
        r#"{"model":"chat","provider":{"preferred_max_latency":{"p50":1e308},"preferred_min_throughput":1e-400}}"#,
    ];
    let mut mix = Mix(7);
    let mut requests = Vec::new();
    for base in bases {
        requests.push((0, base.as_bytes().to_vec()));
        for _ in 0..75 {
            requests.push((0, mix.mutate(base.as_bytes())));
        }
    }
    let results = run_all(sidecar.api, requests).await;
    for (_, status, text) in &results {
        assert!(matches!(status, 200 | 400 | 402 | 404 | 502), "{status}: {text}");
        if *status != 200 {
            assert!(text.starts_with("{\"error\":"), "{status}: an OpenAI error body: {text}");
        }
    }
    assert!(results.iter().any(|r| r.1 == 400), "mutations make bad requests");

    // Bytes that are not HTTP at all get hyper's 400 or a close, never a crash.
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: -5\r\n\r\n",
        b"\x16\x03\x01\x02\x00",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(sidecar.api).await.unwrap();
        tcp.write_all(raw).await.unwrap();
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer)).await.expect("the sidecar answers or closes");
        assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"), "{:?}", String::from_utf8_lossy(&answer));
    }

    assert!(sidecar.process.child.try_wait().unwrap().is_none(), "the sidecar is still running");
    let reply = post(sidecar.api, "/v1/chat/completions", bases[0]).await;
    assert_eq!(reply.status, 401, "without the key, refused as before: {}", reply.body);
    let reply = read(send_as(sidecar.api, Some(KEY), "POST", "/v1/chat/completions", bases[0]).await).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}
