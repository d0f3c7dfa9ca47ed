//! The module layering of `src/`, as docs/development.md writes it down, checked against the code:
//! every path into another module (`crate::x`, `super::x`, in `use` or inline) follows an allowed
//! arrow, the files of one module import each other without a cycle, and no module names a path
//! its layer must never use.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The rules as docs/development.md states them.
struct Rules {
    /// Module -> the modules it may use.
    uses: BTreeMap<String, BTreeSet<String>>,
    /// Module, or `module::file` -> path prefixes it must never name.
    never: BTreeMap<String, Vec<String>>,
}

fn rules() -> Rules {
    let doc = std::fs::read_to_string(root().join("docs/development.md")).expect("read docs/development.md");
    let table = |heading: &str| -> Vec<Vec<Vec<String>>> {
        let start = doc.find(heading).unwrap_or_else(|| panic!("docs/development.md has no {heading:?} section"));
        let rows: Vec<Vec<Vec<String>>> = doc[start..]
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|row| {
                row.trim_matches('|')
                    .split('|')
                    .map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_string).collect::<Vec<String>>())
                    .collect()
            })
            .collect();
        assert!(!rows.is_empty(), "the {heading:?} table in docs/development.md is empty");
        rows
    };
    let mut uses = BTreeMap::new();
    for row in table("## Layers") {
        let [module, allowed] = &row[..2] else { panic!("a Layers row needs two cells") };
        let module = module.first().expect("a Layers row names its module").clone();
        uses.insert(module, allowed.iter().cloned().collect());
    }
    let mut never = BTreeMap::new();
    for row in table("## Forbidden paths") {
        let [module, paths] = &row[..2] else { panic!("a Forbidden paths row needs two cells") };
        never.insert(module.first().expect("a row names its module").clone(), paths.clone());
    }
    Rules { uses, never }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One source file: its module path (`["sidecar", "proxy"]`) and its code without comments,
/// strings and character literals.
struct Source {
    module: Vec<String>,
    code: String,
}

fn sources() -> Vec<Source> {
    let mut out = Vec::new();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = module_of(&path);
                if module.is_empty() {
                    continue; // lib.rs and main.rs only declare and call the modules.
                }
                let text = std::fs::read_to_string(&path).expect("read a source file");
                out.push(Source { module, code: strip(&text) });
            }
        }
    }
    out.sort_by(|a, b| a.module.cmp(&b.module));
    out
}

fn module_of(path: &Path) -> Vec<String> {
    let relative = path.strip_prefix(root().join("src")).expect("under src");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// The code with comments, string literals and character literals blanked out, so that a path
/// in a doc comment or a message is not taken for a use.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#')) && !is_ident(b.get(i.wrapping_sub(1)).copied()) => {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
                i += 2 + hashes;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{..}'), or a lifetime ('a), which stays.
                let end = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..].iter().position(|&c| c == b'\'').map(|p| i + 2 + p)
                } else {
                    let len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (b.get(i + 1 + len) == Some(&b'\'')).then_some(i + 1 + len)
                };
                match end {
                    Some(end) => {
                        out.push_str("' '");
                        i = end + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            c => {
                // Whole UTF-8 sequences, so that `out` stays a string.
                let len = text[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&text[i..i + len]);
                i += len.max(1);
                let _ = c;
            }
        }
    }
    out
}

