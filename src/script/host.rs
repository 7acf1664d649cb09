//! The host API handlers call: one read-only global `pve` with sub-tables `log`, `json`,
//! `config`, `storage`, `qemu`, `firewall`, `tunnel`, `perm` and the function `fail`.
//! Functions raise on failure with a message fit for the reply. Everything a tunnel
//! creates through them (volumes, imports, a started VM, a firewall file) is recorded in
//! the tunnel's [`Session`] so [`cleanup`] can free exactly that and nothing else.
//! Reference: `handlers/README.md`.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use mlua::{Lua, LuaSerdeExt, Table, Value as LuaValue};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, ReadBuf};

use super::HandlerFailure;
use crate::command::TunnelSockets;
use crate::guest::config::{self, VmConfig};
use crate::guest::{IncomingStart, VmLockGuard};
use crate::journal::{self, Created};
use crate::node::Node;
use crate::storage::ImportRequest;
use crate::task::TaskLog;
use crate::util::unix_now;

/// What a tunnel has done so far, for cleanup and for the wire rules.
#[derive(Default)]
pub struct Session {
    /// What this tunnel created, mirrored durably to its journal by [`HostCtx::persist`].
    pub created: Created,
    pub exit: bool,
    pub import: Option<ImportJob>,
}

/// A running `disk-import`.
pub struct ImportJob {
    /// The volume name asked for (the partial file an abort removes).
    pub volname: String,
    pub socket: PathBuf,
    pub task: tokio::task::JoinHandle<Result<String, String>>,
    pub received: Arc<AtomicU64>,
}

/// Per-tunnel context, stored as app data of the tunnel's Lua VM.
pub struct HostCtx {
    pub node: Arc<Node>,
    pub tunnel: Arc<dyn TunnelSockets>,
    pub log: TaskLog,
    pub vmid: u32,
    pub authid: String,
    pub session: Mutex<Session>,
    /// The VM lock while a locked handler runs.
    pub guard: Mutex<Option<VmLockGuard>>,
}

impl HostCtx {
    pub fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the record of what this tunnel created and writes it to the journal
    /// (fsync'd) before the command that changed it replies. Memory follows the disk: if
    /// the write fails, the change is not made and the command fails.
    pub async fn record(&self, change: impl FnOnce(&mut Created)) -> mlua::Result<()> {
        let mut next = self.session().created.clone();
        change(&mut next);
        journal::store_async(self.node.cfg.journal_dir(), next.clone())
            .await
            .map_err(|e| fail(format!("cannot write the tunnel journal: {e:#}")))?;
        self.session().created = next;
        Ok(())
    }

    /// Fails once the tunnel freed what it created (`pve.tunnel.cleanup()`): the VMID may
    /// already belong to the next tunnel, so nothing may be created in its name.
    fn ensure_open(&self) -> mlua::Result<()> {
        if self.session().created.released {
            return Err(fail(format!(
                "the tunnel of VM {} was cleaned up; it cannot create anything any more",
                self.vmid
            )));
        }
        Ok(())
    }

    fn info(&self, msg: &str) {
        tracing::info!(vmid = self.vmid, "{msg}");
        self.log.log(msg);
    }

    fn warn(&self, msg: &str) {
        tracing::warn!(vmid = self.vmid, "{msg}");
        self.log.warn(msg);
    }
}

pub fn fail(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::external(HandlerFailure(msg.into()))
}

fn ctx(lua: &Lua) -> mlua::Result<Arc<HostCtx>> {
    lua.app_data_ref::<Arc<HostCtx>>()
        .map(|c| Arc::clone(&c))
        .ok_or_else(|| fail("host functions are only available inside a tunnel"))
}

fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<LuaValue> {
    lua.to_value(v)
}

fn from_lua(lua: &Lua, v: LuaValue) -> mlua::Result<Value> {
    lua.from_value(v)
}

/// Wraps `table` in a proxy that refuses writes.
fn readonly(lua: &Lua, table: Table) -> mlua::Result<Table> {
    let proxy = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.set("__index", table)?;
    meta.set(
        "__newindex",
        lua.create_function(
            |_, (_t, k, _v): (LuaValue, LuaValue, LuaValue)| -> mlua::Result<()> {
                Err(fail(format!(
                    "pve is read-only (tried to set '{}')",
                    k.to_string().unwrap_or_default()
                )))
            },
        )?,
    )?;
    meta.set("__metatable", false)?;
    proxy.set_metatable(Some(meta))?;
    Ok(proxy)
}

