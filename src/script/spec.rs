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

// ---------------------------------------------------------------------------------------
// A case's temporary node.

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        // UNIX socket paths must stay below 108 bytes: a long TMPDIR is not used.
        let base = Some(std::env::temp_dir())
            .filter(|p| p.as_os_str().len() <= 40)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let mut last = None;
        for _ in 0..16 {
            let path = base.join(format!(
                "mtspec-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary directory name")))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct CaseEnv {
    lua: Lua,
    /// The handlers directory under test.
    dir: Option<PathBuf>,
    tmp: TempDir,
    node: Mutex<Option<Arc<Node>>>,
    /// The node's tunnel layer (with the Lua handlers), made with the node.
    layer: Mutex<Option<Arc<crate::tunnel::Tunnels>>>,
    backend: Mutex<Option<Arc<ScriptedBackend>>>,
    tunnels: Mutex<Vec<Arc<TunnelConn>>>,
    tokens: AtomicU32,
}

const NODE_KEYS: &[&str] = &["storages", "bridges", "backend", "handlers"];

impl CaseEnv {
    fn new(lua: &Lua, dir: Option<PathBuf>) -> std::io::Result<CaseEnv> {
        Ok(CaseEnv {
            lua: lua.clone(),
            dir,
            tmp: TempDir::new()?,
            node: Mutex::new(None),
            layer: Mutex::new(None),
            backend: Mutex::new(None),
            tunnels: Mutex::new(Vec::new()),
            tokens: AtomicU32::new(0),
        })
    }