fn is_ident(c: Option<u8>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Every path the code names from its root: `a::b::c`, with `{...}` groups expanded
/// (`a::{b, c::d}` is `a::b` and `a::c::d`). A root is a word not after `::` or `.`.
fn paths(code: &str) -> Vec<Vec<String>> {
    let tokens = tokenize(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let root = &tokens[i];
        let is_root = is_word(root) && (i == 0 || !matches!(tokens[i - 1].as_str(), "::" | "."));
        i += 1;
        if is_root && tokens.get(i).map(String::as_str) == Some("::") {
            path_tail(&tokens, &mut i, vec![root.clone()], &mut out);
        }
    }
    out
}

/// The paths into the crate's own modules that a source names, made absolute (`crate::`,
/// `super::` and `self::` resolved): `["sidecar", "billing", "Bill"]`.
fn references(source: &Source) -> Vec<Vec<String>> {
    paths(&source.code)
        .into_iter()
        .filter_map(|path| {
            let mut at = match path[0].as_str() {
                "crate" => Vec::new(),
                "self" | "super" => source.module.clone(),
                _ => return None,
            };
            let mut rest = &path[..];
            if rest[0] == "crate" || rest[0] == "self" {
                rest = &rest[1..];
            }
            while rest.first().map(String::as_str) == Some("super") {
                at.pop();
                rest = &rest[1..];
            }
            at.extend(rest.iter().cloned());
            Some(at)
        })
        .collect()
}

/// Reads `::a::b` or `::{a::b, c}` after a path's start, pushing each full path.
fn path_tail(tokens: &[String], i: &mut usize, mut path: Vec<String>, out: &mut Vec<Vec<String>>) {
    while tokens.get(*i).map(String::as_str) == Some("::") {
        match tokens.get(*i + 1).map(String::as_str) {
            Some("{") => {
                *i += 2;
                loop {
                    match tokens.get(*i).map(String::as_str) {
                        None => return,
                        Some("}") => {
                            *i += 1;
                            return;
                        }
                        Some("self") => {
                            out.push(path.clone());
                            *i += 1;
                        }
                        Some(word) if is_word(word) => {
                            let mut member = path.clone();
                            member.push(word.to_string());
                            *i += 1;
                            path_tail(tokens, i, member, out);
                        }
                        Some(_) => *i += 1,
                    }
                }
            }
            Some(word) if is_word(word) => {
                path.push(word.to_string());
                *i += 2;
            }
            _ => break,
        }
    }
    out.push(path);
}

fn is_word(token: &str) -> bool {
    token.bytes().next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
}

fn tokenize(code: &str) -> Vec<String> {
    let b = code.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            tokens.push(code[start..i].to_string());
        } else if b[i..].starts_with(b"::") {
            tokens.push("::".into());
            i += 2;
        } else {
            if !c.is_ascii_whitespace() {
                tokens.push((c as char).to_string());
            }
            i += 1;
        }
    }
    tokens
}

/// `pub use child::{A, B}` lines of a module root: which child each re-exported name comes from.
fn reexports(sources: &[Source], module: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(root) = sources.iter().find(|s| s.module == [module]) else { return out };
    for path in references(&Source { module: root.module.clone(), code: root.code.replace("pub use ", "use self::") }) {
        if let [m, child, .., name] = &path[..]
            && m == module
            && path.len() >= 3
        {
            out.insert(name.clone(), child.clone());
        }
    }
    out
}