/// Installs the global `pve` and `print`.
pub fn register(lua: &Lua) -> anyhow::Result<()> {
    register_inner(lua).map_err(|e| anyhow::anyhow!("registering the pve host API: {e}"))
}

fn register_inner(lua: &Lua) -> mlua::Result<()> {
    let pve = lua.create_table()?;
    pve.set("log", readonly(lua, log_table(lua)?)?)?;
    pve.set("json", readonly(lua, json_table(lua)?)?)?;
    pve.set("config", readonly(lua, config_table(lua)?)?)?;
    pve.set("storage", readonly(lua, storage_table(lua)?)?)?;
    pve.set("qemu", readonly(lua, qemu_table(lua)?)?)?;
    pve.set("firewall", readonly(lua, firewall_table(lua)?)?)?;
    pve.set("tunnel", readonly(lua, tunnel_table(lua)?)?)?;
    pve.set("perm", readonly(lua, perm_table(lua)?)?)?;
    pve.set(
        "fail",
        lua.create_function(|_, msg: LuaValue| -> mlua::Result<()> {
            Err(fail(match msg {
                LuaValue::String(s) => s.to_string_lossy(),
                other => other.to_string().unwrap_or_else(|_| "error".into()),
            }))
        })?,
    )?;
    lua.globals().set("pve", readonly(lua, pve)?)?;
    lua.globals().set(
        "print",
        lua.create_function(|lua, args: mlua::Variadic<LuaValue>| {
            let text = args
                .iter()
                .map(|v| v.to_string().unwrap_or_else(|_| "?".into()))
                .collect::<Vec<_>>()
                .join("\t");
            log_line(lua, "info", &text);
            Ok(())
        })?,
    )?;
    Ok(())
}

fn log_line(lua: &Lua, level: &str, msg: &str) {
    match lua.app_data_ref::<Arc<HostCtx>>() {
        Some(c) if level == "warn" => c.warn(msg),
        Some(c) if level == "debug" => tracing::debug!(vmid = c.vmid, "{msg}"),
        Some(c) => c.info(msg),
        None => tracing::info!("lua: {msg}"),
    }
}

fn log_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for level in ["info", "warn", "debug"] {
        t.set(
            level,
            lua.create_function(move |lua, msg: String| {
                log_line(lua, level, &msg);
                Ok(())
            })?,
        )?;
    }
    Ok(t)
}

/// `pve.json` (also the spec runner's `json`): `null`, `array`, `encode`, `decode`.
pub(crate) fn json_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("null", lua.null())?;
    t.set(
        "array",
        lua.create_function(|lua, t: Option<Table>| {
            let t = match t {
                Some(t) => t,
                None => lua.create_table()?,
            };
            t.set_metatable(Some(lua.array_metatable()))?;
            Ok(t)
        })?,
    )?;
    t.set(
        "encode",
        lua.create_function(|lua, v: LuaValue| {
            let v = from_lua(lua, v)?;
            serde_json::to_string(&v).map_err(|e| fail(format!("json encode: {e}")))
        })?,
    )?;
    t.set(
        "decode",
        lua.create_function(|lua, s: String| {
            let v: Value =
                serde_json::from_str(&s).map_err(|e| fail(format!("json decode: {e}")))?;
            to_lua(lua, &v)
        })?,
    )?;
    Ok(t)
}

/// A VM config as Lua sees it.
pub fn config_to_json(c: &VmConfig) -> Value {
    let snapshots: Map<String, Value> = c
        .snapshots
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                json!({"description": s.description, "options": s.options}),
            )
        })
        .collect();
    json!({
        "description": c.description,
        "options": c.options,
        "pending": c.pending,
        "special": c.special,
        "snapshots": snapshots,
        "digest": c.digest,
    })
}

