//! The Lua engine behind every tunnel command. Each tunnel gets its own sandboxed Lua VM
//! (no `io`, `os`, `load`, `require`, `dofile`, no coroutines; text chunks only) with a
//! memory limit and an instruction budget per command, the handler files loaded fresh
//! from the built-in set and the admin's handlers directory, and the host API `pve.*`.
//!
//! - [`schema`]: reads the `params` tables handlers declare into [`crate::schema`].
//! - [`host`]: the `pve.*` functions (one file per table) and the per-tunnel host context.
//! - [`handler`]: the [`crate::command::CommandHandler`] that runs Lua handlers.
//! - [`scripted`]: a storage + hypervisor backend answered by a Lua file (tests, harnesses).
//! - [`spec`]: the runner of `*_spec.lua` handler specs (`mtunnel handlers test`).

pub mod handler;
pub mod host;
pub mod schema;
pub mod scripted;
pub mod spec;

/// The tunnel journal moved to [`crate::journal`]; this path stays for the CLI.
pub use crate::journal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value as LuaValue, VmState};

use schema::Prop;

/// Per-VM resource limits (a node setting, owned by [`crate::config`]).
pub use crate::config::LuaLimits as Limits;

/// How often the instruction hook runs.
const HOOK_EVERY: u32 = 10_000;

/// The text of one handler file.
#[derive(Debug, Clone)]
pub struct HandlerSource {
    /// Wire command name (`disk-import`).
    pub cmd: String,
    /// Where it came from, for messages (`built-in:disk.lua` or a path).
    pub origin: String,
    pub code: String,
}

// `BUILTIN_HANDLERS` and `BUILTIN_SPECS`: the one list of built-in commands, written by
// build.rs from the files in `handlers/`.
include!(concat!(env!("OUT_DIR"), "/builtin.rs"));

/// The handler set for a new tunnel: built-ins, overridden (and extended) file by file by
/// `*.lua` files in `dir` (`*_spec.lua` are tests, not handlers). Read fresh on every call.
pub fn handler_sources(dir: Option<&Path>) -> (Vec<HandlerSource>, Vec<String>) {
    let mut by_cmd: BTreeMap<String, HandlerSource> = BUILTIN_HANDLERS
        .iter()
        .map(|(cmd, code)| {
            (
                cmd.to_string(),
                HandlerSource {
                    cmd: cmd.to_string(),
                    origin: format!("built-in:{cmd}.lua"),
                    code: code.to_string(),
                },
            )
        })
        .collect();
    let mut problems = Vec::new();
    if let Some(dir) = dir
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(cmd) = name.strip_suffix(".lua") else {
                continue;
            };
            if cmd.ends_with("_spec") || !is_command_name(cmd) {
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(code) => {
                    by_cmd.insert(
                        cmd.to_string(),
                        HandlerSource {
                            cmd: cmd.to_string(),
                            origin: path.display().to_string(),
                            code,
                        },
                    );
                }
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
    }
    (by_cmd.into_values().collect(), problems)
}

/// The recipes of a cookbook directory such as `examples/handlers/`: a directory with no
/// `*.lua` file of its own whose subdirectories each hold one set of handler overrides and
/// specs. `None` for a plain handlers directory (or one that cannot be read: the callers
/// report that). Sorted by name; subdirectories without a `*.lua` file are not recipes.
pub fn recipe_dirs(dir: &Path) -> Option<Vec<PathBuf>> {
    let has_lua = |d: &Path| {
        std::fs::read_dir(d).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().is_file() && e.path().extension().is_some_and(|x| x == "lua"))
        })
    };
    let mut recipes = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if has_lua(&path) {
                recipes.push(path);
            }
        } else if path.extension().is_some_and(|x| x == "lua") {
            return None;
        }
    }
    recipes.sort();
    (!recipes.is_empty()).then_some(recipes)
}

fn is_command_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A loaded handler.
pub struct Handler {
    pub description: String,
    /// `None`: the command takes no parameters and silently discards any (upstream's
    /// `version`, `fstrim`, ...).
    pub params: Option<BTreeMap<String, Prop>>,
    /// Run under the VM's config lock (default true).
    pub lock: bool,
    pub run: Function,
    pub origin: String,
}

