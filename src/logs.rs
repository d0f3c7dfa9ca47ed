//! Log lines: text for people, or one JSON object per line for log collectors.
//!
//! The JSON lines are written here rather than by tracing-subscriber's JSON formatter, so that a
//! line holds each key once (that formatter writes the module path as `target` beside an event's
//! own fields, and a JSON reader keeps only one of two equal keys) and a list is a JSON array,
//! not its debug text.

use std::fmt;
use std::io::IsTerminal;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The keys every JSON line has, before the event's fields.
const OWN_KEYS: [&str; 3] = ["timestamp", "level", "target"];

/// Logs to standard error from here on: `filter` as `--log` takes it, JSON lines or text.
pub fn init(filter: &str, json: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("sideyard: invalid --log filter {filter:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        // Span fields are formatted before an event is, and would carry colour codes.
        builder.with_ansi(false).event_format(JsonLines).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// One JSON object per event: `timestamp`, `level`, `target` (the module that logged), then the
/// event's fields, `message` among them, in the order they were given.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut line = Line::default();
        line.push("timestamp", timestamp.as_str());
        line.push("level", meta.level().as_str());
        line.push("target", meta.target());
        event.record(&mut line);
        // The spans the event happened in, by name, innermost last.
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let fields = span.extensions().get::<FormattedFields<N>>().map(|f| f.to_string());
                    match fields.filter(|f| !f.is_empty()) {
                        Some(fields) => Value::from(format!("{}{{{fields}}}", span.name())),
                        None => Value::from(span.name()),
                    }
                })
                .collect();
            line.push("spans", Value::Array(spans));
        }
        // Only JSON text of `str`s was written: it is UTF-8.
        writer.write_str(std::str::from_utf8(&line.text).map_err(|_| fmt::Error)?)?;
        writer.write_str("}\n")
    }
}

/// A JSON object written as its fields come, each value serialized straight into it (an access
/// line has two dozen fields: no value is built on the way).
#[derive(Default)]
struct Line {
    text: Vec<u8>,
}

impl Line {
    fn push(&mut self, key: &str, value: impl serde::Serialize) {
        self.text.push(if self.text.is_empty() { b'{' } else { b',' });
        // Writing to a Vec cannot fail, and these values always serialize.
        let _ = serde_json::to_writer(&mut self.text, key);
        self.text.push(b':');
        let _ = serde_json::to_writer(&mut self.text, &value);
    }

    /// An event's field: one named like a key of the line's own is written as `field.<name>`,
    /// so that no key repeats.
    fn field(&mut self, field: &Field, value: impl serde::Serialize) {
        match OWN_KEYS.contains(&field.name()) {
            true => self.push(&format!("field.{}", field.name()), value),
            false => self.push(field.name(), value),
        }
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, value);
    }

    /// A number that is not finite is written as `null`, as JSON has no such numbers.
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, value.to_string());
    }

    /// A list logged with `?` (its debug text is a JSON array when its items are plain strings
    /// or numbers) is written as an array; anything else as its text.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let value = match text.starts_with('[') {
            true => serde_json::from_str::<Value>(&text).ok().filter(Value::is_array),
            false => None,
        };
        self.field(field, value.unwrap_or(Value::String(text)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The lines `log` writes through [`JsonLines`].
    fn lines(log: impl FnOnce()) -> Vec<Value> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().event_format(JsonLines).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(sink.0.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }

    #[test]
    fn a_line_keeps_the_module_and_the_event_s_fields_apart_and_lists_are_arrays() {
        let files = vec!["a.yaml".to_string(), "dir/b \"q\".yaml".to_string()];
        let lines = lines(|| {
            tracing::info!(route = "team-a/chat", upstream_target = "openai", target = "clash", files = ?files, n = 3u64, "hello");
        });
        let line = &lines[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], module_path!(), "the module that logged");
        assert_eq!(line["field.target"], "clash", "an event field named like the line's own key is kept apart");
        assert_eq!(line["upstream_target"], "openai");
        assert_eq!(line["message"], "hello");
        assert_eq!(line["files"], serde_json::json!(["a.yaml", "dir/b \"q\".yaml"]));
        assert_eq!(line["n"], 3);
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
    }
}
