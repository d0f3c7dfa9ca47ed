//! Translation between OpenAI's Chat Completions and Anthropic's Messages, against golden
//! fixtures in `tests/testdata/anthropic/`: `<case>.chat.json` becomes `<case>.messages.json`.
//! `SWITCHYARD_REFRESH_GOLDEN=1 cargo test --test anthropic` rewrites them; review the diff.

use std::path::Path;

use serde_json::Value;
use switchyard::providers::anthropic::messages_request;

const DIR: &str = "tests/testdata/anthropic/requests";
/// The route's `reservedCompletionTokens` in these cases.
const DEFAULT_MAX_TOKENS: u64 = 1024;

#[test]
fn chat_requests_become_the_golden_messages_requests() {
    let mut cases: Vec<_> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(".chat.json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "{cases:?}");
    let mut failures = Vec::new();
    for chat in cases {
        let golden = Path::new(&chat.to_str().unwrap().replace(".chat.json", ".messages.json")).to_path_buf();
        let body = std::fs::read(&chat).unwrap();
        let translated: Value =
            serde_json::from_slice(&messages_request(&body, "claude-test", DEFAULT_MAX_TOKENS).unwrap()).unwrap();
        let pretty = serde_json::to_string_pretty(&translated).unwrap() + "\n";
        if std::env::var_os("SWITCHYARD_REFRESH_GOLDEN").is_some() {
            std::fs::write(&golden, &pretty).unwrap();
            continue;
        }
        let expected: Value =
            serde_json::from_slice(&std::fs::read(&golden).unwrap_or_default()).unwrap_or(Value::Null);
        if translated != expected {
            failures.push(format!("{} differs; got:\n{pretty}", golden.display()));
        }
    }
    assert!(failures.is_empty(), "{}\n(SWITCHYARD_REFRESH_GOLDEN=1 rewrites them)", failures.join("\n"));
}

#[test]
fn what_messages_cannot_express_is_a_clear_error_naming_the_field() {
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(format!("{DIR}/errors.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let body = serde_json::to_vec(&case["body"]).unwrap();
        match messages_request(&body, "claude-test", DEFAULT_MAX_TOKENS) {
            Ok(out) => failures.push(format!("{}: translated to {}", case["case"], String::from_utf8_lossy(&out))),
            Err(e) if e.field != case["field"] || e.message.is_empty() => {
                failures.push(format!("{}: expected field {}, got {e:?}", case["case"], case["field"]))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
