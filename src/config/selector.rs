//! `workloadSelector`: which pods' sidecars get a route or budget. The operator compiles every
//! object of a namespace into one config; each sidecar keeps those whose selector matches the labels
//! of its own pod, read from a downward-API file.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A pod's labels.
pub type Labels = BTreeMap<String, String>;

/// Checks what the API server does not: the schema of a LabelSelector is plain data, so an unknown
/// operator or a missing value list would otherwise only show as a selector that never matches.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("matchExpressions[{i}]");
        if e.key.is_empty() {
            return Err(format!("{at}.key: must not be empty"));
        }
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        match e.operator.as_str() {
            "In" | "NotIn" if !has_values => return Err(format!("{at}.values: must not be empty for {}", e.operator)),
            "Exists" | "DoesNotExist" if has_values => {
                return Err(format!("{at}.values: must be empty for {}", e.operator));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!("{at}.operator: {other:?} is not one of In, NotIn, Exists, DoesNotExist"));
            }
        }
    }
    Ok(())
}

/// Whether `labels` satisfy `selector`, with Kubernetes' semantics: every `matchLabels` pair and
/// every expression must hold; an empty selector matches every pod.
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let pairs = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    pairs
        && selector.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let listed = || value.is_some_and(|v| e.values.iter().flatten().any(|x| x == v));
            match e.operator.as_str() {
                "In" => listed(),
                "NotIn" => !listed(),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                // Compile rejects other operators; a selector that cannot be understood selects nothing.
                _ => false,
            }
        })
}

/// Parses the downward API's `metadata.labels` file: one `key="value"` per line, the value quoted
/// as Go's `strconv.Quote` does.
pub fn parse_labels_file(text: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}", n + 1);
        let (key, quoted) = line.split_once('=').ok_or_else(|| bad("expected key=\"value\""))?;
        let value = unquote(quoted).ok_or_else(|| bad("the value is not a quoted string"))?;
        labels.insert(key.to_string(), value);
    }
    Ok(labels)
}

/// Reverses Go's `strconv.Quote` for the escapes it produces.
fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let hex = |chars: &mut std::str::Chars<'_>, digits: usize| {
            let code: String = chars.by_ref().take(digits).collect();
            u32::from_str_radix(&code, 16).ok().filter(|_| code.len() == digits).and_then(char::from_u32)
        };
        out.push(match chars.next()? {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'a' => '\u{7}',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'v' => '\u{b}',
            '\\' => '\\',
            '"' => '"',
            'x' => hex(&mut chars, 2)?,
            'u' => hex(&mut chars, 4)?,
            'U' => hex(&mut chars, 8)?,
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions_follow_kubernetes() {
        let pod = labels(&[("app", "support-bot"), ("tier", "web")]);
        let by_labels =
            |pairs: &[(&str, &str)]| LabelSelector { match_labels: Some(labels(pairs)), ..Default::default() };
        let by_expr =
            |e: LabelSelectorRequirement| LabelSelector { match_expressions: Some(vec![e]), ..Default::default() };

        assert!(matches(&LabelSelector::default(), &pod), "an empty selector matches every pod");
        assert!(matches(&by_labels(&[("app", "support-bot")]), &pod));
        assert!(!matches(&by_labels(&[("app", "support-bot"), ("tier", "db")]), &pod));
        assert!(matches(&by_expr(expr("tier", "In", &["web", "api"])), &pod));
        assert!(!matches(&by_expr(expr("tier", "In", &["db"])), &pod));
        assert!(matches(&by_expr(expr("tier", "NotIn", &["db"])), &pod));
        assert!(matches(&by_expr(expr("zone", "NotIn", &["a"])), &pod), "NotIn holds when the label is absent");
        assert!(matches(&by_expr(expr("app", "Exists", &[])), &pod));
        assert!(!matches(&by_expr(expr("zone", "Exists", &[])), &pod));
        assert!(matches(&by_expr(expr("zone", "DoesNotExist", &[])), &pod));
        assert!(!matches(&by_expr(expr("app", "Gt", &["1"])), &pod));
    }

    #[test]
    fn invalid_selectors_are_explained() {
        let with = |e| LabelSelector { match_expressions: Some(vec![e]), ..Default::default() };
        assert_eq!(
            validate(&with(expr("tier", "In", &[]))),
            Err("matchExpressions[0].values: must not be empty for In".into())
        );
        assert_eq!(
            validate(&with(expr("tier", "Exists", &["x"]))),
            Err("matchExpressions[0].values: must be empty for Exists".into())
        );
        assert!(validate(&with(expr("tier", "in", &["x"]))).unwrap_err().contains("\"in\" is not one of"));
        assert!(validate(&with(expr("tier", "NotIn", &["x"]))).is_ok());
    }

    #[test]
    fn the_downward_api_labels_file_is_parsed() {
        let text = "app=\"support-bot\"\npod-template-hash=\"7d9f\"\nnote=\"a \\\"b\\\" \\u00e9\\n\"\n";
        let parsed = parse_labels_file(text).unwrap();
        assert_eq!(parsed["app"], "support-bot");
        assert_eq!(parsed["pod-template-hash"], "7d9f");
        assert_eq!(parsed["note"], "a \"b\" é\n");
        assert_eq!(parse_labels_file("app=support-bot"), Err("line 1: the value is not a quoted string".into()));
        assert_eq!(parse_labels_file("app"), Err("line 1: expected key=\"value\"".into()));
        assert_eq!(parse_labels_file("").unwrap(), Labels::new());
    }
}