    fn current_node(&self) -> Option<Arc<Node>> {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The case's node, created from `opts` (node keys) on first use.
    fn node(&self, opts: Option<&Table>) -> Result<Arc<Node>, String> {
        let given = match opts {
            Some(t) => NODE_KEYS
                .iter()
                .any(|k| !matches!(t.get::<LuaValue>(*k), Ok(LuaValue::Nil))),
            None => false,
        };
        if let Some(node) = self.current_node() {
            if given {
                return Err(format!(
                    "the case's node already exists: give {} to the first t:open or t:node",
                    NODE_KEYS.join("/")
                ));
            }
            return Ok(node);
        }
        let node = self.create_node(opts).map_err(|e| format!("{e:#}"))?;
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&node));
        let layer = crate::tunnel::Tunnels::new(
            Arc::clone(&node),
            Arc::new(crate::script::handler::lua_handler),
        );
        *self.layer.lock().unwrap_or_else(|e| e.into_inner()) = Some(layer);
        Ok(node)
    }

    /// The tunnel layer of the case's node (made by [`CaseEnv::node`]).
    fn layer(&self) -> Result<Arc<crate::tunnel::Tunnels>, String> {
        self.layer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| "the case has no node yet".to_string())
    }

    fn create_node(&self, opts: Option<&Table>) -> anyhow::Result<Arc<Node>> {
        let get = |k: &str| -> anyhow::Result<LuaValue> {
            match opts {
                Some(t) => t
                    .get(k)
                    .map_err(|e| anyhow::anyhow!("{k}: {}", clean_error(&e))),
                None => Ok(LuaValue::Nil),
            }
        };
        let data_dir = self.tmp.0.join("data");
        let run_dir = self.tmp.0.join("run");
        let storages = parse_storages(&self.lua, get("storages")?, &data_dir)?;
        let bridges = match get("bridges")? {
            LuaValue::Nil => vec!["vmbr0".to_string()],
            v => self
                .lua
                .from_value::<Vec<String>>(v)
                .map_err(|e| anyhow::anyhow!("bridges: {e}"))?,
        };
        let handlers_dir = self.handlers_dir(get("handlers")?)?;
        let file = ConfigFile {
            node: Some(SPEC_NODE.to_string()),
            data_dir: Some(data_dir),
            run_dir: Some(run_dir),
            auth_failure_delay_ms: Some(0),
            tunnel_accept_timeout_secs: Some(10),
            bridges: Some(bridges),
            handlers_dir: Some(handlers_dir),
            storage: storages,
            ..ConfigFile::default()
        };
        let cfg = NodeConfig::from_parts(file, &Overrides::default())?;
        let backend = ScriptedBackend::with_overrides(&self.lua, &get("backend")?, &cfg, "spec")?;
        self.lua
            .globals()
            .raw_set("backend", backend.helpers())
            .map_err(|e| anyhow::anyhow!("installing backend: {e}"))?;
        let node = Node::open_with(
            cfg,
            Backends {
                storage: backend.clone(),
                hypervisor: backend.clone(),
            },
        )?;
        node.tokens.create(
            FULL_AUTHID,
            Acl {
                entries: vec![AclEntry {
                    path: "/".into(),
                    privs: acl::ALL_PRIVILEGES.iter().map(|p| p.to_string()).collect(),
                    propagate: true,
                }],
            },
            None,
        )?;
        *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
        Ok(node)
    }

    /// The directory the node reads handlers from: the one under test, or a copy of it
    /// with the case's own handler sources added.
    fn handlers_dir(&self, overrides: LuaValue) -> anyhow::Result<PathBuf> {
        let overrides: BTreeMap<String, String> = match overrides {
            LuaValue::Nil => {
                return Ok(self
                    .dir
                    .clone()
                    .unwrap_or_else(|| self.tmp.0.join("no-handlers")));
            }
            v => self
                .lua
                .from_value(v)
                .map_err(|e| anyhow::anyhow!("handlers: expected {{cmd = \"lua source\"}}: {e}"))?,
        };
        let target = self.tmp.0.join("handlers");
        crate::util::ensure_dir(&target, 0o755)?;
        if let Some(dir) = &self.dir {
            for entry in std::fs::read_dir(dir)?.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.ends_with(".lua") && !name.ends_with("_spec.lua") {
                    std::fs::copy(entry.path(), target.join(name))?;
                }
            }
        }
        for (cmd, code) in overrides {
            if cmd.contains('/') || cmd.contains('.') {
                anyhow::bail!("handlers: invalid command name '{cmd}'");
            }
            std::fs::write(target.join(format!("{cmd}.lua")), code)?;
        }
        Ok(target)
    }

    /// A token with the ACL `privs` describes: a list (on `/`) or `{path = {privs}}`.
    fn token_for(&self, node: &Node, privs: LuaValue) -> Result<String, String> {
        let privs: Value = self
            .lua
            .from_value(privs)
            .map_err(|e| format!("privs: {e}"))?;
        let mut by_path: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        match privs {
            Value::Array(list) => {
                by_path.insert("/".into(), list);
            }
            Value::Object(map) => {
                for (path, list) in map {
                    match list {
                        Value::Array(list) => {
                            by_path.insert(path, list);
                        }
                        _ => return Err(format!("privs['{path}'] must be a list")),
                    }
                }
            }
            _ => return Err("privs must be a list or {path = {privileges}}".into()),
        }
        let mut entries = Vec::new();
        for (path, list) in by_path {
            let mut set = std::collections::BTreeSet::new();
            for p in list {
                let name = p.as_str().unwrap_or_default();
                let known = acl::known_privilege(name).ok_or_else(|| {
                    format!(
                        "unknown privilege '{p}' (known: {})",
                        acl::ALL_PRIVILEGES.join(", ")
                    )
                })?;
                set.insert(known.to_string());
            }
            entries.push(AclEntry {
                path,
                privs: set,
                propagate: true,
            });
        }
        let n = self.tokens.fetch_add(1, Ordering::Relaxed);
        let authid = format!("spec@pve!t{n}");
        node.tokens
            .create(&authid, Acl { entries }, None)
            .map_err(|e| format!("{e:#}"))?;
        Ok(authid)
    }

    fn backend(&self) -> Option<Arc<ScriptedBackend>> {
        self.backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes every tunnel of the case (running their cleanup) and drops the node.
    async fn teardown(&self, lua: &Lua) -> Result<(), String> {
        let tunnels = std::mem::take(&mut *self.tunnels.lock().unwrap_or_else(|e| e.into_inner()));
        let mut problems = Vec::new();
        for t in tunnels {
            if let Err(e) = t.close().await {
                problems.push(e);
            }
        }
        let _ = lua.globals().raw_set("backend", LuaValue::Nil);
        self.node.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("after the case: {}", problems.join("; ")))
        }
    }
}

fn parse_storages(
    lua: &Lua,
    value: LuaValue,
    data_dir: &Path,
) -> anyhow::Result<BTreeMap<String, StorageDef>> {
    let mut out = BTreeMap::new();
    if value.is_nil() {
        return Ok(out);
    }
    let map: serde_json::Map<String, Value> = lua
        .from_value(value)
        .map_err(|e| anyhow::anyhow!("storages: expected {{id = {{...}}}}: {e}"))?;
    for (id, def) in map {
        let mut def = match def {
            Value::Object(m) => m,
            Value::Array(a) if a.is_empty() => serde_json::Map::new(),
            _ => anyhow::bail!("storages.{id}: expected a table"),
        };
        def.entry("type").or_insert_with(|| "dir".into());
        let path = if id == "local" {
            data_dir.to_path_buf()
        } else {
            data_dir.join(format!("storage-{id}"))
        };
        def.entry("path")
            .or_insert_with(|| path.display().to_string().into());
        let def: StorageDef = serde_json::from_value(Value::Object(def))
            .map_err(|e| anyhow::anyhow!("storages.{id}: {e}"))?;
        out.insert(id, def);
    }
    Ok(out)
}

