//! The scripted backend: one object that is both the node's [`Storage`] and its
//! [`Hypervisor`], answering from Lua functions, for handler specs and for test harnesses
//! that rehearse failures (`mtunnel serve --backend scripted:FILE.lua`).
//!
//! The script returns a table whose optional `storage` and `hypervisor` sub-tables override
//! single functions; every function not given behaves like an in-memory fake that works end
//! to end (volumes in a table, a VM "runs" after `start_incoming`). Inside the script the
//! global `backend` offers `fail`, `sleep`, `log`, `calls`, `state`, `volumes`, `null` and
//! `default.<area>.<fn>` (the built-in behaviour, to call from an override). Reference:
//! `docs/scripted-backend.md`.
//!
//! Async calls are serialized through one `tokio::sync::Mutex`; `backend.sleep` releases it
//! while sleeping so a slow call does not freeze the others. The synchronous functions
//! (`path`, `import_formats`, `bwlimit`) run without it and must not sleep. This module
//! knows nothing of tunnels: it only implements the two backend traits.
//!
//! Files: `fake.rs` is the in-memory fake (the defaults' state and behaviour), `lua_api.rs`
//! the Lua side (the `backend` global, the defaults as Lua functions, conversions of
//! requests and replies), `impls.rs` the [`Storage`] and [`Hypervisor`] impls that route
//! each call to an override or a default. This file owns the [`ScriptedBackend`] value,
//! loading a script and the call gate.
//!
//! [`Storage`]: crate::storage::Storage
//! [`Hypervisor`]: crate::guest::hypervisor::Hypervisor

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua::chunk::ChunkMode;
use mlua::{Function, IntoLuaMulti, Lua, LuaSerdeExt, Table, Value as LuaValue};
use tokio::sync::OwnedMutexGuard;

use super::{Budget, HandlerFailure, Limits, clean_error, new_sandbox};
use crate::config::NodeConfig;
use crate::guest::hypervisor::{HvResult, IncomingStart};
use crate::storage::{ImportRequest, StorageError, StorageResult};

mod fake;
mod impls;
mod lua_api;

use fake::{Fake, ImportData};
use lua_api::{helpers, parse_overrides};

/// Storage functions a script may override.
pub const STORAGE_FNS: &[&str] = &[
    "alloc",
    "free",
    "path",
    "volume_size",
    "volume_format",
    "import",
    "import_formats",
    "check_untrusted",
    "bwlimit",
];

/// Hypervisor functions a script may override.
pub const HYPERVISOR_FNS: &[&str] = &[
    "start_incoming",
    "resume",
    "stop",
    "nbd_stop",
    "is_running",
    "fstrim",
];

/// At most this much of an import stream's payload is handed to an `import` override as a
/// string; the rest is only counted (`req.received`, `req.truncated`).
pub const IMPORT_CAPTURE_BYTES: usize = 64 << 20;

/// Limits of a backend script that owns its VM (the instruction budget is per call).
pub const BACKEND_LIMITS: Limits = Limits {
    memory_bytes: 256 << 20,
    instructions: 50_000_000,
};

/// Error type of script calls: the clean message.
fn script_err(e: &mlua::Error) -> String {
    clean_error(e)
}

fn failure(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::external(HandlerFailure(msg.into()))
}

// ---------------------------------------------------------------------------------------
// The call gate: serializes async calls; `backend.sleep` lets go of it while sleeping.

struct CallGate {
    gate: Arc<tokio::sync::Mutex<()>>,
    guard: Mutex<Option<OwnedMutexGuard<()>>>,
}

tokio::task_local! {
    static CALL_GATE: CallGate;
}

async fn backend_sleep(ms: u64) {
    let gate = CALL_GATE
        .try_with(|cg| {
            cg.guard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .map(drop)
                .map(|_| Arc::clone(&cg.gate))
        })
        .ok()
        .flatten();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    if let Some(gate) = gate {
        let guard = gate.lock_owned().await;
        let _ = CALL_GATE.try_with(|cg| {
            *cg.guard.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
        });
    }
}

/// The scripted [`Storage`](crate::storage::Storage) +
/// [`Hypervisor`](crate::guest::hypervisor::Hypervisor). See the module documentation.
pub struct ScriptedBackend {
    lua: Lua,
    origin: String,
    overrides: BTreeMap<String, Function>,
    calls: Table,
    helpers: Table,
    gate: Arc<tokio::sync::Mutex<()>>,
    fake: Arc<Fake>,
    /// Set when the backend owns its VM: the instruction budget is reset per call.
    limits: Option<Limits>,
}

impl ScriptedBackend {
    /// Loads a backend script from `path` into its own sandboxed VM. A syntax or runtime
    /// error while loading, or an unknown function name, is an error naming the file.
    pub fn load(path: &Path, cfg: &NodeConfig) -> anyhow::Result<Arc<Self>> {
        let origin = path.display().to_string();
        let code = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading backend script {origin}: {e}"))?;
        Self::from_source(&code, &origin, cfg)
    }

    /// Like [`ScriptedBackend::load`] with the script text given; `origin` names it in
    /// messages (a path, or e.g. `inline`).
    pub fn from_source(code: &str, origin: &str, cfg: &NodeConfig) -> anyhow::Result<Arc<Self>> {
        let origin = origin.to_string();
        let lua = new_sandbox(BACKEND_LIMITS)?;
        let fake = Arc::new(Fake {
            storages: cfg.storages.clone(),
            run_dir: cfg.run_dir.clone(),
            state: Mutex::default(),
        });
        let calls = lua
            .create_table()
            .map_err(|e| anyhow::anyhow!("creating backend.calls: {e}"))?;
        let helpers = helpers(&lua, &fake, &calls)
            .map_err(|e| anyhow::anyhow!("creating the backend helpers: {e}"))?;
        lua.globals()
            .raw_set("backend", helpers.clone())
            .map_err(|e| anyhow::anyhow!("installing the backend helpers: {e}"))?;
        let value: LuaValue = lua
            .load(code)
            .set_name(format!("@{origin}"))
            .set_mode(ChunkMode::Text)
            .eval()
            .map_err(|e| anyhow::anyhow!("backend script {}", clean_error(&e)))?;
        let overrides = parse_overrides(&value).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        Ok(Arc::new(ScriptedBackend {
            lua,
            origin,
            overrides,
            calls,
            helpers,
            gate: Arc::default(),
            fake,
            limits: Some(BACKEND_LIMITS),
        }))
    }

