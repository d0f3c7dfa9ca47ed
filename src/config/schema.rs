//! A document checked against its CRD's structural schema, as the API server checks it before it
//! stores an object: every field the schema does not have, every value of the wrong type or
//! outside its enum, every required field missing, all at once (deserialising stops at the first).
//! What the schema leaves to CEL rules and ranges is compile's to check.

use serde_json::Value as Schema;
use serde_yaml::Value;

/// A departure from the schema: the field's path (`spec.targets[0].baseUrl`) and what is wrong.
pub type Problem = (String, String);

/// Every departure of `document` (a whole object: `apiVersion`, `kind`, `metadata`, `spec`) from
/// `schema`. `metadata` is left to the object's own reading.
pub fn problems(schema: &Schema, document: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    let Some(fields) = document.as_mapping() else { return out };
    for (key, value) in fields {
        let Some(name) = key.as_str() else {
            out.push((String::new(), format!("a field name must be a string, not {}", describe(key))));
            continue;
        };
        // Every object has these, whatever its schema lists; `metadata` is read as ObjectMeta.
        if ["apiVersion", "kind", "metadata"].contains(&name) {
            continue;
        }
        match property(schema, name) {
            Some(field) => check(field, value, name.to_string(), &mut out),
            None => out.push((name.to_string(), unknown(schema, name))),
        }
    }
    out
}

fn property<'a>(schema: &'a Schema, name: &str) -> Option<&'a Schema> {
    schema.get("properties")?.get(name)
}

fn check(schema: &Schema, value: &Value, path: String, out: &mut Vec<Problem>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Schema::Bool(true)) {
            out.push((path, format!("expected {}, got null", expected(schema))));
        }
        return;
    }
    let kind = schema.get("type").and_then(Schema::as_str).unwrap_or_default();
    let fits = match kind {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_bool(),
        "object" => value.is_mapping(),
        "array" => value.is_sequence(),
        _ => true,
    };
    if !fits {
        out.push((path, format!("expected {}, got {}", expected(schema), describe(value))));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Schema::as_array)
        && !allowed.iter().any(|a| same(a, value))
    {
        let names: Vec<String> =
            allowed.iter().map(|a| a.as_str().map_or_else(|| a.to_string(), String::from)).collect();
        out.push((path, format!("{} is not one of {}", describe(value), names.join(", "))));
        return;
    }
    match value {
        Value::Mapping(fields) => {
            let properties = schema.get("properties");
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let open = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Schema::Bool(true));
            for (key, field) in fields {
                let Some(name) = key.as_str() else {
                    out.push((path.clone(), format!("a field name must be a string, not {}", describe(key))));
                    continue;
                };
                let at = join(&path, name);
                match (properties.and_then(|p| p.get(name)), additional) {
                    (Some(field_schema), _) | (None, Some(field_schema)) => check(field_schema, field, at, out),
                    (None, None) if open || properties.is_none() => {}
                    (None, None) => out.push((at, unknown(schema, name))),
                }
            }
            for required in schema.get("required").and_then(Schema::as_array).into_iter().flatten() {
                if let Some(name) = required.as_str()
                    && !fields.contains_key(name)
                {
                    out.push((join(&path, name), "required field is missing".into()));
                }
            }
        }
        Value::Sequence(items) => {
            if let Some(item) = schema.get("items") {
                for (i, value) in items.iter().enumerate() {
                    check(item, value, format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_string() } else { format!("{path}.{name}") }
}

/// An enum value and a YAML value are the same: equal strings, or equal numbers and booleans.
fn same(allowed: &Schema, value: &Value) -> bool {
    match (allowed, value) {
        (Schema::String(a), Value::String(v)) => a == v,
        (Schema::Bool(a), Value::Bool(v)) => a == v,
        (Schema::Number(a), Value::Number(v)) => a.to_string() == v.to_string(),
        _ => false,
    }
}

/// "unknown field", with the nearest name the object has when one is near enough to be a typo.
fn unknown(schema: &Schema, name: &str) -> String {
    let known = schema.get("properties").and_then(Schema::as_object);
    let nearest = known
        .into_iter()
        .flat_map(|p| p.keys())
        .map(|k| (edit_distance(&name.to_ascii_lowercase(), &k.to_ascii_lowercase()), k))
        .min();
    match nearest {
        Some((distance, known)) if distance <= (name.chars().count() / 3).max(1) => {
            format!("unknown field; did you mean {known}?")
        }
        _ => "unknown field".into(),
    }
}

/// Edit distance: insertions, deletions, substitutions and swaps of neighbouring characters
/// (the typos people make).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitute = d[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = substitute.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

fn expected(schema: &Schema) -> &'static str {
    match schema.get("type").and_then(Schema::as_str) {
        Some("string") => "a string",
        Some("integer") => "an integer",
        Some("number") => "a number",
        Some("boolean") => "true or false",
        Some("object") => "an object",
        Some("array") => "a list",
        _ => "a value",
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "an object".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(kind: &str, yaml: &str) -> Vec<Problem> {
        let schema = crate::api::schema_of(kind).expect("a schema");
        problems(&schema, &serde_yaml::from_str(yaml).expect("YAML"))
    }

    #[test]
    fn every_problem_of_a_document_is_reported_with_the_nearest_name() {
        let found = problems_of(
            "ProviderRoute",
            r#"
apiVersion: sideyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: chat, labels: {a: b}}
spec:
  model: chat
  strategy: fastest
  fallbak: {maxAttempts: 2}
  holdBack: 2
  targets:
    - {name: a, baseUrl: "http://x", weight: "heavy", pricing: {prompt: 1.5}}
    - {nmae: b, baseUrl: "http://y"}
  fallback: {when: [connect, 429, sometimes]}
"#,
        );
        let expected: Vec<Problem> = [
            ("spec.strategy", "the string \"fastest\" is not one of priority, weighted, latency, throughput, cost"),
            ("spec.fallbak", "unknown field; did you mean fallback?"),
            ("spec.holdBack", "expected a string, got the number 2"),
            ("spec.targets[0].weight", "expected an integer, got the string \"heavy\""),
            ("spec.targets[0].pricing.prompt", "expected a string, got the number 1.5"),
            ("spec.targets[1].nmae", "unknown field; did you mean name?"),
            ("spec.targets[1].name", "required field is missing"),
            ("spec.fallback.when[1]", "expected a string, got the number 429"),
            (
                "spec.fallback.when[2]",
                "the string \"sometimes\" is not one of connect, timeout, 429, 5xx, 4xx, 4xx-context-length, auth",
            ),
        ]
        .into_iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn a_valid_document_has_no_problem_and_far_names_get_no_guess() {
        let valid = "apiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {name: k}\nspec: {key: {sha256: abc}, limit: '1', period: daily}\n";
        assert_eq!(problems_of("ApiKeyBudget", valid), Vec::<Problem>::new());
        let far = "apiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {name: k}\nspec: {key: {sha256: abc}, zzzzzzzz: 1}\nstauts: {}\n";
        let found = problems_of("ApiKeyBudget", far);
        assert_eq!(found[0], ("spec.zzzzzzzz".to_string(), "unknown field".to_string()));
        assert_eq!(found[1], ("stauts".to_string(), "unknown field; did you mean status?".to_string()));
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("fallbak", "fallback"), 1);
        assert_eq!(edit_distance("nmae", "name"), 1, "a swap is one typo");
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
