//! A fixed batch of requests through the sidecar's API service, in process, against a minimal upstream
//! on 127.0.0.1 that answers with canned bytes. Run under `valgrind --tool=callgrind`, it counts
//! the instructions the request path costs; `.ci/run` fails when the count grows more than 20%
//! over `bench/hot_path.instructions`.
//!
//! One route with three targets and one budget, as in the load benchmark: JSON and streamed
//! requests, each with an API key.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use switchyard::config::{Documents, MapResolver, compile, parse_file};
use switchyard::sidecar::{Clients, FleetOptions, Limits, Shared, api_service};

const JSON_ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the upstream, all good."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;
const STREAM_ANSWER: &str = concat!(
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\n",
    "data: [DONE]\n\n",
);
const REQUESTS: usize = 2000;
const KEY: &str = "sk-hot-path";

async fn upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
                    let (content_type, answer) =
                        if stream { ("text/event-stream", STREAM_ANSWER) } else { ("application/json", JSON_ANSWER) };
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

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let addr = upstream().await;
        let yaml = format!(
            r#"
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: chat}}
spec:
  model: chat
  targets:
    - {{name: primary, baseUrl: "http://{addr}/v1", model: upstream-model, pricing: {{prompt: "2.5", completion: "10"}}}}
    - {{name: secondary, baseUrl: "http://{addr}/v2", pricing: {{prompt: "3", completion: "15"}}}}
    - {{name: tertiary, baseUrl: "http://{addr}/v3", pricing: {{prompt: "1", completion: "2"}}}}
---
apiVersion: switchyard.dev/v1alpha1
kind: ApiKeyBudget
metadata: {{name: bench}}
spec: {{key: {{secretRef: {{name: key, key: key}}}}, limit: "1000000"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: key}}
stringData: {{key: {KEY}}}
"#
        );
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        parse_file("hot_path.yaml", &yaml, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let config = compile(&docs, &MapResolver::default()).expect("config");
        let state_dir = std::env::temp_dir().join(format!("switchyard-hot-path-{}", std::process::id()));
        let limits = Limits { max_request_bytes: 1 << 20, max_response_bytes: 1 << 20 };
        let clients = Clients::new(None).expect("clients");
        let shared = Arc::new(Shared::new(&config, limits, clients, false, state_dir.clone(), FleetOptions::default()).expect("shared"));
        let app = api_service(shared.clone());

        let json = Bytes::from_static(br#"{"model":"chat","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#);
        let stream = Bytes::from_static(
            br#"{"model":"chat","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#,
        );
        for i in 0..REQUESTS {
            let body = if i % 2 == 0 { json.clone() } else { stream.clone() };
            let request = http::Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {KEY}"))
                .body(axum::body::Body::from(body))
                .expect("request");
            let response = hyper::service::Service::call(&app, request).await.expect("infallible");
            assert_eq!(response.status(), 200);
            let bytes = response.into_body().collect().await.expect("body").to_bytes();
            assert!(!bytes.is_empty());
        }
        if let Some(ledger) = shared.ledger() {
            ledger.close();
        }
        let _ = std::fs::remove_dir_all(state_dir);
    });
}
