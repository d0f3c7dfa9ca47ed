//! Translation between OpenAI's Chat Completions and Anthropic's Messages, against golden
//! fixtures in `tests/testdata/anthropic/`: `<case>.chat.json` becomes `<case>.messages.json`.
//! `SWITCHYARD_REFRESH_GOLDEN=1 cargo test --test anthropic` rewrites them; review the diff.

use std::path::Path;

use serde_json::Value;
use switchyard::providers::anthropic::callers::{EventStream, chat_request, messages_answer};
use switchyard::providers::anthropic::{ChunkStream, chat_completion, messages_request};
use switchyard::providers::sse;
use switchyard::providers::{StreamEnd, Untranslatable};

const DIR: &str = "tests/testdata/anthropic/requests";
const ANSWERS: &str = "tests/testdata/anthropic/answers";
const STREAMS: &str = "tests/testdata/anthropic/streams";
/// The route's `reservedCompletionTokens` in these cases.
const DEFAULT_MAX_TOKENS: u64 = 1024;

/// Translates every `<case><from>` file of `dir` with `translate` and compares the result with
/// `<case><to>`.
fn golden(dir: &str, from: &str, to: &str, translate: impl Fn(&[u8]) -> Vec<u8>) {
    let mut cases: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(from))
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "{cases:?}");
    let mut failures = Vec::new();
    for input in cases {
        let golden = Path::new(&input.to_str().unwrap().replace(from, to)).to_path_buf();
        let translated: Value = serde_json::from_slice(&translate(&std::fs::read(&input).unwrap())).unwrap();
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

/// Feeds whole events of `events` to `event` until the stream ends.
fn feed(events: &[u8], mut event: impl FnMut(&[u8], &mut Vec<u8>) -> StreamEnd) -> (Vec<u8>, StreamEnd) {
    let mut out = Vec::new();
    let mut end = StreamEnd::Open;
    for range in sse::events(events) {
        end = event(&events[range], &mut out);
        if end != StreamEnd::Open {
            break;
        }
    }
    (out, end)
}

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
    for (file, translate) in [
        ("requests", (|b: &[u8]| chat_request(b, "m").map(drop)) as fn(&[u8]) -> Result<(), Untranslatable>),
        ("answers", |b: &[u8]| messages_answer(b, "m").map(drop)),
    ] {
        let cases: Vec<Value> =
            serde_json::from_slice(&std::fs::read(format!("{CALLERS}/{file}/errors.json")).unwrap()).unwrap();
        for case in &cases {
            let body = serde_json::to_vec(&case["body"]).unwrap();
            let error = translate(&body).expect_err(&case["body"].to_string());
            assert_eq!(error.field, case["field"], "{}", case["body"]);
            assert!(!error.message.is_empty());
        }
    }
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

/// Every `<case>.<from>` stream of `dir`, fed event by event to a new `translate`, against
/// `<case>.<to>`: the translated events, then how the stream ended.
fn golden_streams(dir: &str, from: &str, to: &str, translate: impl Fn(&[u8]) -> (Vec<u8>, StreamEnd)) {
    let mut cases: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == from))
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "{cases:?}");
    let mut failures = Vec::new();
    for input in cases {
        let (out, end) = translate(&std::fs::read(&input).unwrap());
        let got = format!("{}END: {end:?}\n", String::from_utf8(out).unwrap());
        let golden = input.with_extension(to);
        if std::env::var_os("SWITCHYARD_REFRESH_GOLDEN").is_some() {
            std::fs::write(&golden, &got).unwrap();
        } else if std::fs::read_to_string(&golden).unwrap_or_default() != got {
            failures.push(format!("{} differs; got:\n{got}", golden.display()));
        }
    }
    assert!(failures.is_empty(), "{}\n(SWITCHYARD_REFRESH_GOLDEN=1 rewrites them)", failures.join("\n"));
}
