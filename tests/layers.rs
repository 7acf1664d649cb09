//! The crate's layers as the compiler sees them: every `crate::` path in `src/` (comments
//! and `#[cfg(test)]` modules left out) is an edge between two top-level modules, and each
//! edge must point down the map in `src/lib.rs` (a module imports only modules listed
//! below it). A new cycle or an upward import fails here with the whole graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules in the order of `src/lib.rs`'s map, top first.
fn map_order(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! - [`"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name.to_string()))
        .collect()
}

fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its test module and comment lines.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which top-level modules each top-level module names through `crate::`, and where.
fn edges(src: &Path, modules: &BTreeSet<String>) -> BTreeMap<(String, String), PathBuf> {
    let mut found = BTreeMap::new();
    for module in modules {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
        let file = src.join(format!("{module}.rs"));
        if file.exists() {
            files.push(file);
        }
        for f in files {
            let code = code_of(&f);
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name != *module && modules.contains(&name) {
                    found
                        .entry((module.clone(), name))
                        .or_insert_with(|| f.clone());
                }
            }
        }
    }
    found
}

#[test]
fn every_import_points_down_the_map_in_lib_rs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = map_order(&lib);
    let modules = declared_modules(&lib);
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(
        listed.len(),
        order.len(),
        "a module is listed twice: {order:?}"
    );
    assert_eq!(
        listed, modules,
        "the map in src/lib.rs must list every `pub mod` once"
    );
    let rank: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let edges = edges(&src, &modules);
    assert!(edges.len() > 40, "too few imports found: {edges:?}");
    let graph: Vec<String> = order
        .iter()
        .map(|m| {
            let targets: Vec<&str> = edges
                .keys()
                .filter(|(from, _)| from == m)
                .map(|(_, to)| to.as_str())
                .collect();
            format!("  {m} -> {}", targets.join(", "))
        })
        .collect();
    let upward: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| rank[to.as_str()] <= rank[from.as_str()])
        .map(|((from, to), file)| format!("  {from} -> {to} (first in {})", file.display()))
        .collect();
    assert!(
        upward.is_empty(),
        "imports that point up the map in src/lib.rs (or form a cycle):\n{}\n\nthe graph, \
         in the map's order:\n{}",
        upward.join("\n"),
        graph.join("\n")
    );
}