fn api_error_text(e: &crate::error::Error) -> String {
    match e {
        crate::error::Error::Param(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Tunnels as a spec sees them.

type Io = (BufReader<OwnedReadHalf>, OwnedWriteHalf);

struct TunnelConn {
    node: Arc<Node>,
    vmid: u32,
    upid: Upid,
    socket: PathBuf,
    authid: String,
    io: tokio::sync::Mutex<Option<Io>>,
}

impl TunnelConn {
    async fn roundtrip(&self, line: &str) -> Result<Value, String> {
        let mut io = self.io.lock().await;
        let Some((read, write)) = io.as_mut() else {
            return Err("the tunnel is closed".into());
        };
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        write
            .write_all(&bytes)
            .await
            .map_err(|e| format!("writing to the tunnel: {e}"))?;
        let mut reply = String::new();
        match tokio::time::timeout(REPLY_TIMEOUT, read.read_line(&mut reply)).await {
            Err(_) => Err(format!("no reply within {} s", REPLY_TIMEOUT.as_secs())),
            Ok(Err(e)) => Err(format!("reading from the tunnel: {e}")),
            Ok(Ok(0)) => Err("the tunnel closed the connection without a reply".into()),
            Ok(Ok(_)) => serde_json::from_str(reply.trim_end())
                .map_err(|e| format!("reply is not JSON ({e}): {reply}")),
        }
    }

    /// Ends the connection (EOF for the worker) and waits for the worker task to end;
    /// returns its exit status (`OK`, `mtunnel exited unexpectedly`, ...).
    async fn close(&self) -> Result<String, String> {
        drop(self.io.lock().await.take());
        let start = tokio::time::Instant::now();
        while self.node.tasks.is_running(&self.upid) {
            if start.elapsed() > CLOSE_TIMEOUT {
                return Err(format!(
                    "the worker of VM {} did not end within {} s",
                    self.vmid,
                    CLOSE_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(self
            .node
            .tasks
            .status(&self.upid)
            .and_then(|s| s.exit)
            .map(|e| e.as_text())
            .unwrap_or_else(|| "unknown".into()))
    }
}

struct SpecTunnel(Arc<TunnelConn>);

/// `true, values...` or `false, message`.
fn pack(lua: &Lua, r: Result<MultiValue, String>) -> mlua::Result<MultiValue> {
    match r {
        Ok(mut v) => {
            v.push_front(LuaValue::Boolean(true));
            Ok(v)
        }
        Err(msg) => (false, msg).into_lua_multi(lua),
    }
}

fn one(lua: &Lua, v: impl IntoLuaMulti) -> Result<MultiValue, String> {
    v.into_lua_multi(lua).map_err(|e| clean_error(&e))
}

impl UserData for SpecTunnel {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("vmid", |_, t| Ok(t.0.vmid));
        fields.add_field_method_get("upid", |_, t| Ok(t.0.upid.to_string()));
        fields.add_field_method_get("socket", |_, t| Ok(t.0.socket.display().to_string()));
        fields.add_field_method_get("authid", |_, t| Ok(t.0.authid.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method("send", |lua, this, request: LuaValue| {
            let conn = Arc::clone(&this.0);
            drop(this);
            async move {
                let r = async {
                    let request: Value = lua
                        .from_value(request)
                        .map_err(|e| format!("request is not JSON-able: {e}"))?;
                    if !request.is_object() {
                        return Err("send expects a table like {cmd = \"version\"}".to_string());
                    }
                    let reply = conn.roundtrip(&request.to_string()).await?;
                    one(&lua, lua.to_value(&reply).map_err(|e| clean_error(&e))?)
                }
                .await;
                pack(&lua, r)
            }
        });
        methods.add_async_method("send_raw", |lua, this, line: String| {
            let conn = Arc::clone(&this.0);
            drop(this);
            async move {
                let r = async {
                    let reply = conn.roundtrip(&line).await?;
                    one(&lua, lua.to_value(&reply).map_err(|e| clean_error(&e))?)
                }
                .await;
                pack(&lua, r)
            }
        });
        methods.add_async_method("close", |lua, this, ()| {
            let conn = Arc::clone(&this.0);
            drop(this);
            async move {
                let r = conn.close().await.and_then(|s| one(&lua, s));
                pack(&lua, r)
            }
        });
        methods.add_method("log", |lua, this, ()| {
            let r = match this.0.node.tasks.read_log(&this.0.upid, 0, usize::MAX) {
                Some((lines, _)) => lua
                    .create_sequence_from(lines.into_iter().map(|(_, l)| l))
                    .map_err(|e| clean_error(&e))
                    .and_then(|t| one(lua, t)),
                None => Err("no task log".into()),
            };
            pack(lua, r)
        });
        methods.add_async_method("connect", |lua, this, path: String| {
            let run_dir = this.0.node.cfg.run_dir.clone();
            drop(this);
            async move {
                // Only the node's own sockets: specs have no network access.
                let inside = Path::new(&path)
                    .components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir))
                    && Path::new(&path).starts_with(&run_dir);
                if !inside {
                    return pack(
                        &lua,
                        Err(format!(
                            "connect: only sockets in the node's run directory {} are allowed",
                            run_dir.display()
                        )),
                    );
                }
                let r = match UnixStream::connect(&path).await {
                    Ok(s) => one(&lua, SpecConn(Arc::new(tokio::sync::Mutex::new(Some(s))))),
                    Err(e) => Err(format!("connecting to {path}: {e}")),
                };
                pack(&lua, r)
            }
        });
    }
}

/// A client connection to one of the tunnel's sockets (e.g. the disk-import socket).
struct SpecConn(Arc<tokio::sync::Mutex<Option<UnixStream>>>);

impl UserData for SpecConn {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method("write", |lua, this, data: mlua::LuaString| {
            let conn = Arc::clone(&this.0);
            drop(this);
            let bytes = data.as_bytes().to_vec();
            async move {
                let mut guard = conn.lock().await;
                let r = match guard.as_mut() {
                    Some(s) => s
                        .write_all(&bytes)
                        .await
                        .map_err(|e| format!("writing: {e}"))
                        .and_then(|()| one(&lua, ())),
                    None => Err("the connection is closed".into()),
                };
                pack(&lua, r)
            }
        });
        methods.add_async_method("close", |lua, this, ()| {
            let conn = Arc::clone(&this.0);
            drop(this);
            async move {
                if let Some(mut s) = conn.lock().await.take() {
                    let _ = s.shutdown().await;
                }
                pack(&lua, Ok(MultiValue::new()))
            }
        });
    }
}

// ---------------------------------------------------------------------------------------
// The natives behind `t`.

fn add_native<F, Fut>(
    lua: &Lua,
    table: &Table,
    current: &Current,
    name: &str,
    f: F,
) -> mlua::Result<()>
where
    F: Fn(Lua, Arc<CaseEnv>, MultiValue) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<MultiValue, String>> + Send + 'static,
{
    let current = current.clone();
    let f = Arc::new(f);
    table.set(
        name,
        lua.create_async_function(move |lua, args: MultiValue| {
            let env = current.get();
            let f = Arc::clone(&f);
            async move {
                let r = match env {
                    Some(env) => f(lua.clone(), env, args).await,
                    None => Err("no spec case is running".into()),
                };
                pack(&lua, r)
            }
        })?,
    )
}

fn args<T: FromLuaMulti>(lua: &Lua, args: MultiValue) -> Result<T, String> {
    T::from_lua_multi(args, lua).map_err(|e| clean_error(&e))
}

fn check_keys(t: &Table, allowed: &[&str], what: &str) -> Result<(), String> {
    for pair in t.pairs::<LuaValue, LuaValue>() {
        let (k, _) = pair.map_err(|e| clean_error(&e))?;
        let name = k.to_string().unwrap_or_default();
        if !allowed.contains(&name.as_str()) {
            return Err(format!(
                "{what}: unknown option '{name}' (known: {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

fn natives(lua: &Lua, current: &Current) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    add_native(lua, &t, current, "node", |lua, env, a| async move {
        let opts: Option<Table> = args(&lua, a)?;
        if let Some(o) = &opts {
            check_keys(o, NODE_KEYS, "t:node")?;
        }
        env.node(opts.as_ref())?;
        Ok(MultiValue::new())
    })?;
    add_native(lua, &t, current, "open", |lua, env, a| async move {
        let opts: Option<Table> = args(&lua, a)?;
        let mut keys = vec!["vmid", "privs"];
        keys.extend_from_slice(NODE_KEYS);
        if let Some(o) = &opts {
            check_keys(o, &keys, "t:open")?;
        }
        let node = env.node(opts.as_ref())?;
        let get = |k: &str| -> Result<LuaValue, String> {
            match &opts {
                Some(o) => o.get(k).map_err(|e| clean_error(&e)),
                None => Ok(LuaValue::Nil),
            }
        };
        let vmid = match get("vmid")? {
            LuaValue::Nil => 100,
            LuaValue::Integer(n) if n > 0 && n < 1_000_000_000 => n as u32,
            other => return Err(format!("t:open: invalid vmid {other:?}")),
        };
        let authid = match get("privs")? {
            LuaValue::Nil => FULL_AUTHID.to_string(),
            privs => env.token_for(&node, privs)?,
        };
        let opened = crate::tunnel::open(&env.layer()?, &authid, vmid, &[], &[])
            .await
            .map_err(|e| api_error_text(&e))?;
        let stream = UnixStream::connect(&opened.socket)
            .await
            .map_err(|e| format!("connecting to {}: {e}", opened.socket.display()))?;
        let (read, write) = stream.into_split();
        let conn = Arc::new(TunnelConn {
            node,
            vmid,
            upid: opened.upid,
            socket: opened.socket,
            authid,
            io: tokio::sync::Mutex::new(Some((BufReader::new(read), write))),
        });
        env.tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(&conn));
        one(&lua, SpecTunnel(conn))
    })?;
    add_native(lua, &t, current, "sleep", |lua, _env, a| async move {
        let ms: u64 = args(&lua, a)?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(MultiValue::new())
    })?;
    add_native(lua, &t, current, "config", |lua, env, a| async move {
        let vmid: Option<u32> = args(&lua, a)?;
        let node = env.node(None)?;
        match node.guests.read_text(vmid.unwrap_or(100)) {
            Ok(text) => one(&lua, text),
            Err(crate::guest::GuestError::Missing { .. }) => one(&lua, LuaValue::Nil),
            Err(e) => Err(e.to_string()),
        }
    })?;
    add_native(lua, &t, current, "write_config", |lua, env, a| async move {
        let (vmid, text): (u32, String) = args(&lua, a)?;
        let node = env.node(None)?;
        let guard = node
            .guests
            .lock(vmid, crate::guest::store::DEFAULT_LOCK_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        node.guests
            .write_text_locked(&guard, &text)
            .map_err(|e| e.to_string())?;
        Ok(MultiValue::new())
    })?;
    add_native(lua, &t, current, "firewall", |lua, env, a| async move {
        let vmid: Option<u32> = args(&lua, a)?;
        let node = env.node(None)?;
        let path = node
            .cfg
            .firewall_dir()
            .join(format!("{}.fw", vmid.unwrap_or(100)));
        match std::fs::read_to_string(&path) {
            Ok(text) => one(&lua, text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => one(&lua, LuaValue::Nil),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    })?;
    add_native(lua, &t, current, "volumes", |lua, env, _a| async move {
        let list = env.backend().map(|b| b.volumes()).unwrap_or_default();
        let table = lua
            .create_sequence_from(list)
            .map_err(|e| clean_error(&e))?;
        let _ = table.set_metatable(Some(lua.array_metatable()));
        one(&lua, table)
    })?;
    add_native(lua, &t, current, "alloc", |lua, env, a| async move {
        let opts: Table = args(&lua, a)?;
        check_keys(
            &opts,
            &["storage", "vmid", "format", "size_kib", "name"],
            "t:alloc",
        )?;
        let node = env.node(None)?;
        let get_s = |k: &str| opts.get::<Option<String>>(k).map_err(|e| clean_error(&e));
        let storage = get_s("storage")?.unwrap_or_else(|| "local".into());
        let format = get_s("format")?.unwrap_or_else(|| "raw".into());
        let name = get_s("name")?;
        let vmid: u32 = opts
            .get::<Option<u32>>("vmid")
            .map_err(|e| clean_error(&e))?
            .unwrap_or(100);
        let size_kib: u64 = opts
            .get::<Option<u64>>("size_kib")
            .map_err(|e| clean_error(&e))?
            .unwrap_or(1024);
        let volid = node
            .storage
            .alloc(&storage, vmid, &format, name.as_deref(), size_kib)
            .await
            .map_err(|e| e.to_string())?;
        one(&lua, volid)
    })?;
    add_native(lua, &t, current, "run_dir", |lua, env, _a| async move {
        let node = env.node(None)?;
        one(&lua, node.cfg.run_dir.display().to_string())
    })?;
    Ok(t)
}
