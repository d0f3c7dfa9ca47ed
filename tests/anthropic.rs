//! Translation between OpenAI's Chat Completions and Anthropic's Messages, against golden
//! fixtures in `tests/testdata/anthropic/`: `<case>.chat.json` becomes `<case>.messages.json`.
//! `SIDEYARD_REFRESH_GOLDEN=1 cargo test --test anthropic` rewrites them; review the diff.

#[path = "common/golden.rs"]
mod golden;

use golden::{assert_refusals, feed, golden, golden_streams};
use serde_json::Value;
use sideyard::providers::anthropic::callers::{EventStream, chat_request, messages_answer};
use sideyard::providers::anthropic::{ChunkStream, chat_completion, messages_request};

const DIR: &str = "tests/testdata/anthropic/requests";
const ANSWERS: &str = "tests/testdata/anthropic/answers";
const STREAMS: &str = "tests/testdata/anthropic/streams";
/// The route's `reservedCompletionTokens` in these cases.
const DEFAULT_MAX_TOKENS: u64 = 1024;

#[test]
fn messages_streams_become_the_golden_chunk_streams() {
    golden_streams(STREAMS, "events", "chunks", |events| {
        let mut stream = ChunkStream::new("chat", 1_796_040_000);
        feed(events, |e, out| stream.event(e, out))
    });
}

const CALLERS: &str = "tests/testdata/anthropic/callers";

#[test]
fn messages_requests_become_the_golden_chat_requests() {
    golden(&format!("{CALLERS}/requests"), ".messages.json", ".chat.json", |body| {
        chat_request(body, "gpt-test").unwrap()
    });
}

#[test]
fn chat_answers_become_the_golden_messages_answers() {
    golden(&format!("{CALLERS}/answers"), ".chat.json", ".messages.json", |body| {
        messages_answer(body, "claude-sonnet-4-5").unwrap()
    });
}

#[test]
fn chunk_streams_become_the_golden_messages_event_streams() {
    golden_streams(&format!("{CALLERS}/streams"), "chunks", "events", |chunks| {
        let mut stream = EventStream::new("claude-sonnet-4-5");
        feed(chunks, |e, out| stream.event(e, out))
    });
}

#[test]
fn what_chat_completions_cannot_express_is_a_clear_error_naming_the_field() {
    assert_refusals(&format!("{CALLERS}/requests/errors.json"), |b| chat_request(b, "m").map(drop));
    assert_refusals(&format!("{CALLERS}/answers/errors.json"), |b| messages_answer(b, "m").map(drop));
}

#[test]
fn chat_requests_become_the_golden_messages_requests() {
    golden(DIR, ".chat.json", ".messages.json", |body| {
        messages_request(body, "claude-test", DEFAULT_MAX_TOKENS).unwrap()
    });
}

#[test]
fn messages_answers_become_the_golden_chat_completions() {
    golden(ANSWERS, ".messages.json", ".chat.json", |body| chat_completion(body, "chat", 1_796_040_000).unwrap().0);
}

#[test]
fn answers_chat_completions_cannot_carry_are_errors_never_a_silent_stop() {
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(format!("{ANSWERS}/errors.json")).unwrap()).unwrap();
    for case in &cases {
        let body = serde_json::to_vec(&case["body"]).unwrap();
        let error = chat_completion(&body, "chat", 0).expect_err(case["case"].as_str().unwrap());
        assert_eq!(error.field, case["field"], "{}", case["case"]);
    }
}

#[test]
fn usage_counts_cached_prompt_tokens_in_prompt_tokens_and_keeps_reads_and_writes_apart() {
    let answer = std::fs::read(format!("{ANSWERS}/text-cached.messages.json")).unwrap();
    let (_, usage) = chat_completion(&answer, "chat", 0).unwrap();
    let input = usage.prompt - usage.cached_prompt - usage.cache_write;
    assert_eq!((input, usage.cached_prompt, usage.cache_write, usage.completion), (12, 2048, 512, 4));
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
