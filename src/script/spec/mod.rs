//! The handler spec runner behind `mtunnel handlers test [DIR]`: runs every case of every
//! `*_spec.lua` file against a fresh temporary node that uses the scripted backend, and
//! reports one line per case plus `N passed, N failed`. A run that checks nothing fails:
//! a refused handler, a spec file without cases, a case without an assertion, and a run in
//! which no case ran (a `--filter` that matches nothing) each count as a failure. A
//! cookbook directory (`examples/handlers/`, see [`super::recipe_dirs`]) runs recipe by
//! recipe, each against the built-ins overridden by that recipe alone.
//!
//! A case opens tunnels the real way (`tunnel::open`: reserved config `lock: create`,
//! control socket, worker task with the Lua handlers) and talks to the worker over its
//! UNIX socket, so replies and error texts are exactly those on the wire. The spec file
//! runs in its own sandboxed Lua VM (no `pve`, no I/O); backend overrides a case passes
//! are functions of that VM, served by [`ScriptedBackend::with_overrides`].
//!
//! This module owns temporary nodes and the spec Lua API (`t`, tunnel objects); it must
//! not change how handlers run: it only drives the public tunnel entry points.
//! Reference: `docs/handlers/specs.md`.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua::chunk::ChunkMode;
use mlua::{
    FromLuaMulti, Function, IntoLuaMulti, Lua, LuaSerdeExt, MultiValue, Table, UserData,
    UserDataFields, UserDataMethods, Value as LuaValue,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::scripted::ScriptedBackend;
use super::{Budget, Limits, ScriptVm, clean_error, handler_sources, new_sandbox};
use crate::auth::acl::{self, Acl, AclEntry};
use crate::config::{ConfigFile, NodeConfig, Overrides};
use crate::node::{Backends, Node};
use crate::storage::StorageDef;
use crate::task::Upid;

/// The specs shipped in the binary (`handlers/<cmd>_spec.lua`).
pub use super::BUILTIN_SPECS;

/// The Lua side of `t` and of tunnel objects.
const PRELUDE: &str = include_str!("spec_prelude.lua");

/// Limits of a spec VM; the instruction budget is per case.
pub const SPEC_LIMITS: Limits = Limits {
    memory_bytes: 256 << 20,
    instructions: 500_000_000,
};

/// Longest a case may run.
const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest `tunnel:send` waits for the reply line.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest `tunnel:close` waits for the worker task to end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Token used by `t:open` without `privs`: every privilege on `/`.
pub const FULL_AUTHID: &str = "root@pam!spec";

/// Node name of spec nodes.
pub const SPEC_NODE: &str = "target";

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct SpecOptions {
    /// Handlers directory: overrides built-in handlers; its `*_spec.lua` are run (the
    /// built-in specs when it has none or is not given). A cookbook directory runs each
    /// recipe (subdirectory) with its own overrides and specs.
    pub dir: Option<PathBuf>,
    /// Only cases whose `file: case` name contains this text.
    pub filter: Option<String>,
}

/// Result counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
}

struct SpecFile {
    name: String,
    code: String,
}

/// The spec files of one handler set. `recipe` names a cookbook recipe (a subdirectory):
/// its file names are prefixed with it and it never falls back to the built-in specs.
fn spec_files(dir: Option<&Path>, recipe: Option<&str>) -> anyhow::Result<Vec<SpecFile>> {
    let mut files = Vec::new();
    let prefix = recipe.map(|r| format!("{r}/")).unwrap_or_default();
    if let Some(dir) = dir {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("reading handlers directory {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.ends_with("_spec.lua") {
                continue;
            }
            let code = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            files.push(SpecFile {
                name: format!("{prefix}{name}"),
                code,
            });
        }
    }
    if files.is_empty() && recipe.is_none() {
        files = BUILTIN_SPECS
            .iter()
            .map(|(name, code)| SpecFile {
                name: name.to_string(),
                code: code.to_string(),
            })
            .collect();
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Runs the specs and writes the report to `out`. A cookbook directory (see
/// [`super::recipe_dirs`]) runs each recipe's specs against the built-ins overridden by
/// that recipe alone.
pub async fn run_specs(opts: &SpecOptions, out: &mut dyn Write) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut counts = FileCounts::default();
    match opts.dir.as_deref().and_then(super::recipe_dirs) {
        Some(recipes) => {
            for dir in recipes {
                let label = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let set = HandlerSet {
                    dir: Some(&dir),
                    recipe: Some(&label),
                };
                run_set(set, opts, out, &mut summary, &mut counts).await?;
            }
        }
        None => {
            let set = HandlerSet {
                dir: opts.dir.as_deref(),
                recipe: None,
            };
            run_set(set, opts, out, &mut summary, &mut counts).await?;
        }
    }
    // A run that checked nothing must not look like a passing one (`--filter` with a typo,
    // spec files that return `{}`).
    if counts.ran == 0 {
        summary.failed += 1;
        match &opts.filter {
            Some(f) => writeln!(
                out,
                "FAIL  no spec case ran: --filter '{f}' matches none of the {} cases",
                counts.defined
            )?,
            None => writeln!(
                out,
                "FAIL  no spec case ran: the spec files define no cases"
            )?,
        }
    }
    writeln!(out, "{} passed, {} failed", summary.passed, summary.failed)?;
    out.flush()?;
    Ok(summary)
}

/// One set of handlers under test: a handlers directory (or none: built-ins only), and
/// the recipe name when it is one recipe of a cookbook.
#[derive(Clone, Copy)]
struct HandlerSet<'a> {
    dir: Option<&'a Path>,
    recipe: Option<&'a str>,
}

