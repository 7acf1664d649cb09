//! Keeps the handler docs honest: the `pve.*` functions and sandbox globals a tunnel's Lua
//! state really holds (built by `ScriptVm::new`, as the tunnel worker builds it) are
//! compared with what the docs promise — the `## pve.x.y(...)` headings of
//! docs/handlers/*.md, the stubs of handlers/pve.d.lua, and the "Available" / "Not
//! available" lists of handlers/README.md. A function documented but missing, or exposed
//! but undocumented, fails the test with its name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mlua::{Table, Value};
use mtunnel::script::{Limits, ScriptVm, handler_sources};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The table behind a read-only `pve` proxy (its metatable's `__index`), or the table.
fn unwrap_proxy(t: &Table) -> Table {
    match t.metatable().map(|m| m.raw_get::<Value>("__index")) {
        Some(Ok(Value::Table(inner))) => inner,
        _ => t.clone(),
    }
}

/// Every leaf under `pve` (`pve.storage.alloc`, `pve.json.null`, ...), proxies looked through.
fn pve_leaves(prefix: &str, t: &Table, out: &mut BTreeSet<String>) {
    for pair in unwrap_proxy(t).pairs::<String, Value>() {
        let (k, v) = pair.expect("pve keys are strings");
        let name = format!("{prefix}.{k}");
        match v {
            Value::Table(sub) => pve_leaves(&name, &sub, out),
            _ => {
                out.insert(name);
            }
        }
    }
}

/// The tunnel's Lua state: globals and `pve.*` leaves.
fn actual() -> (BTreeSet<String>, BTreeSet<String>, ScriptVm) {
    let (sources, problems) = handler_sources(None);
    assert!(problems.is_empty(), "{problems:?}");
    let vm = ScriptVm::new(Limits::default(), &sources).expect("tunnel Lua state");
    let globals: BTreeSet<String> = vm
        .lua
        .globals()
        .pairs::<String, Value>()
        .map(|p| p.expect("global names are strings").0)
        .collect();
    let pve: Table = vm.lua.globals().get("pve").expect("global pve");
    let mut leaves = BTreeSet::new();
    pve_leaves("pve", &pve, &mut leaves);
    (globals, leaves, vm)
}

/// `## `pve.x.y(args)`` and `## `print(...)`` headings of docs/handlers/*.md.
fn documented_in_reference() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let dir = repo().join("docs/handlers");
    for entry in std::fs::read_dir(&dir).expect("docs/handlers") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        for line in read(&path).lines() {
            let Some(rest) = line.strip_prefix("## `") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            if name.starts_with("pve.") || name == "print" {
                out.insert(name);
            }
        }
    }
    out
}

/// `function pve.x.y(` stubs and `pve.x.y = <value>` that is not a namespace table.
fn documented_in_stub() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in read(&repo().join("handlers/pve.d.lua")).lines() {
        if let Some(rest) = line.strip_prefix("function ") {
            if let Some((name, _)) = rest.split_once('(') {
                out.insert(name.to_string());
            }
        } else if let Some((name, value)) = line.split_once(" = ")
            && name.starts_with("pve.")
            && value.trim() != "{}"
        {
            out.insert(name.to_string());
        }
    }
    out
}

/// Backticked Lua identifiers (no dots) of the README's sandbox section between `from`
/// and `to`.
fn readme_names(from: &str, to: &str) -> BTreeSet<String> {
    let text = read(&repo().join("handlers/README.md"));
    let start = text
        .find(from)
        .unwrap_or_else(|| panic!("handlers/README.md has no '{from}'"));
    let rest = &text[start + from.len()..];
    let end = rest
        .find(to)
        .unwrap_or_else(|| panic!("handlers/README.md has no '{to}' after '{from}'"));
    rest[..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            !w.is_empty()
                && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !w.starts_with(|c: char| c.is_ascii_digit())
        })
        .map(str::to_string)
        .collect()
}

fn diff(what: &str, documented: &BTreeSet<String>, actual: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for name in documented.difference(actual) {
        problems.push(format!("{what}: '{name}' is documented but not exposed"));
    }
    for name in actual.difference(documented) {
        problems.push(format!("{what}: '{name}' is exposed but not documented"));
    }
    problems
}

#[test]
fn sandbox_globals_and_pve_functions_match_the_docs() {
    let (globals, leaves, vm) = actual();
    let mut problems = Vec::new();

    // pve.*: the reference pages, the stub and the Lua state agree.
    let mut with_print = leaves.clone();
    with_print.insert("print".to_string());
    problems.extend(diff(
        "docs/handlers/*.md headings",
        &documented_in_reference(),
        &with_print,
    ));
    problems.extend(diff(
        "handlers/pve.d.lua",
        &documented_in_stub(),
        &with_print,
    ));

    // Globals: the README's "Available" list is exactly what the state holds.
    let available = readme_names("\nAvailable:\n", "\nNot available:");
    problems.extend(diff("handlers/README.md 'Available'", &available, &globals));
    let missing = readme_names("\nNot available:", "(the globals are nil)");
    for name in ["io", "os", "coroutine", "rawset", "load", "require"] {
        if !missing.contains(name) {
            problems.push(format!(
                "handlers/README.md 'Not available': '{name}' is no longer listed"
            ));
        }
    }
    for name in &missing {
        if globals.contains(name) {
            problems.push(format!(
                "handlers/README.md 'Not available': '{name}' is a global of the tunnel state"
            ));
        }
    }
    let string: Table = vm.lua.globals().get("string").expect("string library");
    if !matches!(string.raw_get::<Value>("dump"), Ok(Value::Nil)) {
        problems.push("string.dump is documented as unavailable but exists".into());
    }

    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_comparison_sees_real_functions() {
    // Guards the test above against comparing two empty sets.
    let (globals, leaves, _vm) = actual();
    assert!(leaves.contains("pve.storage.alloc"), "{leaves:?}");
    assert!(leaves.contains("pve.json.null"), "{leaves:?}");
    assert!(leaves.len() > 40, "{leaves:?}");
    assert!(
        globals.contains("pcall") && globals.contains("pve"),
        "{globals:?}"
    );
    assert!(documented_in_reference().contains("pve.qemu.check_config"));
    assert!(documented_in_stub().contains("pve.tunnel.commit"));
    assert!(readme_names("\nAvailable:\n", "\nNot available:").contains("xpcall"));
}

/// The recipe directories of examples/handlers.
fn cookbook_recipes() -> BTreeSet<String> {
    std::fs::read_dir(repo().join("examples/handlers"))
        .expect("examples/handlers")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_cookbook_section_links_every_recipe_and_its_files() {
    let readme = read(&repo().join("handlers/README.md"));
    let section = readme
        .split_once("\n## Cookbook\n")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(""))
        .expect("handlers/README.md has a '## Cookbook' section");
    let prefix = "](../examples/handlers/";
    let mut linked_recipes = BTreeSet::new();
    for link in section.split(prefix).skip(1) {
        let target = link.split(')').next().unwrap_or("");
        let path = repo().join("examples/handlers").join(target);
        assert!(
            path.exists(),
            "the cookbook links {target}, which does not exist"
        );
        if let Some(recipe) = target.strip_suffix('/') {
            linked_recipes.insert(recipe.to_string());
        }
    }
    assert_eq!(
        linked_recipes,
        cookbook_recipes(),
        "the Cookbook section of handlers/README.md and the directories of examples/handlers differ"
    );
}
