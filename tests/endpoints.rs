//! The routed endpoints besides conversations: `/v1/embeddings` and `/v1/completions` (legacy),
//! with fallback, health, budgets and metrics as on chat; `/v1/models` saying what each model
//! serves, and `/v1/models/{id}`.

mod common;

use common::*;

const KEY: &str = "sk-embedder-0123456789";

fn config(up: &ScriptedUpstream) -> String {
    let embed = route_yaml(
        "embed",
        "serves: embeddings",
        &[
            &format!("{{name: down, baseUrl: '{}'}}", up.url("status-503")),
            "{name: mock, api: mock, model: text-embedding-3-small, baseUrl: 'mock://local', pricing: {prompt: '100000'}}",
        ],
    );
    let chat = route_yaml(
        "chat",
        "aliases: [gpt-3.5-turbo-instruct]",
        &[
            "{name: claude, api: anthropic, baseUrl: 'mock://local?chunks=4'}",
            "{name: mock, api: mock, model: instruct-1, baseUrl: 'mock://local?chunks=4&chunk-interval=1ms', pricing: {completion: '1000'}}",
        ],
    );
    let claude = route_yaml("claude-only", "", &["{name: claude, api: anthropic, baseUrl: 'mock://local'}"]);
    [embed, chat, claude, budget_yaml("embedder", KEY, "limit: \"10\"")].concat()
}

async fn call(sidecar: &Sidecar, path: &str, body: &str) -> Reply {
    read(send_as(sidecar.api, Some(KEY), "POST", path, body).await).await
}