/// Error raised by `pve.fail` and by host functions: reaches the reply without Lua noise.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HandlerFailure(pub String);

/// The instruction budget of the current command (app data of the VM).
pub struct Budget(AtomicI64);

impl Budget {
    pub fn reset(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn exhausted(&self) -> bool {
        self.0.load(Ordering::Relaxed) <= 0
    }
}

/// Message of a budget overrun; also used to re-raise it past `pcall`.
pub const BUDGET_MSG: &str = "handler exceeded its instruction limit (runaway loop?)";

/// A sandboxed Lua VM with its handlers.
pub struct ScriptVm {
    pub lua: Lua,
    pub handlers: BTreeMap<String, Result<Handler, String>>,
    pub limits: Limits,
}

impl ScriptVm {
    /// Builds the sandbox, registers `pve.*` and loads every handler. A handler that fails
    /// to load is kept as an error (its command then answers with that error).
    pub fn new(limits: Limits, sources: &[HandlerSource]) -> anyhow::Result<ScriptVm> {
        let lua = new_sandbox(limits)?;
        host::register(&lua)?;
        // mlua opens `coroutine` for its async support; handlers get no coroutines.
        lua.globals()
            .raw_set("coroutine", LuaValue::Nil)
            .map_err(|e| anyhow::anyhow!("sandboxing Lua: {e}"))?;
        let mut handlers = BTreeMap::new();
        for src in sources {
            let loaded = load_handler(&lua, limits, src);
            if let Err(e) = &loaded {
                tracing::warn!(cmd = %src.cmd, "handler refused: {e}");
            }
            handlers.insert(src.cmd.clone(), loaded);
        }
        Ok(ScriptVm {
            lua,
            handlers,
            limits,
        })
    }
}

/// A Lua state with only safe libraries, limits and the budget hook.
pub fn new_sandbox(limits: Limits) -> anyhow::Result<Lua> {
    let lua = Lua::new_with(
        StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
        // Reuse the coroutine of an async handler call instead of making one per command.
        LuaOptions::new().thread_pool_size(2),
    )
    .map_err(|e| anyhow::anyhow!("creating Lua state: {e}"))?;
    lua.set_memory_limit(limits.memory_bytes)
        .map_err(|e| anyhow::anyhow!("setting Lua memory limit: {e}"))?;
    let globals = lua.globals();
    for name in ["dofile", "loadfile", "load", "require", "collectgarbage"] {
        globals
            .raw_set(name, LuaValue::Nil)
            .map_err(|e| anyhow::anyhow!("sandboxing Lua: {e}"))?;
    }
    if let Ok(string) = globals.get::<Table>("string") {
        let _ = string.raw_set("dump", LuaValue::Nil);
    }
    lua.set_app_data(Budget(AtomicI64::new(limits.instructions)));
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        |lua, _| {
            if let Some(budget) = lua.app_data_ref::<Budget>() {
                let left = budget.0.fetch_sub(HOOK_EVERY as i64, Ordering::Relaxed);
                if left <= HOOK_EVERY as i64 {
                    return Err(mlua::Error::external(HandlerFailure(BUDGET_MSG.into())));
                }
            }
            Ok(VmState::Continue)
        },
    )
    .map_err(|e| anyhow::anyhow!("setting Lua hook: {e}"))?;
    // `pcall` must not swallow an exhausted budget, or `while true do pcall(f) end` would
    // run forever. The wrapper is Lua, so host functions that wait stay yieldable in it.
    globals
        .raw_set(
            "__budget_exhausted",
            lua.create_function(|lua, ()| {
                Ok(lua.app_data_ref::<Budget>().is_some_and(|b| b.exhausted()))
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    lua.load(PCALL_WRAPPER)
        .set_name("=sandbox")
        .exec()
        .map_err(|e| anyhow::anyhow!("sandboxing pcall: {e}"))?;
    Ok(lua)
}

const PCALL_WRAPPER: &str = r#"
local raw_pcall, raw_xpcall, exhausted = pcall, xpcall, __budget_exhausted
local pack, unpack, err = table.pack, table.unpack, error
__budget_exhausted = nil
local msg = "handler exceeded its instruction limit (runaway loop?)"
local function checked(r)
  if exhausted() then err(msg, 0) end
  return unpack(r, 1, r.n)
end
pcall = function(...) return checked(pack(raw_pcall(...))) end
xpcall = function(...) return checked(pack(raw_xpcall(...))) end
rawset = nil
"#;

fn load_handler(lua: &Lua, limits: Limits, src: &HandlerSource) -> Result<Handler, String> {
    if let Some(b) = lua.app_data_ref::<Budget>() {
        b.reset(limits.instructions);
    }
    let value: LuaValue = lua
        .load(&src.code)
        .set_name(format!("@{}", src.origin))
        .set_mode(ChunkMode::Text)
        .eval()
        .map_err(|e| clean_error(&e))?;
    let LuaValue::Table(table) = value else {
        return Err(format!(
            "{}: must return a table {{description, params, run}}",
            src.origin
        ));
    };
    let field_err = |what: &str| format!("{}: {what}", src.origin);
    let description = match table.get::<LuaValue>("description") {
        Ok(LuaValue::String(s)) => s.to_string_lossy(),
        _ => return Err(field_err("'description' must be a string")),
    };
    let run = match table.get::<LuaValue>("run") {
        Ok(LuaValue::Function(f)) => f,
        _ => return Err(field_err("'run' must be a function")),
    };
    let params = match table.get::<LuaValue>("params") {
        Ok(LuaValue::Table(t)) => {
            Some(schema::properties_from_lua("", &t).map_err(|e| field_err(&e.to_string()))?)
        }
        Ok(LuaValue::Boolean(false)) => None,
        _ => {
            return Err(field_err(
                "'params' must be a schema table (or false for a command that ignores parameters)",
            ));
        }
    };
    let lock = match table.get::<LuaValue>("lock") {
        Ok(LuaValue::Nil) => true,
        Ok(LuaValue::Boolean(b)) => b,
        _ => return Err(field_err("'lock' must be a boolean")),
    };
    for pair in table.pairs::<String, LuaValue>() {
        let (key, _) = pair.map_err(|e| field_err(&e.to_string()))?;
        if !["description", "params", "run", "lock"].contains(&key.as_str()) {
            return Err(field_err(&format!("unknown field '{key}'")));
        }
    }
    Ok(Handler {
        description,
        params,
        lock,
        run,
        origin: src.origin.clone(),
    })
}

/// The message an operator should see for a Lua error: a `pve.fail`/host failure verbatim,
/// a Lua runtime error with its location but without the traceback.
pub fn clean_error(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => clean_error(cause),
        mlua::Error::WithContext { cause, .. } => clean_error(cause),
        mlua::Error::ExternalError(inner) => match inner.downcast_ref::<HandlerFailure>() {
            Some(f) => f.0.clone(),
            None => inner.to_string(),
        },
        mlua::Error::RuntimeError(msg) | mlua::Error::SyntaxError { message: msg, .. } => msg
            .split("\nstack traceback:")
            .next()
            .unwrap_or(msg)
            .to_string(),
        mlua::Error::MemoryError(_) => {
            "handler ran out of memory (Lua memory limit reached)".into()
        }
        other => other
            .to_string()
            .split("\nstack traceback:")
            .next()
            .unwrap_or("")
            .to_string(),
    }
}

/// Loads every handler of `dir` (plus built-ins) and reports problems: for
/// `mtunnel handlers check`.
pub fn check_handlers(dir: Option<&Path>) -> anyhow::Result<Vec<(String, Result<String, String>)>> {
    let (sources, problems) = handler_sources(dir);
    let vm = ScriptVm::new(Limits::default(), &sources)?;
    let mut out: Vec<(String, Result<String, String>)> = problems
        .into_iter()
        .map(|p| ("?".to_string(), Err(p)))
        .collect();
    for (cmd, handler) in &vm.handlers {
        out.push((
            cmd.clone(),
            handler
                .as_ref()
                .map(|h| format!("{} ({})", h.description, h.origin))
                .map_err(Clone::clone),
        ));
    }
    Ok(out)
}