fn string_map(
    v: Option<&Value>,
    what: &str,
) -> mlua::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => (if *b { "1" } else { "0" }).to_string(),
                    Value::Null => continue,
                    _ => return Err(fail(format!("{what}.{k}: must be a string"))),
                };
                out.insert(k.clone(), s);
            }
        }
        // An empty Lua table serializes as an empty array.
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => return Err(fail(format!("{what} must be a table of strings"))),
    }
    Ok(out)
}

/// The inverse of [`config_to_json`] (snapshots are not written back by handlers).
pub fn config_from_json(v: &Value) -> mlua::Result<VmConfig> {
    let mut c = VmConfig {
        options: string_map(v.get("options"), "options")?,
        pending: string_map(v.get("pending"), "pending")?,
        ..VmConfig::default()
    };
    c.description = v
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(Value::Object(special)) = v.get("special") {
        for (name, opts) in special {
            c.special
                .insert(name.clone(), string_map(Some(opts), "special")?);
        }
    }
    c.validate()
        .map_err(|e| fail(format!("invalid config: {e}")))?;
    Ok(c)
}

fn props_to_lua(lua: &Lua, props: Vec<(String, String)>) -> mlua::Result<LuaValue> {
    let map: Map<String, Value> = props
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    to_lua(lua, &Value::Object(map))
}

