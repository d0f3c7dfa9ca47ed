//! Golden fixtures for translations: each `<case><from>` input file, translated, against its
//! `<case><to>` golden. `SIDEYARD_REFRESH_GOLDEN=1` rewrites the goldens; review the diff.

use std::path::Path;

use serde_json::Value;
use sideyard::providers::{StreamEnd, sse};

/// Translates every `<case><from>` file of `dir` with `translate` and compares the result with
/// `<case><to>`.
pub fn golden(dir: &str, from: &str, to: &str, translate: impl Fn(&[u8]) -> Vec<u8>) {
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
        if std::env::var_os("SIDEYARD_REFRESH_GOLDEN").is_some() {
            std::fs::write(&golden, &pretty).unwrap();
            continue;
        }
        let expected: Value =
            serde_json::from_slice(&std::fs::read(&golden).unwrap_or_default()).unwrap_or(Value::Null);
        if translated != expected {
            failures.push(format!("{} differs; got:\n{pretty}", golden.display()));
        }
    }
    assert!(failures.is_empty(), "{}\n(SIDEYARD_REFRESH_GOLDEN=1 rewrites them)", failures.join("\n"));
}

/// Feeds whole events of `events` to `event` until the stream ends.
pub fn feed(events: &[u8], mut event: impl FnMut(&[u8], &mut Vec<u8>) -> StreamEnd) -> (Vec<u8>, StreamEnd) {
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

/// Every `<case>.<from>` stream of `dir`, fed event by event to a new `translate`, against
/// `<case>.<to>`: the translated events, then how the stream ended.
pub fn golden_streams(dir: &str, from: &str, to: &str, translate: impl Fn(&[u8]) -> (Vec<u8>, StreamEnd)) {
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
        if std::env::var_os("SIDEYARD_REFRESH_GOLDEN").is_some() {
            std::fs::write(&golden, &got).unwrap();
        } else if std::fs::read_to_string(&golden).unwrap_or_default() != got {
            failures.push(format!("{} differs; got:\n{got}", golden.display()));
        }
    }
    assert!(failures.is_empty(), "{}\n(SIDEYARD_REFRESH_GOLDEN=1 rewrites them)", failures.join("\n"));
}

/// Every case of the JSON list `path` (`{"body", "field"}`) is refused by `translate`, naming
/// the case's field.
pub fn assert_refusals(path: &str, translate: impl Fn(&[u8]) -> Result<(), sideyard::providers::Untranslatable>) {
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for case in &cases {
        let body = serde_json::to_vec(&case["body"]).unwrap();
        let error = translate(&body).expect_err(&case["body"].to_string());
        assert_eq!(error.field, case["field"], "{}", case["body"]);
        assert!(!error.message.is_empty());
    }
}
