//! The official OpenAI Python SDK, installed from PyPI into a virtualenv under target/, sends JSON
//! and streaming requests through the sidecar and reads the answers, including a route whose
//! OpenAI target fails and whose fallback speaks Anthropic's API; embeddings, legacy completions,
//! and a file upload and a transcription passed through.

mod common;

use common::*;

/// The pinned SDK, as `tests/python/requirements.txt` installs it.
const SDK: &str = "3.57.0";

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_sdk_works_unchanged() {
    let python =
        tokio::task::spawn_blocking(|| sdk_python("openai-venv", "requirements.txt", "openai", SDK)).await.unwrap();
    let up = ScriptedUpstream::start().await;
    let config = format!(
        r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: chat}}
spec:
  model: chat
  targets:
    - {{name: down, baseUrl: "{down}"}}
    - {{name: mock, api: mock, model: mock-1, baseUrl: "mock://local?chunks=4&chunk-interval=1ms"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: breaks}}
spec:
  model: breaks
  targets:
    - {{name: flaky, baseUrl: "{breaks}"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: to-claude}}
spec:
  model: to-claude
  targets:
    - {{name: gpt, baseUrl: "{down}"}}
    - {{name: claude, api: anthropic, baseUrl: "mock://local?chunks=4&chunk-interval=1ms"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: to-claude-tools}}
spec:
  model: to-claude-tools
  targets:
    - {{name: gpt, baseUrl: "{down}"}}
    - {{name: claude, api: anthropic, baseUrl: "{tools}"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: embed}}
spec:
  model: embed
  serves: embeddings
  targets:
    - {{name: mock, api: mock, model: text-embedding-3-small, baseUrl: "mock://local"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: instruct}}
spec:
  model: instruct
  targets:
    - {{name: claude, api: anthropic, baseUrl: "mock://local"}}
    - {{name: mock, api: mock, model: instruct-1, baseUrl: "mock://local?chunks=4&chunk-interval=1ms"}}
---
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: files}}
spec:
  model: files
  aliases: [whisper-1]
  passthroughDefault: true
  targets:
    - {{name: provider, model: whisper-large, baseUrl: "{provider}/v1"}}
"#,
        down = up.url("status-503"),
        breaks = up.url("sse-break"),
        tools = up.url("anthropic-answer-tools"),
        provider = up.url("provider-api"),
    );
    let sidecar = Sidecar::start(&config);
    let base_url = format!("http://{}/v1", sidecar.api);
    let stdout = run_script(python, "openai_client.py", &[("SIDEYARD_BASE_URL", base_url.as_str())]).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "json: mock-1 | Hello from the Sideyard | 4",
            "headers: mock 2",
            "stream: Hello from the Sideyard",
            "not found: 404 model_not_found",
            "broken stream: the upstream connection broke mid-stream: connection closed during a chunk size line",
            "models: chat,breaks,to-claude,to-claude-tools,embed,instruct,files,whisper-1",
            "fallback json: claude 5xx | Hello from the Sideyard | stop | 4",
            "fallback stream: Hello from the Sideyard | stop | 4",
            r#"fallback tools: toolu_A:weather:{"city":"Paris"} toolu_B:weather:{"city":"Rome"} | tool_calls"#,
            "embeddings: 2 x 8 | 4 | text-embedding-3-small",
            "completions: Hello from the | 3 | length",
            "completions stream: Hello from the Sideyard",
            "files: file-abc batch processed",
            "transcription: whisper-large heard",
        ]
    );
}

/// `responses.create`, JSON and streamed, and the SDK's stream helper, against a target that
/// speaks the Responses API, one that speaks only Chat Completions and an Anthropic one; then a
/// function-calling round trip with `call_id` through each kind.
#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_sdk_uses_the_responses_api_with_any_target() {
    let python =
        tokio::task::spawn_blocking(|| sdk_python("openai-venv", "requirements.txt", "openai", SDK)).await.unwrap();
    let up = ScriptedUpstream::start().await;
    let mock = "baseUrl: 'mock://local?chunks=4&chunk-interval=1ms'";
    let config = [
        route_yaml("native", "", &[&format!("{{name: native, api: mock, nativeResponses: true, {mock}}}")]),
        route_yaml("chat-only", "", &[&format!("{{name: chat, api: mock, {mock}}}")]),
        route_yaml("claude", "", &[&format!("{{name: claude, api: anthropic, {mock}}}")]),
        route_yaml(
            "native-tools",
            "",
            &[&format!("{{name: native, nativeResponses: true, baseUrl: '{}'}}", up.url("responses-answer-tools"))],
        ),
        route_yaml("chat-tools", "", &[&format!("{{name: chat, baseUrl: '{}'}}", up.url("openai-answer-tools"))]),
        route_yaml(
            "claude-tools",
            "",
            &[&format!("{{name: claude, api: anthropic, baseUrl: '{}'}}", up.url("anthropic-answer-tools"))],
        ),
    ]
    .concat();
    let sidecar = Sidecar::start(&config);
    let base_url = format!("http://{}/v1", sidecar.api);
    let stdout = run_script(python, "responses_client.py", &[("SIDEYARD_BASE_URL", base_url.as_str())]).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "native json: Hello from the Sideyard | completed | 4",
            "native stream: Hello from the Sideyard | response.created .. response.completed",
            "chat-only json: Hello from the Sideyard | completed | 4",
            "chat-only stream: Hello from the Sideyard | response.created .. response.completed",
            "claude json: Hello from the Sideyard | completed | 4",
            "claude stream: Hello from the Sideyard | response.created .. response.completed",
            "stream helper: Hello from the Sideyard | completed",
            r#"native-tools calls: call_A:weather:{"city":"Paris"} call_B:weather:{"city":"Rome"}"#,
            "native-tools follow-up: completed",
            r#"chat-tools calls: call_A:weather:{"city":"Paris"} call_B:weather:{"city":"Rome"}"#,
            "chat-tools follow-up: completed",
            r#"claude-tools calls: toolu_A:weather:{"city":"Paris"} toolu_B:weather:{"city":"Rome"}"#,
            "claude-tools follow-up: completed",
        ]
    );
    // The follow-ups carried each call's output to its call, in each upstream's own terms.
    let sent = |behaviour: &str| -> serde_json::Value {
        serde_json::from_slice(&up.recorded(behaviour).last().unwrap().body).unwrap()
    };
    let native = sent("responses-answer-tools");
    let outputs: Vec<&serde_json::Value> =
        native["input"].as_array().unwrap().iter().filter(|i| i["type"] == "function_call_output").collect();
    assert_eq!(outputs.iter().map(|o| o["call_id"].as_str().unwrap()).collect::<Vec<_>>(), ["call_A", "call_B"]);
    let chat = sent("openai-answer-tools");
    let tools: Vec<&serde_json::Value> =
        chat["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tools.iter().map(|m| m["tool_call_id"].as_str().unwrap()).collect::<Vec<_>>(), ["call_A", "call_B"]);
    let claude = sent("anthropic-answer-tools");
    let results: Vec<&str> = claude["messages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["content"].as_array().into_iter().flatten())
        .filter(|b| b["type"] == "tool_result")
        .map(|b| b["tool_use_id"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["toolu_A", "toolu_B"]);
}