async fn spent(sidecar: &Sidecar) -> String {
    let reply = read(send_as(sidecar.api, Some(KEY), "GET", "/api/v1/key", "").await).await;
    reply.json()["data"]["usage"].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_are_routed_with_fallback_and_metered_on_prompt_tokens() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&config(&up));

    // Every shape of input. The first target is down: the first call falls back from it.
    let cases = [
        (r#""The food was delicious""#, 1, 6),
        (r#"["one text", "another, longer text"]"#, 2, 2 + 5),
        ("[1, 2, 3]", 1, 3),
        ("[[1, 2], [3, 4, 5]]", 2, 5),
    ];
    let mut tokens = 0;
    for (i, (input, vectors, prompt_tokens)) in cases.into_iter().enumerate() {
        let reply = call(&sidecar, "/v1/embeddings", &format!(r#"{{"model": "embed", "input": {input}}}"#)).await;
        assert_eq!(reply.status, 200, "{input}: {}", reply.body);
        assert_eq!(reply.header("x-sideyard-target"), "mock");
        if i == 0 {
            assert_eq!(reply.header("x-sideyard-fallback-reason"), "5xx");
        }
        let answer = reply.json();
        let data = answer["data"].as_array().unwrap();
        assert_eq!(data.len(), vectors, "{input}");
        assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(answer["model"], "text-embedding-3-small", "the target's model, as OpenAI answers");
        assert_eq!(answer["usage"]["prompt_tokens"], prompt_tokens, "{input}");
        // 100000 per million tokens: 0.1 a token; embeddings generate nothing to pay for.
        assert_eq!(answer["usage"]["cost"].to_string(), format!("{}", f64::from(prompt_tokens) / 10.0), "{input}");
        tokens += prompt_tokens;
    }
    // The SDKs ask for base64 (little-endian f32) by default.
    let reply = call(
        &sidecar,
        "/v1/embeddings",
        r#"{"model": "embed", "input": "x", "encoding_format": "base64", "dimensions": 4}"#,
    )
    .await;
    let vector = base64_decode(reply.json()["data"][0]["embedding"].as_str().unwrap());
    assert_eq!(vector.len(), 16, "four f32 values");
    tokens += 1;
    assert_eq!(spent(&sidecar).await, format!("{}", f64::from(tokens) / 10.0));

    // Calls went to the failing target first, until health checking ejected it.
    assert_eq!(up.hits("status-503"), 3);
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_requests_total{route="default/embed",target="mock",status="200"}"#), 5);

    // An embeddings model is not a chat model, and the other way round: a clear 400.
    let reply = call(&sidecar, "/v1/chat/completions", r#"{"model": "embed", "messages": []}"#).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "wrong_endpoint");
    assert_eq!(
        reply.json()["error"]["message"],
        "The model \"embed\" serves embeddings, not chat completions: call POST /v1/embeddings; a route serves chat when its ProviderRoute leaves `serves` out or sets `serves: chat`."
    );
    let reply = call(&sidecar, "/v1/embeddings", r#"{"model": "chat", "input": "x"}"#).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "wrong_endpoint");
    // What the caller can do, and what the operator can.
    assert_eq!(
        reply.json()["error"]["message"],
        "The model \"chat\" serves chat, not embeddings: call POST /v1/chat/completions, /v1/responses or /v1/messages; a route serves embeddings when its ProviderRoute sets `serves: embeddings`."
    );
    let reply = call(&sidecar, "/v1/embeddings", r#"{"model": "nope", "input": "x"}"#).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "model_not_found");
    let reply = call(&sidecar, "/v1/embeddings", r#"{"input": "x"}"#).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "missing_model");
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_completions_go_to_openai_compatible_targets_only() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&config(&up));

    // The Anthropic target first in the route has no such endpoint: it is passed over, untouched.
    let reply = call(
        &sidecar,
        "/v1/completions",
        r#"{"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 3}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sideyard-target"), "mock");
    assert_eq!(reply.header("x-sideyard-attempts"), "1");
    let answer = reply.json();
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["choices"][0]["text"], "Hello from the");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    assert_eq!(answer["usage"]["cost"].to_string(), "0.003");

    // Streamed, with the usage chunk the caller asked for and the cost in it.
    let body = r#"{"model": "chat", "prompt": "Say this is a test", "stream": true, "stream_options": {"include_usage": true}}"#;
    let response = send_as(sidecar.api, Some(KEY), "POST", "/v1/completions", body).await;
    assert_eq!(response.status(), 200);
    let events = sse_data(&rest(&mut response.into_body()).await);
    let chunks: Vec<serde_json::Value> =
        events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, "Hello from the Sideyard");
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(last["usage"]["cost"].to_string(), "0.004");
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(spent(&sidecar).await, "0.007");

    // A route with no OpenAI-compatible target cannot serve them, and says why.
    let reply = call(&sidecar, "/v1/completions", r#"{"model": "claude-only", "prompt": "hi"}"#).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "unsupported_endpoint");
    assert_eq!(
        reply.json()["error"]["message"],
        "target \"claude\" speaks Anthropic's Messages API, which has no legacy completions endpoint"
    );

    // Each API's calls are counted, whatever became of them.
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, r#"sideyard_api_calls_total{api="completions"}"#), 3);
    assert_eq!(metric(&metrics, r#"sideyard_api_calls_total{api="chat_completions"}"#), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn models_say_what_each_serves_and_can_be_read_one_by_one() {
    let up = ScriptedUpstream::start().await;
    let sidecar = Sidecar::start(&config(&up));
    let models = get(sidecar.api, "/v1/models").await.json();
    let served: Vec<(String, String, serde_json::Value)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let info = &m["sideyard"];
            (m["id"].as_str().unwrap().into(), info["serves"].as_str().unwrap().into(), info["endpoints"].clone())
        })
        .collect();
    let chat = serde_json::json!(["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/completions"]);
    assert_eq!(
        served,
        [
            ("embed".into(), "embeddings".into(), serde_json::json!(["/v1/embeddings"])),
            ("chat".into(), "chat".into(), chat.clone()),
            ("gpt-3.5-turbo-instruct".into(), "chat".into(), chat),
            (
                "claude-only".into(),
                "chat".into(),
                serde_json::json!(["/v1/chat/completions", "/v1/messages", "/v1/responses"]),
            ),
        ]
    );

    let one = get(sidecar.api, "/v1/models/gpt-3.5-turbo-instruct").await;
    assert_eq!(one.status, 200);
    let one = one.json();
    assert_eq!(one["id"], "gpt-3.5-turbo-instruct");
    assert_eq!(one["object"], "model");
    assert_eq!(one["sideyard"]["route"], "default/chat");
    let missing = get(sidecar.api, "/v1/models/gpt-5").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "model_not_found");
}
