//! The structure, checked: every module of the library sits in one layer, and a module only
//! imports from layers below its own (so the import graph has no circle and no upward arrow);
//! no function of the service is longer than a newcomer can read in one sitting.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The library's modules, lowest layer first. A module may use modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["metrics", "text", "config", "allocator"],
    &["telemetry", "retry", "product"],
    &["diff", "command"],
    &["wire", "kafka"],
    &["upstream", "store"],
    &["outbox", "pipeline", "scheduler"],
    &["ops", "dlq", "tools"],
    &["console"],
    &["app"],
    // Development tools (feature `dev-tools`).
    &["sim", "audit"],
    &["demo"],
];

/// The longest function body allowed in the service's code, in lines.
const MAX_FUNCTION_LINES: usize = 80;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level library module a file belongs to (`None` for the binaries).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (!["main", "handlers", "bin", "lib"].contains(&name.as_str())).then_some(name)
}

/// The library modules a source text names through `crate::`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

#[test]
fn every_import_points_down_the_layers() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            upward.push(format!("{module} is in no layer of LAYERS"));
            continue;
        };
        for used in imports(&std::fs::read_to_string(file).unwrap()) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                _ => upward.push(format!("{} uses crate::{used}", file.display())),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down:\n{}",
        upward.join("\n")
    );
}

#[test]
fn every_module_of_the_library_is_in_a_layer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(name) = line.strip_prefix("pub mod ") {
            let name = name.trim_end_matches(';');
            assert!(layer_of(name).is_some(), "module {name} is in no layer");
        }
    }
    assert_eq!(
        imports("use crate::{a::B, self, c}; crate::d::e()"),
        ["a", "c", "d"].into_iter().map(String::from).collect()
    );
}

/// Function bodies longer than the limit, as `file:line name (lines)`. A body is counted
/// from its `fn` line to the line that closes its braces (braces in strings and comments
/// are rare enough in this code base to be ignored).
fn long_functions(text: &str, file: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let is_fn = [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) fn ",
            "pub(crate) async fn ",
        ]
        .iter()
        .any(|p| t.starts_with(p));
        if !is_fn || t.ends_with(';') {
            continue;
        }
        let mut depth = 0i64;
        let mut opened = false;
        for (end, l) in lines.iter().enumerate().skip(start) {
            if !opened
                && end > start
                && l.trim_end().ends_with(';')
                && !l.contains('{')
                && depth == 0
            {
                break;
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                let n = end - start + 1;
                if n > MAX_FUNCTION_LINES {
                    let name: String = t
                        .split("fn ")
                        .nth(1)
                        .unwrap_or("")
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    long.push(format!("{file}:{} {name} ({n} lines)", start + 1));
                }
                break;
            }
        }
    }
    long
}

#[test]
fn no_function_of_the_service_is_too_long_to_read() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(src()).unwrap().display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        // A migration is a schema written once and never changed: read as a table, not a story.
        if rel.contains("migration/m") {
            continue;
        }
        // Unit tests are read one at a time; only the code above them counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        long.extend(long_functions(code, &rel));
    }
    assert!(
        long.is_empty(),
        "functions longer than {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
    let sample = format!("fn f() {{\n{}}}\n", "    x();\n".repeat(MAX_FUNCTION_LINES));
    assert_eq!(
        long_functions(&sample, "sample").len(),
        1,
        "the check can fail"
    );
}