async fn run_set(
    set: HandlerSet<'_>,
    opts: &SpecOptions,
    out: &mut dyn Write,
    summary: &mut Summary,
    counts: &mut FileCounts,
) -> anyhow::Result<()> {
    // A handler that does not load is a failure of the run, not a warning: every case of
    // its command would otherwise test only the "handler not loaded" reply.
    let (sources, problems) = handler_sources(set.dir);
    for problem in problems {
        summary.failed += 1;
        writeln!(out, "FAIL  handler file skipped: {problem}")?;
    }
    let vm = ScriptVm::new(Limits::default(), &sources)?;
    for (cmd, handler) in &vm.handlers {
        if let Err(e) = handler {
            summary.failed += 1;
            writeln!(out, "FAIL  handler '{cmd}' refused: {e}")?;
        }
    }
    drop(vm);

    let files = spec_files(set.dir, set.recipe)?;
    if let (Some(recipe), true) = (set.recipe, files.is_empty()) {
        // a recipe is only as good as its specs; the built-in ones would not test it
        summary.failed += 1;
        counts.ran += 1;
        writeln!(
            out,
            "FAIL  {recipe}: the recipe has no *_spec.lua of its own"
        )?;
    }
    for file in files {
        let c = run_file(&file, set.dir, opts, out, summary).await?;
        counts.defined += c.defined;
        counts.ran += c.ran;
    }
    Ok(())
}

/// The case currently running in a spec VM (natives look it up at call time).
#[derive(Clone, Default)]
struct Current(Arc<Mutex<Option<Arc<CaseEnv>>>>);

impl Current {
    fn get(&self) -> Option<Arc<CaseEnv>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, env: Option<Arc<CaseEnv>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = env;
    }
}

/// How many cases a spec file defines and how many of them ran (passed or failed).
#[derive(Debug, Clone, Copy, Default)]
struct FileCounts {
    defined: usize,
    ran: usize,
}

async fn run_file(
    file: &SpecFile,
    dir: Option<&Path>,
    opts: &SpecOptions,
    out: &mut dyn Write,
    summary: &mut Summary,
) -> anyhow::Result<FileCounts> {
    let printed = Arc::new(Mutex::new(Vec::<String>::new()));
    let current = Current::default();
    let mut counts = FileCounts::default();
    let loaded = load_spec(file, &current, &printed).and_then(|loaded| {
        if loaded.cases.is_empty() {
            Err("the file defines no cases: it must return {[\"case name\"] = function(t) ... end, ...}".to_string())
        } else {
            Ok(loaded)
        }
    });
    let LoadedSpec {
        lua,
        new_t,
        assertions,
        cases,
    } = match loaded {
        Ok(x) => x,
        Err(e) => {
            summary.failed += 1;
            counts.ran += 1;
            writeln!(out, "FAIL  {}: (loading the spec file)", file.name)?;
            write_indented(out, &e)?;
            return Ok(counts);
        }
    };
    counts.defined = cases.len();
    for (case, func) in cases {
        let full = format!("{}: {case}", file.name);
        if opts
            .filter
            .as_ref()
            .is_some_and(|f| !full.contains(f.as_str()))
        {
            continue;
        }
        counts.ran += 1;
        let env = match CaseEnv::new(&lua, dir.map(Path::to_path_buf)) {
            Ok(env) => Arc::new(env),
            Err(e) => {
                summary.failed += 1;
                writeln!(out, "FAIL  {full}")?;
                write_indented(out, &format!("setting up the case: {e}"))?;
                continue;
            }
        };
        current.set(Some(Arc::clone(&env)));
        if let Some(budget) = lua.app_data_ref::<Budget>() {
            budget.reset(SPEC_LIMITS.instructions);
        }
        let result = run_case(&new_t, &assertions, &func).await;
        current.set(None);
        let teardown = env.teardown(&lua).await;
        let result = result.and(teardown);
        match result {
            Ok(()) => {
                summary.passed += 1;
                writeln!(out, "ok    {full}")?;
            }
            Err(e) => {
                summary.failed += 1;
                writeln!(out, "FAIL  {full}")?;
                write_indented(out, &e)?;
            }
        }
        for line in std::mem::take(&mut *printed.lock().unwrap_or_else(|e| e.into_inner())) {
            writeln!(out, "      | {line}")?;
        }
        out.flush()?;
    }
    Ok(counts)
}