fn config_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "load",
        lua.create_function(|lua, ()| {
            let c = ctx(lua)?;
            let text = c
                .node
                .guests
                .read_text(c.vmid)
                .map_err(|e| fail(e.to_string()))?;
            let conf = VmConfig::parse(&text).map_err(|e| fail(e.to_string()))?;
            to_lua(lua, &config_to_json(&conf))
        })?,
    )?;
    t.set(
        "parse",
        lua.create_function(|lua, text: String| {
            let conf = VmConfig::parse_strict(&text).map_err(|e| fail(e.to_string()))?;
            to_lua(lua, &config_to_json(&conf))
        })?,
    )?;
    t.set(
        "write",
        lua.create_function(|lua, conf: LuaValue| {
            let c = ctx(lua)?;
            let conf = config_from_json(&from_lua(lua, conf)?)?;
            let guard = c.guard.lock().unwrap_or_else(|e| e.into_inner());
            let Some(guard) = guard.as_ref() else {
                return Err(fail(
                    "pve.config.write needs the config lock (handler has lock = false)",
                ));
            };
            c.node
                .guests
                .write_text_locked(guard, &conf.write())
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "parse_drive",
        lua.create_function(|lua, value: String| {
            let props = config::parse_drive(&value).map_err(|e| fail(e.to_string()))?;
            props_to_lua(lua, props)
        })?,
    )?;
    t.set(
        "parse_property_string",
        lua.create_function(|lua, (value, default_key): (String, Option<String>)| {
            let props = config::parse_property_string(&value, default_key.as_deref())
                .map_err(|e| fail(e.to_string()))?;
            props_to_lua(lua, props)
        })?,
    )?;
    t.set(
        "print_drive",
        lua.create_function(|lua, props: LuaValue| {
            let v = from_lua(lua, props)?;
            let map = string_map(Some(&v), "drive")?;
            config::print_property_string(&map.into_iter().collect::<Vec<_>>(), Some("file"))
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "parse_size",
        lua.create_function(|_, s: String| Ok(config::parse_size(&s)))?,
    )?;
    t.set(
        "format_size",
        lua.create_function(|_, n: u64| Ok(config::format_size(n)))?,
    )?;
    t.set(
        "is_drive_key",
        lua.create_function(|_, k: String| Ok(config::is_drive_key(&k)))?,
    )?;
    Ok(t)
}

fn storage_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "check",
        lua.create_function(|lua, storage: String| {
            let c = ctx(lua)?;
            c.node
                .check_storage_for_images(&c.authid, &storage)
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "formats",
        lua.create_function(|lua, storage: String| {
            let c = ctx(lua)?;
            let def = c
                .node
                .cfg
                .storages
                .get(&storage)
                .ok_or_else(|| fail(format!("storage '{storage}' does not exist")))?;
            let valid = match def.kind {
                crate::storage::StorageKind::Dir => vec!["raw", "qcow2"],
            };
            to_lua(lua, &json!({"default": "raw", "valid": valid}))
        })?,
    )?;
    t.set(
        "alloc",
        lua.create_async_function(
            |lua, (storage, format, size_kib, name): (String, String, u64, Option<String>)| async move {
                let c = ctx(&lua)?;
                c.ensure_open()?;
                let volid = c
                    .node
                    .storage
                    .alloc(&storage, c.vmid, &format, name.as_deref(), size_kib)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                c.record(|r| r.volumes.push(volid.clone())).await?;
                c.info(&format!("allocated volume '{volid}' ({size_kib} KiB, {format})"));
                Ok(volid)
            },
        )?,
    )?;
    t.set(
        "free",
        lua.create_async_function(|lua, volid: String| async move {
            let c = ctx(&lua)?;
            if !c.session().created.volumes.contains(&volid) {
                return Err(fail(format!(
                    "volume '{volid}' was not allocated by this tunnel"
                )));
            }
            c.node
                .storage
                .free(&volid)
                .await
                .map_err(|e| fail(e.to_string()))?;
            c.record(|r| r.volumes.retain(|v| v != &volid)).await?;
            c.info(&format!("freed volume '{volid}'"));
            Ok(())
        })?,
    )?;
    t.set(
        "owned",
        lua.create_function(|lua, volid: String| {
            let c = ctx(lua)?;
            Ok(c.session().created.volumes.contains(&volid))
        })?,
    )?;
    t.set(
        "path",
        lua.create_function(|lua, volid: String| {
            let c = ctx(lua)?;
            c.node
                .storage
                .path(&volid)
                .map(|p| p.display().to_string())
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "bwlimit",
        lua.create_function(
            |lua, (operation, storages, override_kib): (String, LuaValue, Option<u64>)| {
                let c = ctx(lua)?;
                let storages: Vec<Option<String>> = match from_lua(lua, storages)? {
                    Value::Array(items) => items
                        .iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect(),
                    Value::Null => Vec::new(),
                    Value::Object(m) if m.is_empty() => Vec::new(),
                    _ => return Err(fail("storages must be a list")),
                };
                // As PVE: whoever may change the storage limits (Datastore.Allocate on each
                // listed storage) may also exceed them; Sys.Modify only lifts datacenter
                // defaults, which this node does not have.
                let may_exceed = storages.iter().flatten().all(|s| {
                    c.node
                        .allows(&c.authid, &format!("/storage/{s}"), "Datastore.Allocate")
                }) && storages.iter().any(Option::is_some);
                if let (Some(o), true) = (override_kib, may_exceed) {
                    return Ok(if o == 0 { None } else { Some(o) });
                }
                Ok(c.node.storage.bwlimit(&operation, &storages, override_kib))
            },
        )?,
    )?;
    t.set(
        "import_start",
        lua.create_async_function(|lua, opts: LuaValue| async move {
            let c = ctx(&lua)?;
            c.ensure_open()?;
            let opts = from_lua(&lua, opts)?;
            let (socket, format) = import_start(&c, &opts).await?;
            to_lua(
                &lua,
                &json!({"socket": socket.display().to_string(), "format": format}),
            )
        })?,
    )?;
    t.set(
        "import_status",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            let status = import_status(&c).await?;
            to_lua(&lua, &status)
        })?,
    )?;
    Ok(t)
}

/// Counts bytes read, for `pending` progress messages.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

/// How long the importer waits for the source to connect.
const IMPORT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

async fn import_start(c: &Arc<HostCtx>, opts: &Value) -> mlua::Result<(PathBuf, String)> {
    let get = |k: &str| opts.get(k).and_then(Value::as_str).map(str::to_string);
    let storage = get("storage").ok_or_else(|| fail("import_start: 'storage' missing"))?;
    let volname = get("volname").ok_or_else(|| fail("import_start: 'volname' missing"))?;
    let format = get("format").ok_or_else(|| fail("import_start: 'format' missing"))?;
    let export_formats =
        get("export_formats").ok_or_else(|| fail("import_start: 'export_formats' missing"))?;
    let allow_rename = opts
        .get("allow_rename")
        .and_then(crate::util::lenient_bool)
        .unwrap_or(false);
    if c.session().import.is_some() {
        return Err(fail("disk import already running"));
    }
    // Everything is checked before the socket exists: a refused import leaves nothing
    // behind and does not block the next `disk-import`.
    c.node
        .check_storage_for_images(&c.authid, &storage)
        .map_err(|e| fail(e.to_string()))?;
    let stream_format = crate::storage::import::choose_stream_format(
        &*c.node.storage,
        &storage,
        &format,
        &export_formats,
    )
    .map_err(|e| fail(e.to_string()))?;
    let req = ImportRequest {
        storage,
        vmid: c.vmid,
        volname,
        format,
        stream_format: stream_format.clone(),
        allow_rename,
    };
    c.node
        .storage
        .check_import(&req)
        .map_err(|e| fail(e.to_string()))?;
    let socket = c.node.cfg.run_dir.join(format!("{}.storage", c.vmid));
    let sock = socket.clone();
    c.record(|r| {
        r.import_running = true;
        if !r.sockets.contains(&sock) {
            r.sockets.push(sock);
        }
    })
    .await?;
    let volname = req.volname.clone();
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| fail(format!("unable to listen on {}: {e}", socket.display())))?;
    let received = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(accept_and_import(
        listener,
        Arc::clone(&c.node.storage),
        req,
        Arc::clone(&received),
    ));
    c.tunnel.register_socket(&socket);
    c.session().import = Some(ImportJob {
        volname,
        socket: socket.clone(),
        task,
        received,
    });
    c.info(&format!(
        "disk import listening on {} ({stream_format})",
        socket.display()
    ));
    Ok((socket, stream_format))
}

/// The import task: waits for the source's one connection, then hands the stream to the
/// storage backend (which verifies it and leaves nothing behind on error).
async fn accept_and_import(
    listener: tokio::net::UnixListener,
    storage: Arc<dyn crate::storage::Storage>,
    req: ImportRequest,
    count: Arc<AtomicU64>,
) -> Result<String, String> {
    let stream = match tokio::time::timeout(IMPORT_ACCEPT_TIMEOUT, listener.accept()).await {
        Ok(Ok((s, _))) => s,
        Ok(Err(e)) => return Err(format!("accepting the import connection failed: {e}")),
        Err(_) => {
            return Err(format!(
                "no import connection within {} s",
                IMPORT_ACCEPT_TIMEOUT.as_secs()
            ));
        }
    };
    drop(listener);
    let reader = CountingReader {
        inner: stream,
        count,
    };
    storage
        .import(req, Box::new(reader))
        .await
        .map_err(|e| e.to_string())
}

async fn import_status(c: &Arc<HostCtx>) -> mlua::Result<Value> {
    let finished = {
        let session = c.session();
        let Some(job) = session.import.as_ref() else {
            return Err(fail("no disk import running"));
        };
        if !job.task.is_finished() {
            let got = job.received.load(Ordering::Relaxed);
            return Ok(json!({"status": "pending", "msg": format!("received {got} bytes")}));
        }
        true
    };
    debug_assert!(finished);
    let job = c.session().import.take();
    let Some(job) = job else {
        return Err(fail("no disk import running"));
    };
    c.tunnel.unregister_socket(&job.socket);
    let _ = std::fs::remove_file(&job.socket);
    let result = job
        .task
        .await
        .unwrap_or_else(|e| Err(format!("import task failed: {e}")));
    Ok(match result {
        Ok(volid) => {
            c.record(|r| {
                r.import_running = false;
                r.volumes.push(volid.clone());
            })
            .await?;
            // As upstream: a just-imported image must not reference other files.
            if let Err(e) = c.node.storage.check_untrusted(&volid).await {
                let msg = e.to_string();
                c.warn(&format!("imported image '{volid}' rejected: {msg}"));
                if c.node.storage.free(&volid).await.is_ok() {
                    c.record(|r| r.volumes.retain(|v| v != &volid)).await?;
                }
                return Ok(json!({"status": "error", "msg": msg}));
            }
            c.info(&format!("successfully imported '{volid}'"));
            json!({"status": "complete", "volid": volid})
        }
        Err(msg) => {
            c.record(|r| r.import_running = false).await?;
            c.warn(&format!("disk import failed: {msg}"));
            json!({"status": "error", "msg": msg})
        }
    })
}

fn qemu_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "check_config",
        lua.create_function(|lua, options: LuaValue| {
            let options = string_map(Some(&from_lua(lua, options)?), "options")?;
            crate::qemu::cmdline::check_options(&options).map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "start_incoming",
        lua.create_async_function(|lua, opts: LuaValue| async move {
            let c = ctx(&lua)?;
            c.ensure_open()?;
            let opts = from_lua(&lua, opts)?;
            let text = c
                .node
                .guests
                .read_text(c.vmid)
                .map_err(|e| fail(e.to_string()))?;
            let config = VmConfig::parse(&text).map_err(|e| fail(e.to_string()))?;
            let nbd = string_map(opts.get("nbd"), "nbd")?;
            let req = IncomingStart {
                vmid: c.vmid,
                config,
                machine: opts
                    .get("machine")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                cpu: opts.get("cpu").and_then(Value::as_str).map(str::to_string),
                nbd,
            };
            c.record(|r| r.vm_started = true).await?;
            let started = c
                .node
                .hypervisor
                .start_incoming(req)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
            c.tunnel.register_socket(&started.migrate_socket);
            if let Some(nbd) = &started.nbd_socket {
                c.tunnel.register_socket(nbd);
            }
            c.info(&format!(
                "VM {} started, waiting for migration on {}",
                c.vmid,
                started.migrate_socket.display()
            ));
            let mut reply = json!({
                "migrate_socket": started.migrate_socket.display().to_string(),
                "nbd_uris": started.nbd_uris,
            });
            if let Some(nbd) = &started.nbd_socket {
                reply["nbd_socket"] = json!(nbd.display().to_string());
            }
            to_lua(&lua, &reply)
        })?,
    )?;
    macro_rules! vm_op {
        ($name:literal, $method:ident) => {
            t.set(
                $name,
                lua.create_async_function(|lua, ()| async move {
                    let c = ctx(&lua)?;
                    c.node
                        .hypervisor
                        .$method(c.vmid)
                        .await
                        .map_err(|e| fail(format!("{e:#}")))
                })?,
            )?;
        };
    }
    t.set(
        "resume",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            // Recorded first: if this process dies during `cont`, the VM may already run
            // as the only live copy, and recovery must leave it alone.
            c.record(|r| r.resume_requested = true).await?;
            c.node
                .hypervisor
                .resume(c.vmid)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
            c.record(|r| r.committed = true).await
        })?,
    )?;
    t.set(
        "stop",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            if c.session().created.resume_requested {
                return Err(fail(format!(
                    "VM {} was resumed on this node and may be the only live copy - not \
                     stopping it",
                    c.vmid
                )));
            }
            c.node
                .hypervisor
                .stop(c.vmid)
                .await
                .map_err(|e| fail(format!("{e:#}")))
        })?,
    )?;
    vm_op!("nbd_stop", nbd_stop);
    vm_op!("fstrim", fstrim);
    t.set(
        "is_running",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            Ok(c.node.hypervisor.is_running(c.vmid).await)
        })?,
    )?;
    Ok(t)
}

