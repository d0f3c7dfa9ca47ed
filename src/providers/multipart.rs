//! Finding the `model` field of a `multipart/form-data` body (RFC 7578) from its first bytes, as
//! they arrive: enough to route an upload (audio, files) without reading the file parts.

use std::ops::Range;

use memchr::memmem;

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        // RFC 2046: 1 to 70 characters.
        (!value.is_empty() && value.len() <= 70).then_some(value)
    })
}

/// What the first bytes of a form say about its `model` field.
#[derive(Debug, PartialEq, Eq)]
pub enum ModelField {
    /// The field's value is at this span of the bytes.
    Found(Range<usize>),
    /// The form ended without one.
    Absent,
    /// Not known yet: more of the body is needed.
    NeedMore,
}

/// Looks for the first `model` field (a part named `model` without a file name) in `prefix`, the
/// beginning of a form delimited by `boundary`.
pub fn model_field(prefix: &[u8], boundary: &str) -> ModelField {
    let delimiter = [b"--", boundary.as_bytes()].concat();
    let finder = memmem::Finder::new(&delimiter);
    let Some(first) = finder.find(prefix) else { return ModelField::NeedMore };
    let mut at = first + delimiter.len();
    loop {
        // After a delimiter: `--` closes the form, CRLF starts a part.
        let Some(after) = prefix.get(at..at + 2) else { return ModelField::NeedMore };
        if after == b"--" {
            return ModelField::Absent;
        }
        let Some(head_end) = memmem::find(&prefix[at..], b"\r\n\r\n").map(|i| at + i) else {
            return ModelField::NeedMore;
        };
        let head = &prefix[at..head_end];
        let body_start = head_end + 4;
        let Some(next) = finder.find(&prefix[body_start..]).map(|i| body_start + i) else {
            return ModelField::NeedMore;
        };
        // The part's content ends before the CRLF that precedes the next delimiter.
        let body_end = if prefix[..next].ends_with(b"\r\n") { next - 2 } else { next };
        if is_model_part(head) {
            return ModelField::Found(body_start..body_end.max(body_start));
        }
        at = next + delimiter.len();
    }
}

/// Whether a part's headers name it `model` and give no file name.
fn is_model_part(head: &[u8]) -> bool {
    let Ok(head) = std::str::from_utf8(head) else { return false };
    head.split("\r\n").any(|line| {
        let Some((name, value)) = line.split_once(':') else { return false };
        if !name.trim().eq_ignore_ascii_case("content-disposition") {
            return false;
        }
        let mut params = value.split(';').skip(1).filter_map(|p| p.split_once('='));
        let mut named = false;
        for (key, value) in &mut params {
            let (key, value) = (key.trim(), value.trim().trim_matches('"'));
            if key.eq_ignore_ascii_case("filename") {
                return false;
            }
            named |= key.eq_ignore_ascii_case("name") && value == "model";
        }
        named
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(fields: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, file, value) in fields {
            out.extend_from_slice(b"--XyZ\r\n");
            match file {
                Some(file) => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
                ),
                None => out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    #[test]
    fn reads_the_boundary_of_form_data_only() {
        assert_eq!(boundary("multipart/form-data; boundary=XyZ"), Some("XyZ"));
        assert_eq!(boundary("Multipart/Form-Data;charset=utf-8; BOUNDARY=\"a b\""), Some("a b"));
        assert_eq!(boundary("multipart/mixed; boundary=XyZ"), None);
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary("multipart/form-data; boundary="), None);
        assert_eq!(boundary("application/json"), None);
    }

    #[test]
    fn finds_the_model_wherever_it_is_and_whatever_comes_after() {
        let body = form(&[("purpose", None, "batch"), ("model", None, "whisper-1"), ("file", Some("a.wav"), "RIFF")]);
        let ModelField::Found(span) = model_field(&body, "XyZ") else { panic!("no model") };
        assert_eq!(&body[span], b"whisper-1");
        // Only the bytes up to the end of the model part are needed.
        let end = memmem::find(&body, b"whisper-1\r\n--XyZ").unwrap() + 16;
        assert!(matches!(model_field(&body[..end], "XyZ"), ModelField::Found(_)));
        assert_eq!(model_field(&body[..end - 1], "XyZ"), ModelField::NeedMore);
    }

    #[test]
    fn a_file_named_model_is_not_the_model_and_a_form_may_have_none() {
        let body = form(&[("model", Some("model.bin"), "xx"), ("purpose", None, "fine-tune")]);
        assert_eq!(model_field(&body, "XyZ"), ModelField::Absent);
        assert_eq!(model_field(b"--XyZ--\r\n", "XyZ"), ModelField::Absent);
        assert_eq!(model_field(b"", "XyZ"), ModelField::NeedMore);
        let body = form(&[("model", None, "")]);
        let ModelField::Found(span) = model_field(&body, "XyZ") else { panic!("no model") };
        assert!(span.is_empty());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn no_bytes_make_the_reader_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
                let _ = model_field(&bytes, "XyZ");
                let mut near = form(&[("model", None, "m"), ("file", Some("f"), "data")]);
                let at = cut % (near.len() + 1);
                near.splice(at..at, bytes.iter().copied().take(8));
                let _ = model_field(&near, "XyZ");
                let _ = model_field(&near[..cut.min(near.len())], "XyZ");
            }

            #[test]
            fn finds_the_model_among_any_fields(
                before in prop::collection::vec(("[a-z]{1,8}", "[ -~]{0,20}"), 0..4),
                model in "[A-Za-z0-9._-]{0,20}",
            ) {
                let mut fields: Vec<(&str, Option<&str>, &str)> =
                    before.iter().filter(|(n, _)| n != "model").map(|(n, v)| (n.as_str(), None, v.as_str())).collect();
                fields.push(("model", None, &model));
                fields.push(("file", Some("f.wav"), "bytes"));
                let body = form(&fields);
                let ModelField::Found(span) = model_field(&body, "XyZ") else { panic!("no model") };
                prop_assert_eq!(&body[span], model.as_bytes());
            }
        }
    }
}
