//! The structure, checked: every module of the library sits in one layer, and a module only
//! imports from layers below its own (so the import graph has no circle and no upward arrow).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The library's modules, lowest layer first. A module may use modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["metrics", "text", "config"],
    &["telemetry", "retry", "product"],
    &["diff", "command"],
    &["wire", "kafka"],
    &["upstream", "store"],
    &["outbox", "pipeline"],
    &["ops", "dlq", "tools"],
    &["app"],
    // Development tools (feature `dev-tools`).
    &["sim"],
    &["demo"],
];

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