fn firewall_path(c: &HostCtx) -> PathBuf {
    c.node.cfg.firewall_dir().join(format!("{}.fw", c.vmid))
}

fn firewall_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "write",
        lua.create_async_function(|lua, text: String| async move {
            let c = ctx(&lua)?;
            c.ensure_open()?;
            c.record(|r| r.firewall_written = true).await?;
            crate::util::ensure_dir(&c.node.cfg.firewall_dir(), 0o755)
                .map_err(|e| fail(format!("{e:#}")))?;
            crate::util::write_atomic(&firewall_path(&c), text.as_bytes(), 0o640)
                .map_err(|e| fail(format!("{e:#}")))?;
            Ok(())
        })?,
    )?;
    t.set(
        "remove",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            match std::fs::remove_file(firewall_path(&c)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail(format!("removing firewall file: {e}"))),
            }
            c.record(|r| r.firewall_written = false).await
        })?,
    )?;
    Ok(t)
}

fn tunnel_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "ticket",
        lua.create_function(|lua, path: String| {
            let c = ctx(lua)?;
            if !c.tunnel.is_registered(std::path::Path::new(&path)) {
                return Err(fail(format!(
                    "Not allowed to generate ticket for unknown socket '{path}'"
                )));
            }
            c.node
                .tickets
                .assemble(&c.authid, &path, c.tunnel.instance(), unix_now())
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "expect_lock",
        lua.create_async_function(|lua, lock: Option<String>| async move {
            let c = ctx(&lua)?;
            c.record(|r| r.expected_lock = lock).await
        })?,
    )?;
    t.set(
        "commit",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            c.record(|r| r.committed = true).await
        })?,
    )?;
    t.set(
        "cleanup",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            cleanup(&c).await;
            Ok(())
        })?,
    )?;
    t.set(
        "bridge_exists",
        lua.create_function(|lua, bridge: String| {
            let c = ctx(lua)?;
            Ok(c.node.cfg.bridge_exists(&bridge))
        })?,
    )?;
    t.set(
        "socket_dir",
        lua.create_function(|lua, ()| {
            let c = ctx(lua)?;
            Ok(c.node.cfg.run_dir.display().to_string())
        })?,
    )?;
    Ok(t)
}

