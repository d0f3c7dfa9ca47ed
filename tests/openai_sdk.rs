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
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: chat}}
spec:
  model: chat
  targets:
    - {{name: down, baseUrl: "{down}"}}
    - {{name: mock, api: mock, model: mock-1, baseUrl: "mock://local?chunks=4&chunk-interval=1ms"}}
---
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: breaks}}
spec:
  model: breaks
  targets:
    - {{name: flaky, baseUrl: "{breaks}"}}
---
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: to-claude}}
spec:
  model: to-claude
  targets:
    - {{name: gpt, baseUrl: "{down}"}}
    - {{name: claude, api: anthropic, baseUrl: "mock://local?chunks=4&chunk-interval=1ms"}}
---
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: to-claude-tools}}
spec:
  model: to-claude-tools
  targets:
    - {{name: gpt, baseUrl: "{down}"}}
    - {{name: claude, api: anthropic, baseUrl: "{tools}"}}
---
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: embed}}
spec:
  model: embed
  serves: embeddings
  targets:
    - {{name: mock, api: mock, model: text-embedding-3-small, baseUrl: "mock://local"}}
---
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {{name: instruct}}
spec:
  model: instruct
  targets:
    - {{name: claude, api: anthropic, baseUrl: "mock://local"}}
    - {{name: mock, api: mock, model: instruct-1, baseUrl: "mock://local?chunks=4&chunk-interval=1ms"}}
---
apiVersion: switchyard.dev/v1alpha1
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
    let stdout = run_script(python, "openai_client.py", &[("SWITCHYARD_BASE_URL", base_url.as_str())]).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "json: mock-1 | Hello from the Switchyard | 4",
            "headers: mock 2",
            "stream: Hello from the Switchyard",
            "not found: 404 model_not_found",
            "broken stream: the upstream connection broke mid-stream: connection closed during a chunk size line",
            "models: chat,breaks,to-claude,to-claude-tools,embed,instruct,files,whisper-1",
            "fallback json: claude 5xx | Hello from the Switchyard | stop | 4",
            "fallback stream: Hello from the Switchyard | stop | 4",
            r#"fallback tools: toolu_A:weather:{"city":"Paris"} toolu_B:weather:{"city":"Rome"} | tool_calls"#,
            "embeddings: 2 x 8 | 4 | text-embedding-3-small",
            "completions: Hello from the | 3 | stop",
            "completions stream: Hello from the Switchyard",
            "files: file-abc batch processed",
            "transcription: whisper-large heard",
        ]
    );
}