#[test]
fn every_path_into_another_module_follows_an_allowed_arrow() {
    let rules = rules();
    let sources = sources();
    let mut wrong = BTreeSet::new();
    for source in &sources {
        let from = &source.module[0];
        let allowed = rules
            .uses
            .get(from)
            .unwrap_or_else(|| panic!("src/{from} is not in the Layers table of docs/development.md; add its row"));
        for path in references(source) {
            let Some(to) = path.first() else { continue };
            if to == from || !rules.uses.contains_key(to) {
                continue;
            }
            if !allowed.contains(to) {
                wrong.insert(format!("{} -> {}", source.module.join("::"), path.join("::")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "paths across layers without an arrow in docs/development.md's Layers table:\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_allowed_arrows_form_no_cycle() {
    let rules = rules();
    let graph: BTreeMap<String, BTreeSet<String>> = rules.uses.clone();
    if let Some(cycle) = find_cycle(&graph) {
        panic!("the Layers table of docs/development.md has a cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_files_of_a_module_import_each_other_without_a_cycle() {
    let sources = sources();
    let modules: BTreeSet<&String> = sources.iter().map(|s| &s.module[0]).collect();
    let mut cycles = Vec::new();
    for module in modules {
        let files: BTreeSet<String> = sources
            .iter()
            .filter(|s| s.module.len() == 2 && &s.module[0] == module)
            .map(|s| s.module[1].clone())
            .collect();
        let exported = reexports(&sources, module);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for source in sources.iter().filter(|s| s.module.len() == 2 && &s.module[0] == module) {
            let from = &source.module[1];
            let edges = graph.entry(from.clone()).or_default();
            for path in references(source) {
                if path.first() != Some(module) {
                    continue;
                }
                let to = match path.get(1) {
                    Some(name) if files.contains(name) => name.clone(),
                    Some(name) => match exported.get(name) {
                        Some(child) => child.clone(),
                        None => continue, // Defined in the module root itself.
                    },
                    None => continue,
                };
                if &to != from {
                    edges.insert(to);
                }
            }
        }
        if let Some(cycle) = find_cycle(&graph) {
            cycles.push(format!("{module}: {}", cycle.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "files that import each other (through re-exports too):\n{}", cycles.join("\n"));
}

#[test]
fn no_module_names_a_path_its_layer_must_never_use() {
    let rules = rules();
    let sources = sources();
    let mut found = BTreeSet::new();
    for (scope, forbidden) in &rules.never {
        let scope: Vec<&str> = scope.split("::").collect();
        let matching: Vec<&Source> = sources
            .iter()
            .filter(|s| s.module.iter().map(String::as_str).take(scope.len()).eq(scope.iter().copied()))
            .collect();
        assert!(!matching.is_empty(), "docs/development.md forbids paths to {scope:?}, which is no module of src/");
        for source in matching {
            for path in paths(&source.code) {
                for banned in forbidden {
                    let banned: Vec<&str> = banned.split("::").collect();
                    if path.len() >= banned.len() && path.iter().zip(&banned).all(|(a, b)| a == b) {
                        found.insert(format!("{} names {}", source.module.join("::"), path.join("::")));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "forbidden paths (docs/development.md):\n{}",
        found.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// Some cycle of `graph`, as the nodes around it, first repeated at the end.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, bool>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(true) => return None,
            Some(false) => {
                let at = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = stack[at..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        state.insert(node.to_string(), false);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, state, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        state.insert(node.to_string(), true);
        None
    }
    let mut state = BTreeMap::new();
    graph.keys().find_map(|node| visit(node, graph, &mut state, &mut Vec::new()))
}

/// The checker itself: each rule fails on code that breaks it.
#[test]
fn the_checker_sees_what_it_must() {
    let source = |module: &[&str], code: &str| Source {
        module: module.iter().map(|s| s.to_string()).collect(),
        code: strip(code),
    };
    let s = source(
        &["sidecar", "proxy"],
        "use crate::{api::X, config::{self, Y}};\nuse super::billing::Z; // crate::operator::no\nfn f() { let _ = \"crate::operator::no\"; super::super::budget::f(); self::inner::g(); let c = '\"'; crate::providers::h(); }",
    );
    let refs: Vec<String> = references(&s).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        refs,
        [
            "api::X",
            "config",
            "config::Y",
            "sidecar::billing::Z",
            "budget::f",
            "sidecar::proxy::inner::g",
            "providers::h"
        ]
    );
    let roots: Vec<String> = paths(&strip("use std::{fs, io::Read};\nfn f() { x.parse::<u64>(); tokio::spawn(g); }"))
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(roots, ["std::fs", "std::io::Read", "tokio::spawn"]);
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "a".into()]));
    assert_eq!(module_of(&root().join("src/sidecar/mod.rs")), ["sidecar"]);
    assert_eq!(module_of(&root().join("src/sidecar/upstream/mod.rs")), ["sidecar", "upstream"]);
    assert_eq!(module_of(&root().join("src/sidecar/upstream/h1.rs")), ["sidecar", "upstream", "h1"]);
}
