//! The official Anthropic Python SDK, installed from PyPI into a virtualenv under target/, calls
//! `/v1/messages` through the sidecar (JSON and streams, text and tool uses, usage, errors, token
//! counts) against targets that speak Anthropic's API and targets that speak OpenAI's; and the
//! OpenAI SDK's side, falling back from a failing OpenAI target to an Anthropic one, is in
//! tests/openai_sdk.rs.

mod common;

use common::*;

/// The pinned SDK, as `tests/python/anthropic-requirements.txt` installs it.
const SDK: &str = "2.14.0";

#[tokio::test(flavor = "multi_thread")]
async fn the_anthropic_python_sdk_works_against_both_kinds_of_target() {
    let python =
        tokio::task::spawn_blocking(|| sdk_python("anthropic-venv", "anthropic-requirements.txt", "anthropic", SDK))
            .await
            .unwrap();
    let up = ScriptedUpstream::start().await;
    let target = |api: &str, behaviour: &str| format!("{{name: t, api: {api}, baseUrl: '{}'}}", up.url(behaviour));
    let config = route_yaml(
        "claude-text",
        "",
        &["{name: claude, api: anthropic, baseUrl: 'mock://local?chunks=4&chunk-interval=1ms'}"],
    ) + &route_yaml(
        "gpt-text",
        "",
        &["{name: gpt, api: mock, baseUrl: 'mock://local?chunks=4&chunk-interval=1ms'}"],
    ) + &route_yaml("claude-tools", "", &[&target("anthropic", "anthropic-answer-tools")])
        + &route_yaml("claude-tools-stream", "", &[&target("anthropic", "anthropic-stream-tools")])
        + &route_yaml("gpt-tools", "", &[&target("openai", "openai-answer-tools")])
        + &route_yaml("gpt-tools-stream", "", &[&target("openai", "openai-stream-tools")]);
    let sidecar = Sidecar::start(&config);
    let base_url = format!("http://{}", sidecar.api);
    let envs = [("SIDEYARD_BASE_URL", base_url.as_str()), ("CALLER_KEY", "sk-caller")];
    let stdout = run_script(python, "anthropic_client.py", &envs).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "json claude-text: Hello from the Sideyard | end_turn | True 4",
            "stream claude-text: Hello from the Sideyard | end_turn | 4",
            "json gpt-text: Hello from the Sideyard | end_turn | True 4",
            "stream gpt-text: Hello from the Sideyard | end_turn | 4",
            "tools claude-tools: toolu_A:weather:Paris toolu_B:weather:Rome | tool_use | 40",
            "tools stream claude-tools: toolu_A:weather:Paris toolu_B:weather:Rome | tool_use | 40",
            "tools gpt-tools: call_A:weather:Paris call_B:weather:Rome | tool_use | 30",
            "tools stream gpt-tools: call_A:weather:Paris call_B:weather:Rome | tool_use | 30",
            "not found: 404 not_found_error",
            "count: True",
        ]
    );
    // Both kinds of target got what they speak.
    assert!(up.recorded("anthropic-answer-tools")[0].path.ends_with("/v1/messages"));
    assert!(up.recorded("openai-answer-tools")[0].path.ends_with("/chat/completions"));
}
