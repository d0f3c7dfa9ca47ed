//! The project's former name appears in no tracked file's path or text, except the one sentence of
//! docs/development.md that records it: a user who searches for us must find only us, and our
//! headers, metrics and labels must not be mistaken for those of the projects that share it.

use std::path::Path;
use std::process::Command;

/// Spelt in two halves so that this file does not hold it.
fn former_name() -> String {
    ["switch", "yard"].concat()
}

/// Every tracked file, as git lists it (a checkout without git is walked instead, minus `target/`).
fn tracked_files(root: &Path) -> Vec<String> {
    match Command::new("git").arg("-C").arg(root).args(["ls-files", "-z"]).output() {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout)
            .expect("git prints UTF-8 paths")
            .split('\0')
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect(),
        _ => {
            let mut files = Vec::new();
            walk(root, root, &mut files);
            files
        }
    }
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read a directory of the repository") {
        let path = entry.expect("read a directory entry").path();
        let relative = path.strip_prefix(root).expect("below the root").to_string_lossy().into_owned();
        if relative == "target" || relative == ".git" {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, files);
        } else {
            files.push(relative);
        }
    }
}

/// The byte offsets of every case-insensitive occurrence of `needle` (ASCII) in `haystack`.
fn occurrences(haystack: &[u8], needle: &str) -> Vec<usize> {
    let needle = needle.as_bytes();
    haystack.windows(needle.len()).enumerate().filter(|(_, w)| w.eq_ignore_ascii_case(needle)).map(|(i, _)| i).collect()
}

#[test]
fn the_former_name_is_gone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let name = former_name();
    let files = tracked_files(root);
    assert!(files.iter().any(|f| f == "Cargo.toml"), "found no files to check in {}", root.display());
    let mut found = Vec::new();
    for file in &files {
        if !occurrences(file.as_bytes(), &name).is_empty() {
            found.push(format!("{file}: in its path"));
        }
        // A file deleted but not yet staged is listed by git and gone from the disk.
        let Ok(text) = std::fs::read(root.join(file)) else { continue };
        if file == "docs/development.md" {
            continue;
        }
        let hits = occurrences(&text, &name);
        for at in hits {
            let line = text[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            found.push(format!("{file}:{line}"));
        }
    }
    assert!(found.is_empty(), "the former name is still in:\n{}", found.join("\n"));
}

#[test]
fn one_sentence_records_the_former_name() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/development.md"))
        .expect("read docs/development.md");
    let name = former_name();
    let lines: Vec<&str> = doc.lines().filter(|line| !occurrences(line.as_bytes(), &name).is_empty()).collect();
    let [sentence] = lines[..] else {
        panic!("docs/development.md must record the former name in exactly one line, not {}: {lines:?}", lines.len())
    };
    let sentence = sentence.trim();
    assert!(
        sentence.ends_with('.') && !sentence[..sentence.len() - 1].contains(". "),
        "the line of docs/development.md that names the former name must be one sentence: {sentence:?}"
    );
}
