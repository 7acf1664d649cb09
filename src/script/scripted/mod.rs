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
    "now",
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
        t.set("multifd", req.multifd)?;
        t.set("compression", req.compression.as_deref())?;
        t.set("postcopy", req.postcopy)?;
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
mod tests {
    use super::*;
    use crate::config::{ConfigFile, Overrides};
    use crate::guest::hypervisor::Hypervisor;
    use crate::storage::Storage;
    use tokio::io::AsyncRead;

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
            multifd: None,
            compression: None,
            postcopy: false,
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
                multifd: None,
                compression: None,
                postcopy: false,
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
        // `free` sleeps until `volume_size` releases it (at most 10 s); `volume_format`
        // says which side of that sleep it ran on. No time bound: a call that waited for
        // the sleeping one would run after it and answer "after".
        let b = backend(
            r#"
            return {
              storage = {
                free = function(volid)
                  backend.state.sleeping = true
                  for _ = 1, 1000 do
                    if backend.state.released then break end
                    backend.sleep(10)
                  end
                  backend.state.sleeping = false
                end,
                volume_format = function(volid)
                  if backend.state.sleeping == nil then return "before" end
                  return backend.state.sleeping and "during" or "after"
                end,
                volume_size = function(volid)
                  backend.state.released = true
                  return 0
                end,
              },
            }
            "#,
        );
        let slow = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.free("local:100/vm-100-disk-0.raw").await })
        };
        // Until the slow call has started, every call runs before it.
        let mut seen = String::from("before");
        for _ in 0..1000 {
            seen = b.volume_format("v").await.unwrap();
            if seen != "before" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen, "during", "a call while another one sleeps");
        assert_eq!(b.volume_size("v").await.unwrap(), 0);
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