fn perm_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "check",
        lua.create_function(|lua, (path, privilege): (String, String)| {
            let c = ctx(lua)?;
            c.node
                .require(&c.authid, &path, &privilege)
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "has",
        lua.create_function(|lua, (path, privilege): (String, String)| {
            let c = ctx(lua)?;
            Ok(c.node.allows(&c.authid, &path, &privilege))
        })?,
    )?;
    Ok(t)
}

/// Ends a running disk import: a finished one's volume is recorded as this tunnel's, an
/// unfinished one is aborted (its partial volume removed), and its socket goes.
pub async fn end_import(c: &Arc<HostCtx>) {
    let import = c.session().import.take();
    if let Some(job) = import {
        if job.task.is_finished() {
            // Finished but not yet collected by `query-disk-import`: its volume is ours too.
            match job.task.await {
                Ok(Ok(volid)) => c.session().created.volumes.push(volid),
                Ok(Err(msg)) => c.info(&format!("cleanup: the disk import had failed: {msg}")),
                Err(e) => c.info(&format!("cleanup: the disk import task had failed: {e}")),
            }
        } else {
            job.task.abort();
            let _ = job.task.await;
            c.info(&format!(
                "cleanup: aborted the running import of '{}' and removed its partial volume",
                job.volname
            ));
        }
        c.tunnel.unregister_socket(&job.socket);
        let _ = std::fs::remove_file(&job.socket);
    }
}