fn write_indented(out: &mut dyn Write, text: &str) -> std::io::Result<()> {
    for line in text.lines() {
        writeln!(out, "      {line}")?;
    }
    Ok(())
}

async fn run_case(new_t: &Function, assertions: &Function, func: &Function) -> Result<(), String> {
    let t: Table = new_t.call(()).map_err(|e| clean_error(&e))?;
    match tokio::time::timeout(CASE_TIMEOUT, func.call_async::<()>(&t)).await {
        Ok(Ok(())) => match assertions.call::<u64>(&t).map_err(|e| clean_error(&e))? {
            0 => Err(NO_ASSERTION.to_string()),
            _ => Ok(()),
        },
        Ok(Err(e)) => match clean_error(&e) {
            msg if msg.contains(super::BUDGET_MSG) => Err(format!(
                "the case exceeded its instruction limit of {} (runaway loop?)",
                SPEC_LIMITS.instructions
            )),
            msg => Err(msg),
        },
        Err(_) => Err(format!(
            "the case did not finish within {} s",
            CASE_TIMEOUT.as_secs()
        )),
    }
}

/// Why a case that raised nothing still fails.
const NO_ASSERTION: &str = "the case made no assertion: check its result with t:eq, t:ok, t:match, \
     t:succeeds, t:fail_contains or t:raises";

/// A spec file's VM, the prelude's two entry points and the file's cases by name.
struct LoadedSpec {
    lua: Lua,
    /// Makes a fresh `t`.
    new_t: Function,
    /// How many assertions a `t` made.
    assertions: Function,
    cases: Vec<(String, Function)>,
}

fn load_spec(
    file: &SpecFile,
    current: &Current,
    printed: &Arc<Mutex<Vec<String>>>,
) -> Result<LoadedSpec, String> {
    let lua = new_sandbox(SPEC_LIMITS).map_err(|e| format!("{e:#}"))?;
    install_globals(&lua, printed).map_err(|e| clean_error(&e))?;
    let natives = natives(&lua, current).map_err(|e| clean_error(&e))?;
    let (new_t, assertions): (Function, Function) = lua
        .load(PRELUDE)
        .set_name("=spec-prelude")
        .set_mode(ChunkMode::Text)
        .call(natives)
        .map_err(|e| clean_error(&e))?;
    let value: LuaValue = lua
        .load(&file.code)
        .set_name(format!("@{}", file.name))
        .set_mode(ChunkMode::Text)
        .eval()
        .map_err(|e| clean_error(&e))?;
    let LuaValue::Table(table) = value else {
        return Err(format!(
            "a spec file must return a table {{[\"case name\"] = function(t) ... end}}, got {}",
            value.type_name()
        ));
    };
    let mut cases = BTreeMap::new();
    for pair in table.pairs::<LuaValue, LuaValue>() {
        let (k, v) = pair.map_err(|e| clean_error(&e))?;
        match (k, v) {
            (LuaValue::String(name), LuaValue::Function(f)) => {
                cases.insert(name.to_string_lossy(), f);
            }
            (k, v) => {
                return Err(format!(
                    "every entry must be [\"case name\"] = function(t) ... end, found {} = {}",
                    k.to_string().unwrap_or_else(|_| k.type_name().into()),
                    v.type_name()
                ));
            }
        }
    }
    Ok(LoadedSpec {
        lua,
        new_t,
        assertions,
        cases: cases.into_iter().collect(),
    })
}

/// `json` (null, array, encode, decode) and `print` (collected, shown under the case).
fn install_globals(lua: &Lua, printed: &Arc<Mutex<Vec<String>>>) -> mlua::Result<()> {
    let json = super::host::json_table(lua)?;
    lua.globals().raw_set("json", json)?;
    let printed = Arc::clone(printed);
    lua.globals().raw_set(
        "print",
        lua.create_function(move |_, args: mlua::Variadic<LuaValue>| {
            let text = args
                .iter()
                .map(|v| {
                    v.to_string()
                        .unwrap_or_else(|_| format!("<{}>", v.type_name()))
                })
                .collect::<Vec<_>>()
                .join("\t");
            printed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(text.lines().map(str::to_string));
            Ok(())
        })?,
    )?;
    Ok(())
}

mod env;
mod tunnel;

use env::*;
use tunnel::*;