    /// A backend whose overrides are functions of an existing VM (a spec file's). The
    /// caller installs [`ScriptedBackend::helpers`] as that VM's global `backend`.
    pub fn with_overrides(
        lua: &Lua,
        overrides: &LuaValue,
        cfg: &NodeConfig,
        origin: &str,
    ) -> anyhow::Result<Arc<Self>> {
        let fake = Arc::new(Fake {
            storages: cfg.storages.clone(),
            run_dir: cfg.run_dir.clone(),
            state: Mutex::default(),
        });
        let calls = lua
            .create_table()
            .map_err(|e| anyhow::anyhow!("creating backend.calls: {e}"))?;
        let helpers = helpers(lua, &fake, &calls)
            .map_err(|e| anyhow::anyhow!("creating the backend helpers: {e}"))?;
        let overrides = parse_overrides(overrides).map_err(|e| anyhow::anyhow!("backend: {e}"))?;
        Ok(Arc::new(ScriptedBackend {
            lua: lua.clone(),
            origin: origin.to_string(),
            overrides,
            calls,
            helpers,
            gate: Arc::default(),
            fake,
            limits: None,
        }))
    }

    /// The `backend` table scripts see.
    pub fn helpers(&self) -> Table {
        self.helpers.clone()
    }

    /// Volids the built-in storage currently holds, sorted.
    pub fn volumes(&self) -> Vec<String> {
        self.fake.state().volumes.keys().cloned().collect()
    }

    /// Where the script came from (a path, or `spec`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn count(&self, key: &str) {
        let n = match self.calls.raw_get::<LuaValue>(key) {
            Ok(LuaValue::Integer(n)) => n,
            _ => 0,
        };
        let _ = self.calls.raw_set(key, n + 1);
    }

    fn reset_budget(&self) {
        if let (Some(limits), Some(budget)) = (self.limits, self.lua.app_data_ref::<Budget>()) {
            budget.reset(limits.instructions);
        }
    }

    /// Counts the call and returns the override, if any.
    fn enter(&self, key: &str) -> Option<Function> {
        self.count(key);
        self.overrides.get(key).cloned()
    }

    /// Calls an override under the gate.
    async fn call_async(
        &self,
        f: Function,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> Result<LuaValue, String> {
        let guard = Arc::clone(&self.gate).lock_owned().await;
        self.reset_budget();
        let cg = CallGate {
            gate: Arc::clone(&self.gate),
            guard: Mutex::new(Some(guard)),
        };
        CALL_GATE
            .scope(cg, async move { f.call_async::<LuaValue>(args).await })
            .await
            .map_err(|e| script_err(&e))
    }

    /// Calls an override synchronously (it must not sleep).
    fn call_sync(&self, f: &Function, args: impl IntoLuaMulti) -> Result<LuaValue, String> {
        self.reset_budget();
        f.call::<LuaValue>(args).map_err(|e| script_err(&e))
    }

    async fn storage_call(
        &self,
        f: Function,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> StorageResult<LuaValue> {
        self.call_async(f, args)
            .await
            .map_err(StorageError::Backend)
    }

    async fn hv_call(
        &self,
        f: Function,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> HvResult<LuaValue> {
        self.call_async(f, args)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn import_request(
        &self,
        req: &ImportRequest,
        data: &ImportData,
        truncated: bool,
    ) -> mlua::Result<Table> {
        let t = self.lua.create_table()?;
        t.set("storage", req.storage.as_str())?;
        t.set("vmid", req.vmid)?;
        t.set("volname", req.volname.as_str())?;
        t.set("format", req.format.as_str())?;
        t.set("stream_format", req.stream_format.as_str())?;
        t.set("allow_rename", req.allow_rename)?;
        t.set("size", data.size)?;
        t.set("received", data.received)?;
        t.set("truncated", truncated)?;
        Ok(t)
    }

    fn start_request(&self, req: &IncomingStart) -> mlua::Result<Table> {
        let t = self.lua.create_table()?;
        t.set("vmid", req.vmid)?;
        t.set(
            "config",
            self.lua
                .to_value(&super::host::config_to_json(&req.config))?,
        )?;
        t.set("machine", req.machine.as_deref())?;
        t.set("cpu", req.cpu.as_deref())?;
        let nbd = self.lua.create_table()?;
        for (k, v) in &req.nbd {
            nbd.set(k.as_str(), v.as_str())?;
        }
        t.set("nbd", nbd)?;
        Ok(t)
    }
}

/// Parses the `--backend` value: `real` (`None`) or `scripted:FILE.lua`.
pub fn parse_backend_arg(arg: &str) -> Result<Option<PathBuf>, String> {
    match arg {
        "real" => Ok(None),
        _ => match arg.strip_prefix("scripted:") {
            Some(path) if !path.is_empty() => Ok(Some(PathBuf::from(path))),
            _ => Err(format!(
                "invalid backend '{arg}': expected 'real' or 'scripted:FILE.lua'"
            )),
        },
    }
}

#[cfg(test)]
mod tests;