/// Frees what this tunnel created (see [`journal::free_created`], the one path every
/// tunnel end and crash recovery take): first ends a running import, so its partial
/// volume is gone or complete, then frees by the record. After a successful free the
/// record is empty, so a second call (e.g. `quit cleanup=1`, then EOF) frees nothing.
pub async fn cleanup(c: &Arc<HostCtx>) -> journal::Freed {
    end_import(c).await;
    let created = c.session().created.clone();
    // Another tunnel may hold the VMID by now (an operator destroyed the VM and a new
    // migration reserved it): then the VM and the config are not ours to touch.
    let vmid_is = if c.tunnel.superseded() {
        journal::Vmid::Lost
    } else {
        journal::Vmid::Owned
    };
    // A locked handler that calls cleanup keeps its lock: borrow the guard, put it back.
    let guard = c.guard.lock().unwrap_or_else(|e| e.into_inner()).take();
    let freed = journal::free_created(&c.node, &created, vmid_is, guard.as_ref(), &c.log).await;
    *c.guard.lock().unwrap_or_else(|e| e.into_inner()) = guard;
    if freed.failed {
        c.warn(&format!(
            "cleanup of VM {} is incomplete; the tunnel's journal stays, and the next start \
             of mtunnel serve (or 'mtunnel cleanup' while it is stopped) retries it",
            c.vmid
        ));
        return freed;
    }
    // Freed, or kept for good (a resumed VM, another lock): either way nothing may be
    // freed in this tunnel's name again — the VMID may already belong to the next tunnel.
    let _ = c.record(|r| r.released = true).await;
    freed
}
