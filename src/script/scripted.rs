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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mlua::chunk::ChunkMode;
use mlua::{Function, IntoLuaMulti, Lua, LuaSerdeExt, Table, Value as LuaValue};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::OwnedMutexGuard;

use super::{Budget, HandlerFailure, Limits, clean_error, new_sandbox};
use crate::config::NodeConfig;
use crate::guest::hypervisor::{HvResult, Hypervisor, IncomingStart, IncomingStarted};
use crate::storage::{
    ImageFormat, ImportRequest, Storage, StorageDef, StorageError, StorageResult, VolumeId,
    image_file_name,
};

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

/// Highest disk number the fake hands out per VM and storage.
const MAX_DISKS: u32 = 1024;

/// Error type of script calls: the clean message.
fn script_err(e: &mlua::Error) -> String {
    clean_error(e)
}

fn failure(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::external(HandlerFailure(msg.into()))
}

// ---------------------------------------------------------------------------------------
// The in-memory fake (the defaults).

#[derive(Debug, Clone)]
struct FakeVolume {
    format: String,
    /// Virtual size in bytes.
    size: u64,
}

#[derive(Default)]
struct FakeState {
    volumes: BTreeMap<String, FakeVolume>,
    running: BTreeSet<u32>,
}

/// What the default `import` needs besides the request.
struct ImportData {
    /// The `*+size` header, `None` if the stream ended before 8 bytes.
    size: Option<u64>,
    /// Payload bytes after the header.
    received: u64,
}

/// Volumes in a table, VMs as a set of running VMIDs; errors worded like the real backends.
struct Fake {
    storages: BTreeMap<String, StorageDef>,
    run_dir: PathBuf,
    state: Mutex<FakeState>,
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lookup(&self, id: &str) -> StorageResult<&StorageDef> {
        crate::storage::lookup_def(&self.storages, id)
    }

    fn usable(&self, id: &str) -> StorageResult<&StorageDef> {
        crate::storage::usable_def(&self.storages, id)
    }

    fn resolve(&self, volid: &str) -> StorageResult<(VolumeId, PathBuf)> {
        let vol = VolumeId::parse(volid)?;
        let def = self.lookup(&vol.storage)?;
        let path = def
            .path
            .join("images")
            .join(vol.vmid.to_string())
            .join(&vol.name);
        Ok((vol, path))
    }

    fn not_found(&self, volid: &str) -> StorageError {
        match self.resolve(volid) {
            Ok((_, path)) => StorageError::NotFound {
                volid: volid.to_string(),
                path,
            },
            Err(e) => e,
        }
    }

    fn free_name(
        &self,
        state: &FakeState,
        storage: &str,
        vmid: u32,
        fmt: ImageFormat,
    ) -> StorageResult<String> {
        let prefix = format!("{storage}:{vmid}/");
        let used: BTreeSet<u32> = state
            .volumes
            .keys()
            .filter_map(|v| v.strip_prefix(&prefix))
            .filter_map(|name| {
                let rest = name
                    .strip_prefix(&format!("vm-{vmid}-disk-"))
                    .or_else(|| name.strip_prefix(&format!("base-{vmid}-disk-")))?;
                rest.split('.').next()?.parse().ok()
            })
            .collect();
        (0..MAX_DISKS)
            .find(|n| !used.contains(n))
            .map(|n| format!("vm-{vmid}-disk-{n}.{fmt}"))
            .ok_or_else(|| StorageError::NoFreeName {
                vmid,
                storage: storage.to_string(),
            })
    }

