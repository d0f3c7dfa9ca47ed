//! Translation of OpenAI's Responses API to and from Chat Completions, against golden fixtures
//! in `tests/testdata/responses/`: requests (`<case>.responses.json` becomes `<case>.chat.json`),
//! answers (`.chat.json` becomes `.response.json`) and streams (`.chunks` become `.events`).
//! `SIDEYARD_REFRESH_GOLDEN=1 cargo test --test responses` rewrites them; review the diff.

#[path = "common/golden.rs"]
mod golden;

use golden::{assert_refusals, feed, golden, golden_streams};
use sideyard::providers::responses::{ResponseStream, chat_request, response_answer};

const DIR: &str = "tests/testdata/responses";

#[test]
fn responses_requests_become_the_golden_chat_requests() {
    golden(&format!("{DIR}/requests"), ".responses.json", ".chat.json", |body| {
        chat_request(body, "gpt-upstream").unwrap()
    });
}

#[test]
fn chat_answers_become_the_golden_responses() {
    golden(&format!("{DIR}/answers"), ".chat.json", ".response.json", |body| {
        response_answer(body, "gpt-upstream", 1_796_040_000).unwrap()
    });
}

#[test]
fn chunk_streams_become_the_golden_response_event_streams() {
    golden_streams(&format!("{DIR}/streams"), "chunks", "events", |chunks| {
        let mut stream = ResponseStream::new("gpt-upstream", 1_796_040_000);
        feed(chunks, |e, out| stream.event(e, out))
    });
}

#[test]
fn what_chat_completions_cannot_carry_is_a_clear_error_naming_the_field() {
    assert_refusals(&format!("{DIR}/requests/errors.json"), |b| chat_request(b, "m").map(drop));
    assert_refusals(&format!("{DIR}/answers/errors.json"), |b| response_answer(b, "m", 0).map(drop));
}

#[test]
fn state_that_needs_a_store_is_refused_saying_so() {
    let error = chat_request(br#"{"model": "m", "input": "hi", "previous_response_id": "resp_1"}"#, "m").unwrap_err();
    assert_eq!(error.field, "previous_response_id");
    assert!(error.message.contains("needs a response store"), "{}", error.message);
}