    fn alloc(
        &self,
        storage: &str,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> StorageResult<String> {
        let def = self.usable(storage)?;
        let fmt = ImageFormat::parse(format, def.kind)?;
        let mut state = self.state();
        let name = match name {
            Some(name) => {
                let name = crate::storage::alloc_file_name(name, vmid, fmt)?;
                let volid = format!("{storage}:{vmid}/{name}");
                if state.volumes.contains_key(&volid) {
                    return Err(StorageError::Exists {
                        path: self.resolve(&volid)?.1,
                    });
                }
                name
            }
            None => self.free_name(&state, storage, vmid, fmt)?,
        };
        let volid = format!("{storage}:{vmid}/{name}");
        state.volumes.insert(
            volid.clone(),
            FakeVolume {
                format: fmt.as_str().to_string(),
                size: size_kib.saturating_mul(1024),
            },
        );
        Ok(volid)
    }

    fn free(&self, volid: &str) -> StorageResult<()> {
        self.resolve(volid)?;
        match self.state().volumes.remove(volid) {
            Some(_) => Ok(()),
            None => Err(self.not_found(volid)),
        }
    }

    fn volume(&self, volid: &str) -> StorageResult<FakeVolume> {
        self.resolve(volid)?;
        let found = self.state().volumes.get(volid).cloned();
        found.ok_or_else(|| self.not_found(volid))
    }

    fn import_formats(&self, storage: &str, format: &str) -> StorageResult<Vec<String>> {
        let def = self.usable(storage)?;
        let fmt = ImageFormat::parse(format, def.kind)?;
        Ok(vec![fmt.stream_format().to_string()])
    }

    fn import(&self, req: &ImportRequest, data: &ImportData) -> StorageResult<String> {
        let def = self.usable(&req.storage)?;
        let fmt = ImageFormat::parse(&req.format, def.kind)?;
        if req.stream_format != fmt.stream_format() {
            return Err(StorageError::NoMatchingFormat {
                storage: req.storage.clone(),
            });
        }
        let name = image_file_name(&req.volname, req.vmid, fmt)?;
        let size = data.size.ok_or(StorageError::MissingSizeHeader)?;
        let mut state = self.state();
        let mut volid = format!("{}:{}/{name}", req.storage, req.vmid);
        if state.volumes.contains_key(&volid) {
            if !req.allow_rename {
                return Err(StorageError::Exists {
                    path: self.resolve(&volid)?.1,
                });
            }
            let name = self.free_name(&state, &req.storage, req.vmid, fmt)?;
            volid = format!("{}:{}/{name}", req.storage, req.vmid);
        }
        if fmt == ImageFormat::Raw && data.received != size {
            let path = self.resolve(&volid)?.1;
            return Err(if data.received < size {
                StorageError::ShortStream {
                    path,
                    got: data.received,
                    expected: size,
                }
            } else {
                StorageError::LongStream {
                    path,
                    expected: size,
                }
            });
        }
        state.volumes.insert(
            volid.clone(),
            FakeVolume {
                format: fmt.as_str().to_string(),
                size,
            },
        );
        Ok(volid)
    }

    fn start_incoming(
        &self,
        vmid: u32,
        nbd: &BTreeMap<String, String>,
    ) -> HvResult<IncomingStarted> {
        let mut state = self.state();
        if state.running.contains(&vmid) {
            anyhow::bail!("VM {vmid} already running");
        }
        let migrate_socket = self.run_dir.join(format!("{vmid}.migrate"));
        let (nbd_socket, nbd_uris) = if nbd.is_empty() {
            (None, BTreeMap::new())
        } else {
            let socket = self.run_dir.join(format!("{vmid}_nbd.migrate"));
            let uris = nbd
                .keys()
                .map(|key| {
                    (
                        key.clone(),
                        format!("nbd:unix:{}:exportname=drive-{key}", socket.display()),
                    )
                })
                .collect();
            (Some(socket), uris)
        };
        state.running.insert(vmid);
        Ok(IncomingStarted {
            migrate_socket,
            nbd_socket,
            nbd_uris,
        })
    }

    fn require_running(&self, vmid: u32) -> HvResult<()> {
        if self.state().running.contains(&vmid) {
            Ok(())
        } else {
            anyhow::bail!("VM {vmid} not running")
        }
    }

    fn stop(&self, vmid: u32) {
        self.state().running.remove(&vmid);
    }

    fn is_running(&self, vmid: u32) -> bool {
        self.state().running.contains(&vmid)
    }
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

// ---------------------------------------------------------------------------------------
// The backend.

/// The scripted [`Storage`] + [`Hypervisor`]. See the module documentation.
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

fn parse_overrides(value: &LuaValue) -> Result<BTreeMap<String, Function>, String> {
    let mut out = BTreeMap::new();
    let table = match value {
        LuaValue::Nil => return Ok(out),
        LuaValue::Table(t) => t,
        other => {
            return Err(format!(
                "must return a table {{storage = {{...}}, hypervisor = {{...}}}}, got {}",
                other.type_name()
            ));
        }
    };
    for pair in table.pairs::<LuaValue, LuaValue>() {
        let (key, value) = pair.map_err(|e| clean_error(&e))?;
        let area = match &key {
            LuaValue::String(s) => s.to_string_lossy(),
            other => return Err(format!("unexpected key of type {}", other.type_name())),
        };
        let known: &[&str] = match area.as_str() {
            "storage" => STORAGE_FNS,
            "hypervisor" => HYPERVISOR_FNS,
            _ => {
                return Err(format!(
                    "unknown key '{area}' (expected 'storage' and/or 'hypervisor')"
                ));
            }
        };
        let fns = match value {
            LuaValue::Table(t) => t,
            LuaValue::Nil => continue,
            other => {
                return Err(format!(
                    "'{area}' must be a table, got {}",
                    other.type_name()
                ));
            }
        };
        for pair in fns.pairs::<LuaValue, LuaValue>() {
            let (name, f) = pair.map_err(|e| clean_error(&e))?;
            let name = match &name {
                LuaValue::String(s) => s.to_string_lossy(),
                other => {
                    return Err(format!(
                        "'{area}': unexpected key of type {}",
                        other.type_name()
                    ));
                }
            };
            if !known.contains(&name.as_str()) {
                return Err(format!(
                    "unknown function '{area}.{name}' (known: {})",
                    known.join(", ")
                ));
            }
            match f {
                LuaValue::Function(f) => {
                    out.insert(format!("{area}.{name}"), f);
                }
                other => {
                    return Err(format!(
                        "'{area}.{name}' must be a function, got {}",
                        other.type_name()
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// The global `backend` table.
fn helpers(lua: &Lua, fake: &Arc<Fake>, calls: &Table) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "fail",
        lua.create_function(|_, msg: LuaValue| -> mlua::Result<()> {
            Err(failure(match msg {
                LuaValue::String(s) => s.to_string_lossy(),
                other => other.to_string().unwrap_or_else(|_| "error".into()),
            }))
        })?,
    )?;
    t.set(
        "sleep",
        lua.create_async_function(|_, ms: u64| async move {
            backend_sleep(ms).await;
            Ok(())
        })?,
    )?;
    t.set(
        "log",
        lua.create_function(|_, msg: LuaValue| {
            let text = msg.to_string().unwrap_or_else(|_| "?".into());
            tracing::info!(target: "mtunnel::backend", "{text}");
            Ok(())
        })?,
    )?;
    t.set("calls", calls.clone())?;
    t.set("state", lua.create_table()?)?;
    t.set("null", lua.null())?;
    let f = Arc::clone(fake);
    t.set(
        "volumes",
        lua.create_function(move |lua, ()| {
            let list = lua.create_sequence_from(f.state().volumes.keys().cloned())?;
            list.set_metatable(Some(lua.array_metatable()))?;
            Ok(list)
        })?,
    )?;
    let default = lua.create_table()?;
    default.set("storage", default_storage(lua, fake)?)?;
    default.set("hypervisor", default_hypervisor(lua, fake)?)?;
    t.set("default", default)?;
    Ok(t)
}

fn serr(e: StorageError) -> mlua::Error {
    failure(e.to_string())
}

fn herr(e: anyhow::Error) -> mlua::Error {
    failure(format!("{e:#}"))
}

fn default_storage(lua: &Lua, fake: &Arc<Fake>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let f = Arc::clone(fake);
    t.set(
        "alloc",
        lua.create_function(
            move |_,
                  (storage, vmid, format, name, size_kib): (
                String,
                u32,
                String,
                Option<String>,
                u64,
            )| {
                f.alloc(&storage, vmid, &format, name.as_deref(), size_kib)
                    .map_err(serr)
            },
        )?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "free",
        lua.create_function(move |_, volid: String| f.free(&volid).map_err(serr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "path",
        lua.create_function(move |_, volid: String| {
            f.resolve(&volid)
                .map(|(_, p)| p.display().to_string())
                .map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "volume_size",
        lua.create_function(move |_, volid: String| {
            f.volume(&volid).map(|v| v.size).map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "volume_format",
        lua.create_function(move |_, volid: String| {
            f.volume(&volid).map(|v| v.format).map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "import",
        lua.create_function(move |_, (req, _data): (Table, LuaValue)| {
            let get = |k: &str| -> mlua::Result<String> {
                req.get::<Option<String>>(k)?
                    .ok_or_else(|| failure(format!("import: req.{k} missing")))
            };
            let request = ImportRequest {
                storage: get("storage")?,
                vmid: req.get("vmid")?,
                volname: get("volname")?,
                format: get("format")?,
                stream_format: get("stream_format")?,
                allow_rename: req.get::<Option<bool>>("allow_rename")?.unwrap_or(false),
            };
            let data = ImportData {
                size: req.get("size")?,
                received: req.get::<Option<u64>>("received")?.unwrap_or(0),
            };
            f.import(&request, &data).map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "import_formats",
        lua.create_function(move |lua, (storage, format): (String, String)| {
            let list = f.import_formats(&storage, &format).map_err(serr)?;
            lua.create_sequence_from(list)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "check_untrusted",
        lua.create_function(move |_, volid: String| f.volume(&volid).map(drop).map_err(serr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "bwlimit",
        lua.create_function(
            move |_,
                  (operation, storages, override_kib): (
                String,
                Option<Vec<String>>,
                Option<u64>,
            )| {
                let storages: Vec<Option<String>> =
                    storages.unwrap_or_default().into_iter().map(Some).collect();
                Ok(crate::storage::bwlimit_from_defs(
                    |id| f.storages.get(id),
                    &operation,
                    &storages,
                    override_kib,
                ))
            },
        )?,
    )?;
    Ok(t)
}

fn default_hypervisor(lua: &Lua, fake: &Arc<Fake>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let f = Arc::clone(fake);
    t.set(
        "start_incoming",
        lua.create_function(move |lua, req: Table| {
            let vmid: u32 = req.get("vmid")?;
            let mut nbd = BTreeMap::new();
            if let Some(t) = req.get::<Option<Table>>("nbd")? {
                for pair in t.pairs::<String, String>() {
                    let (k, v) = pair?;
                    nbd.insert(k, v);
                }
            }
            let started = f.start_incoming(vmid, &nbd).map_err(herr)?;
            started_to_lua(lua, &started)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "resume",
        lua.create_function(move |_, vmid: u32| f.require_running(vmid).map_err(herr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "stop",
        lua.create_function(move |_, vmid: u32| {
            f.stop(vmid);
            Ok(())
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "nbd_stop",
        lua.create_function(move |_, vmid: u32| f.require_running(vmid).map_err(herr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "is_running",
        lua.create_function(move |_, vmid: u32| Ok(f.is_running(vmid)))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "fstrim",
        lua.create_function(move |_, vmid: u32| f.require_running(vmid).map_err(herr))?,
    )?;
    Ok(t)
}

fn started_to_lua(lua: &Lua, s: &IncomingStarted) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("migrate_socket", s.migrate_socket.display().to_string())?;
    t.set(
        "nbd_socket",
        s.nbd_socket.as_ref().map(|p| p.display().to_string()),
    )?;
    let uris = lua.create_table()?;
    for (k, v) in &s.nbd_uris {
        uris.set(k.as_str(), v.as_str())?;
    }
    t.set("nbd_uris", uris)?;
    Ok(t)
}

fn started_from_lua(v: LuaValue) -> Result<IncomingStarted, String> {
    let LuaValue::Table(t) = v else {
        return Err(format!(
            "hypervisor.start_incoming must return a table {{migrate_socket, nbd_socket, nbd_uris}}, got {}",
            v.type_name()
        ));
    };
    let bad = |e: mlua::Error| format!("hypervisor.start_incoming returned {}", clean_error(&e));
    let migrate_socket: String = t
        .get::<Option<String>>("migrate_socket")
        .map_err(bad)?
        .ok_or("hypervisor.start_incoming must return a 'migrate_socket'")?;
    let nbd_socket: Option<String> = t.get("nbd_socket").map_err(bad)?;
    let mut nbd_uris = BTreeMap::new();
    if let Some(uris) = t.get::<Option<Table>>("nbd_uris").map_err(bad)? {
        for pair in uris.pairs::<String, String>() {
            let (k, v) = pair.map_err(bad)?;
            nbd_uris.insert(k, v);
        }
    }
    Ok(IncomingStarted {
        migrate_socket: PathBuf::from(migrate_socket),
        nbd_socket: nbd_socket.map(PathBuf::from),
        nbd_uris,
    })
}

fn expect_string(key: &str, v: LuaValue) -> Result<String, String> {
    match v {
        LuaValue::String(s) => Ok(s.to_string_lossy()),
        other => Err(format!(
            "{key} must return a string, got {}",
            other.type_name()
        )),
    }
}

fn expect_u64(key: &str, v: LuaValue) -> Result<u64, String> {
    match v {
        LuaValue::Integer(n) if n >= 0 => Ok(n as u64),
        LuaValue::Number(n) if n >= 0.0 && n.fract() == 0.0 => Ok(n as u64),
        other => Err(format!(
            "{key} must return a non-negative integer, got {}",
            other
                .to_string()
                .unwrap_or_else(|_| other.type_name().to_string())
        )),
    }
}

/// Reads a `*+size` stream: the header (if complete), then the payload to EOF, keeping at
/// most `capture` bytes of it.
async fn read_stream(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    capture: usize,
) -> StorageResult<(ImportData, Vec<u8>)> {
    let io_err = |e| StorageError::io("reading the import stream", e);
    let mut header = [0u8; 8];
    let mut got = 0;
    while got < header.len() {
        let n = reader.read(&mut header[got..]).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < header.len() {
        return Ok((
            ImportData {
                size: None,
                received: 0,
            },
            Vec::new(),
        ));
    }
    let mut kept = Vec::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        received += n as u64;
        let room = capture.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    Ok((
        ImportData {
            size: Some(u64::from_le_bytes(header)),
            received,
        },
        kept,
    ))
}

impl Storage for ScriptedBackend {
    fn storage_ids(&self) -> Vec<String> {
        self.fake.storages.keys().cloned().collect()
    }

    fn def(&self, id: &str) -> Option<&StorageDef> {
        self.fake.storages.get(id)
    }

    fn alloc<'a>(
        &'a self,
        storage: &'a str,
        vmid: u32,
        format: &'a str,
        name: Option<&'a str>,
        size_kib: u64,
    ) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.alloc") else {
                return self.fake.alloc(storage, vmid, format, name, size_kib);
            };
            let args = (
                storage.to_string(),
                vmid,
                format.to_string(),
                name.map(str::to_string),
                size_kib,
            );
            let v = self.storage_call(f, args).await?;
            expect_string("storage.alloc", v).map_err(StorageError::Backend)
        })
    }

    fn free<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.free") else {
                return self.fake.free(volid);
            };
            self.storage_call(f, volid.to_string()).await.map(drop)
        })
    }

    fn path(&self, volid: &str) -> StorageResult<PathBuf> {
        let Some(f) = self.enter("storage.path") else {
            return self.fake.resolve(volid).map(|(_, p)| p);
        };
        self.call_sync(&f, volid)
            .and_then(|v| expect_string("storage.path", v))
            .map(PathBuf::from)
            .map_err(StorageError::Backend)
    }

    fn volume_format<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.volume_format") else {
                return self.fake.volume(volid).map(|v| v.format);
            };
            let v = self.storage_call(f, volid.to_string()).await?;
            expect_string("storage.volume_format", v).map_err(StorageError::Backend)
        })
    }

    fn volume_size<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<u64>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.volume_size") else {
                return self.fake.volume(volid).map(|v| v.size);
            };
            let v = self.storage_call(f, volid.to_string()).await?;
            expect_u64("storage.volume_size", v).map_err(StorageError::Backend)
        })
    }

    fn import_formats(&self, storage: &str, format: &str) -> StorageResult<Vec<String>> {
        let Some(f) = self.enter("storage.import_formats") else {
            return self.fake.import_formats(storage, format);
        };
        let v = self
            .call_sync(&f, (storage, format))
            .map_err(StorageError::Backend)?;
        match v {
            LuaValue::String(s) => Ok(vec![s.to_string_lossy()]),
            LuaValue::Table(t) => t
                .sequence_values::<String>()
                .collect::<mlua::Result<Vec<_>>>()
                .map_err(|e| {
                    StorageError::Backend(format!(
                        "storage.import_formats must return a list of strings: {}",
                        clean_error(&e)
                    ))
                }),
            other => Err(StorageError::Backend(format!(
                "storage.import_formats must return a list of strings, got {}",
                other.type_name()
            ))),
        }
    }

    fn import<'a>(
        &'a self,
        req: ImportRequest,
        mut reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(async move {
            let f = self.enter("storage.import");
            let capture = if f.is_some() { IMPORT_CAPTURE_BYTES } else { 0 };
            let (data, kept) = read_stream(&mut *reader, capture).await?;
            drop(reader);
            let Some(f) = f else {
                return self.fake.import(&req, &data);
            };
            let truncated = (kept.len() as u64) < data.received;
            let args = self
                .import_request(&req, &data, truncated)
                .and_then(|t| Ok((t, self.lua.create_string(&kept)?)))
                .map_err(|e| StorageError::Backend(clean_error(&e)))?;
            drop(kept);
            let v = self.storage_call(f, args).await?;
            expect_string("storage.import", v).map_err(StorageError::Backend)
        })
    }

    fn check_untrusted<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("storage.check_untrusted") else {
                return self.fake.volume(volid).map(drop);
            };
            self.storage_call(f, volid.to_string()).await.map(drop)
        })
    }

    fn bwlimit(
        &self,
        operation: &str,
        storages: &[Option<String>],
        override_kib: Option<u64>,
    ) -> Option<u64> {
        let default = || {
            crate::storage::bwlimit_from_defs(|id| self.def(id), operation, storages, override_kib)
        };
        let Some(f) = self.enter("storage.bwlimit") else {
            return default();
        };
        let listed: Vec<String> = storages.iter().flatten().cloned().collect();
        match self
            .call_sync(&f, (operation, listed, override_kib))
            .and_then(|v| match v {
                LuaValue::Nil => Ok(None),
                v => expect_u64("storage.bwlimit", v).map(Some),
            }) {
            Ok(limit) => limit,
            Err(e) => {
                tracing::warn!("scripted storage.bwlimit failed, using the storage limits: {e}");
                default()
            }
        }
    }
}

impl Hypervisor for ScriptedBackend {
    fn start_incoming(&self, req: IncomingStart) -> BoxFuture<'_, HvResult<IncomingStarted>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.start_incoming") else {
                return self.fake.start_incoming(req.vmid, &req.nbd);
            };
            let args = self
                .start_request(&req)
                .map_err(|e| anyhow::anyhow!("{}", clean_error(&e)))?;
            let v = self.hv_call(f, args).await?;
            started_from_lua(v).map_err(|e| anyhow::anyhow!("{e}"))
        })
    }

    fn resume(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.resume") else {
                return self.fake.require_running(vmid);
            };
            self.hv_call(f, vmid).await.map(drop)
        })
    }

    fn stop(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.stop") else {
                self.fake.stop(vmid);
                return Ok(());
            };
            self.hv_call(f, vmid).await.map(drop)
        })
    }

    fn nbd_stop(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.nbd_stop") else {
                return self.fake.require_running(vmid);
            };
            self.hv_call(f, vmid).await.map(drop)
        })
    }

    fn is_running(&self, vmid: u32) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.is_running") else {
                return self.fake.is_running(vmid);
            };
            match self.call_async(f, vmid).await {
                Ok(v) => !matches!(v, LuaValue::Nil | LuaValue::Boolean(false)),
                Err(e) => {
                    tracing::warn!(
                        "scripted hypervisor.is_running failed (taken as not running): {e}"
                    );
                    false
                }
            }
        })
    }

    fn fstrim(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>> {
        Box::pin(async move {
            let Some(f) = self.enter("hypervisor.fstrim") else {
                return self.fake.require_running(vmid);
            };
            self.hv_call(f, vmid).await.map(drop)
        })
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
mod tests {
    use super::*;
    use crate::config::{ConfigFile, Overrides};

    fn cfg() -> NodeConfig {
        NodeConfig::from_parts(
            ConfigFile::default(),
            &Overrides {
                node: Some("t".into()),
                data_dir: Some(PathBuf::from("/nonexistent/d")),
                run_dir: Some(PathBuf::from("/nonexistent/r")),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn backend(code: &str) -> Arc<ScriptedBackend> {
        ScriptedBackend::from_source(code, "inline.lua", &cfg()).unwrap()
    }

    fn stream(size: u64, payload: &[u8]) -> Box<dyn AsyncRead + Send + Unpin> {
        let mut bytes = size.to_le_bytes().to_vec();
        bytes.extend_from_slice(payload);
        Box::new(std::io::Cursor::new(bytes))
    }

    fn req(volname: &str, format: &str, allow_rename: bool) -> ImportRequest {
        ImportRequest {
            storage: "local".into(),
            vmid: 100,
            volname: volname.into(),
            format: format.into(),
            stream_format: format!("{format}+size"),
            allow_rename,
        }
    }

    #[tokio::test]
    async fn default_storage_behaves_like_a_dir_storage() {
        let b = backend("return nil");
        assert_eq!(
            b.alloc("local", 100, "raw", None, 1024).await.unwrap(),
            "local:100/vm-100-disk-0.raw"
        );
        assert_eq!(
            b.alloc("local", 100, "qcow2", None, 2).await.unwrap(),
            "local:100/vm-100-disk-1.qcow2"
        );
        assert_eq!(
            b.volume_size("local:100/vm-100-disk-1.qcow2")
                .await
                .unwrap(),
            2048
        );
        assert_eq!(
            b.volume_format("local:100/vm-100-disk-0.raw")
                .await
                .unwrap(),
            "raw"
        );
        assert_eq!(
            b.path("local:100/vm-100-disk-0.raw").unwrap(),
            PathBuf::from("/nonexistent/d/images/100/vm-100-disk-0.raw")
        );
        let exists = b
            .alloc("local", 100, "raw", Some("vm-100-disk-0"), 1)
            .await
            .unwrap_err();
        assert_eq!(
            exists.to_string(),
            "disk image '/nonexistent/d/images/100/vm-100-disk-0.raw' already exists"
        );
        assert_eq!(
            b.alloc("local", 100, "vmdk", None, 1)
                .await
                .unwrap_err()
                .to_string(),
            "unsupported format 'vmdk' for storage type dir"
        );
        assert_eq!(
            b.alloc("nope", 100, "raw", None, 1)
                .await
                .unwrap_err()
                .to_string(),
            "storage 'nope' does not exist"
        );
        assert_eq!(
            b.import_formats("local", "qcow2").unwrap(),
            vec!["qcow2+size".to_string()]
        );
        b.free("local:100/vm-100-disk-0.raw").await.unwrap();
        assert_eq!(
            b.free("local:100/vm-100-disk-0.raw")
                .await
                .unwrap_err()
                .to_string(),
            "volume 'local:100/vm-100-disk-0.raw' does not exist: no file \
             '/nonexistent/d/images/100/vm-100-disk-0.raw'"
        );
        assert!(matches!(
            b.free("local:../etc").await.unwrap_err(),
            StorageError::InvalidVolid { .. }
        ));
        assert_eq!(
            b.volumes(),
            vec!["local:100/vm-100-disk-1.qcow2".to_string()]
        );
        assert_eq!(
            b.bwlimit("migration", &[Some("local".into())], Some(10)),
            Some(10)
        );
    }

    #[tokio::test]
    async fn default_import_reads_the_stream_and_checks_raw_lengths() {
        let b = backend("return {}");
        let volid = b
            .import(req("vm-100-disk-0.qcow2", "raw", false), stream(4, b"abcd"))
            .await
            .unwrap();
        assert_eq!(volid, "local:100/vm-100-disk-0.raw");
        assert_eq!(b.volume_size(&volid).await.unwrap(), 4);
        // taken: an error without allow_rename, the next free name with it
        let err = b
            .import(req("vm-100-disk-0", "raw", false), stream(4, b"abcd"))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");
        let renamed = b
            .import(req("vm-100-disk-0", "raw", true), stream(4, b"abcd"))
            .await
            .unwrap();
        assert_eq!(renamed, "local:100/vm-100-disk-1.raw");
        // qcow2 payloads are files: their length is not the virtual size
        assert_eq!(
            b.import(
                req("vm-100-disk-5", "qcow2", false),
                stream(1 << 30, b"QFI")
            )
            .await
            .unwrap(),
            "local:100/vm-100-disk-5.qcow2"
        );
        let short = b
            .import(req("vm-100-disk-7", "raw", false), stream(10, b"abc"))
            .await
            .unwrap_err();
        assert_eq!(
            short.to_string(),
            "import stream for '/nonexistent/d/images/100/vm-100-disk-7.raw' ended early: got 3 of 10 bytes"
        );
        let long = b
            .import(req("vm-100-disk-7", "raw", false), stream(1, b"abc"))
            .await
            .unwrap_err();
        assert!(matches!(long, StorageError::LongStream { .. }), "{long}");
        let headless = b
            .import(
                req("vm-100-disk-7", "raw", false),
                Box::new(std::io::Cursor::new(vec![1u8, 2])),
            )
            .await
            .unwrap_err();
        assert!(matches!(headless, StorageError::MissingSizeHeader));
        let mut wrong = req("vm-100-disk-7", "raw", false);
        wrong.stream_format = "qcow2+size".into();
        assert_eq!(
            b.import(wrong, stream(0, b""))
                .await
                .unwrap_err()
                .to_string(),
            "no matching import/export format found for storage 'local'"
        );
        assert_eq!(b.calls.raw_get::<i64>("storage.import").unwrap(), 8);
    }

    #[tokio::test]
    async fn default_hypervisor_tracks_running_vms() {
        let b = backend("return nil");
        let start = |nbd: &[(&str, &str)]| IncomingStart {
            vmid: 100,
            config: crate::guest::VmConfig::default(),
            machine: None,
            cpu: None,
            nbd: nbd
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(
            b.resume(100).await.unwrap_err().to_string(),
            "VM 100 not running"
        );
        let started = b
            .start_incoming(start(&[("scsi0", "local:100/vm-100-disk-0.raw")]))
            .await
            .unwrap();
        assert_eq!(
            started.migrate_socket,
            PathBuf::from("/nonexistent/r/100.migrate")
        );
        assert_eq!(
            started.nbd_socket,
            Some(PathBuf::from("/nonexistent/r/100_nbd.migrate"))
        );
        assert_eq!(
            started.nbd_uris.get("scsi0").map(String::as_str),
            Some("nbd:unix:/nonexistent/r/100_nbd.migrate:exportname=drive-scsi0")
        );
        assert!(b.is_running(100).await);
        assert_eq!(
            b.start_incoming(start(&[])).await.unwrap_err().to_string(),
            "VM 100 already running"
        );
        b.resume(100).await.unwrap();
        b.nbd_stop(100).await.unwrap();
        b.fstrim(100).await.unwrap();
        b.stop(100).await.unwrap();
        assert!(!b.is_running(100).await);
        b.stop(100).await.unwrap();
        let started = b.start_incoming(start(&[])).await.unwrap();
        assert_eq!(started.nbd_socket, None);
        assert!(started.nbd_uris.is_empty());
    }

    #[tokio::test]
    async fn overrides_fail_count_and_fall_back_to_the_defaults() {
        let b = backend(
            r#"
            return {
              storage = {
                alloc = function(storage, vmid, format, name, size_kib)
                  if backend.calls["storage.alloc"] == 2 then
                    backend.fail("disk full (rehearsal)")
                  end
                  backend.state.last = {storage, vmid, format, name, size_kib}
                  return backend.default.storage.alloc(storage, vmid, format, name, size_kib)
                end,
                path = function(volid) return "/dev/fake/" .. volid end,
                volume_size = function(volid) return 42 end,
                import = function(req, data)
                  if #data ~= req.received or req.size ~= 5 then
                    backend.fail("got " .. #data .. " of " .. tostring(req.size))
                  end
                  return "local:100/vm-100-disk-9.raw"
                end,
              },
              hypervisor = {
                is_running = function(vmid) return vmid == 7 end,
                resume = function(vmid) error("raw lua error") end,
                start_incoming = function(req)
                  return {migrate_socket = "/x/" .. req.vmid .. ".migrate", nbd_uris = {}}
                end,
              },
            }
            "#,
        );
        assert_eq!(
            b.alloc("local", 100, "raw", None, 8).await.unwrap(),
            "local:100/vm-100-disk-0.raw"
        );
        assert_eq!(
            b.alloc("local", 100, "raw", None, 8)
                .await
                .unwrap_err()
                .to_string(),
            "disk full (rehearsal)"
        );
        assert_eq!(b.path("a:b").unwrap(), PathBuf::from("/dev/fake/a:b"));
        assert_eq!(b.volume_size("x").await.unwrap(), 42);
        assert_eq!(
            b.import(req("vm-100-disk-0", "raw", false), stream(5, b"hello"))
                .await
                .unwrap(),
            "local:100/vm-100-disk-9.raw"
        );
        assert!(b.is_running(7).await);
        assert!(!b.is_running(8).await);
        let err = b.resume(1).await.unwrap_err().to_string();
        assert!(
            err.starts_with("inline.lua:") && err.ends_with("raw lua error"),
            "{err}"
        );
        let started = b
            .start_incoming(IncomingStart {
                vmid: 5,
                config: crate::guest::VmConfig::default(),
                machine: None,
                cpu: None,
                nbd: BTreeMap::new(),
            })
            .await
            .unwrap();
        assert_eq!(started.migrate_socket, PathBuf::from("/x/5.migrate"));
        assert_eq!(b.calls.raw_get::<i64>("storage.alloc").unwrap(), 2);
        assert_eq!(b.calls.raw_get::<i64>("hypervisor.is_running").unwrap(), 2);
        // not overridden: the default answers, and the call still counts
        assert_eq!(
            b.volume_format("local:100/vm-100-disk-0.raw")
                .await
                .unwrap(),
            "raw"
        );
        assert_eq!(b.calls.raw_get::<i64>("storage.volume_format").unwrap(), 1);
        assert_eq!(b.volumes(), vec!["local:100/vm-100-disk-0.raw".to_string()]);
    }

    #[tokio::test]
    async fn sleep_lets_other_calls_through() {
        let b = backend(
            r#"
            return {
              storage = {
                free = function(volid)
                  backend.state.sleeping = true
                  backend.sleep(1000)
                  backend.state.sleeping = false
                end,
                volume_format = function(volid)
                  return backend.state.sleeping and "during" or "after"
                end,
              },
            }
            "#,
        );
        let slow = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.free("local:100/vm-100-disk-0.raw").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fast = tokio::time::timeout(Duration::from_millis(800), b.volume_format("v"))
            .await
            .expect("not blocked by the sleeping call")
            .unwrap();
        assert_eq!(fast, "during");
        slow.await.unwrap().unwrap();
        assert_eq!(b.volume_format("v").await.unwrap(), "after");
    }

    #[test]
    fn load_errors_name_the_script() {
        let err = |code: &str| {
            ScriptedBackend::from_source(code, "rehearse.lua", &cfg())
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        let syntax = err("return {\n  storage = {alloc = function() end,,}\n}");
        assert!(syntax.contains("rehearse.lua:2:"), "{syntax}");
        assert_eq!(
            err("return {storage = {aloc = function() end}}"),
            "rehearse.lua: unknown function 'storage.aloc' (known: alloc, free, path, \
             volume_size, volume_format, import, import_formats, check_untrusted, bwlimit)"
        );
        assert_eq!(
            err("return {qemu = {}}"),
            "rehearse.lua: unknown key 'qemu' (expected 'storage' and/or 'hypervisor')"
        );
        assert_eq!(
            err("return {hypervisor = {stop = 1}}"),
            "rehearse.lua: 'hypervisor.stop' must be a function, got integer"
        );
        assert_eq!(
            err("return 5"),
            "rehearse.lua: must return a table {storage = {...}, hypervisor = {...}}, got integer"
        );
        let runtime = err("error('boom')");
        assert!(runtime.contains("rehearse.lua:1: boom"), "{runtime}");
        assert!(err("return {}").is_empty());
    }

    #[test]
    fn backend_argument() {
        assert_eq!(parse_backend_arg("real"), Ok(None));
        assert_eq!(
            parse_backend_arg("scripted:/tmp/b.lua"),
            Ok(Some(PathBuf::from("/tmp/b.lua")))
        );
        assert!(parse_backend_arg("scripted:").is_err());
        assert!(parse_backend_arg("fake").is_err());
    }
}
