//! `pve.storage`: checks, allocation and freeing of this tunnel's volumes (each recorded in
//! the journal before the reply), bandwidth limits, and the disk import behind
//! `disk-import`/`query-disk-import`. Reference: `docs/handlers/storage.md`.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use mlua::{Lua, Table, Value as LuaValue};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, ReadBuf};

use super::{HostCtx, ImportJob, ctx, fail, from_lua, to_lua};
use crate::metrics::{import_failure, import_failure_reason};
use crate::storage::ImportRequest;

pub(super) fn storage_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    add_volume_fns(lua, &t)?;
    add_transfer_fns(lua, &t)?;
    Ok(t)
}

/// `check`, `formats`, `alloc`, `free`, `owned`, `path`: this tunnel's volumes.
fn add_volume_fns(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "check",
        lua.create_function(|lua, storage: String| {
            let c = ctx(lua)?;
            c.host
                .check_storage_for_images(&c.authid, &storage)
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "formats",
        lua.create_function(|lua, storage: String| {
            let c = ctx(lua)?;
            let def = c
                .host
                .cfg
                .storages
                .get(&storage)
                .ok_or_else(|| fail(format!("storage '{storage}' does not exist")))?;
            to_lua(lua, &json!({"default": "raw", "valid": def.kind.formats()}))
        })?,
    )?;
    t.set(
        "alloc",
        lua.create_async_function(
            |lua, (storage, format, size_kib, name): (String, String, u64, Option<String>)| async move {
                let c = ctx(&lua)?;
                c.ensure_open()?;
                let volid = c
                    .host
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
            c.host
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
            c.host
                .storage
                .path(&volid)
                .map(|p| p.display().to_string())
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    Ok(())
}

/// `bwlimit` and the disk import (`import_start`, `import_status`).
fn add_transfer_fns(lua: &Lua, t: &Table) -> mlua::Result<()> {
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
                    c.host
                        .allows(&c.authid, &format!("/storage/{s}"), "Datastore.Allocate")
                }) && storages.iter().any(Option::is_some);
                if let (Some(o), true) = (override_kib, may_exceed) {
                    return Ok(if o == 0 { None } else { Some(o) });
                }
                Ok(c.host.storage.bwlimit(&operation, &storages, override_kib))
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
    Ok(())
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
    c.host
        .check_storage_for_images(&c.authid, &storage)
        .map_err(|e| fail(e.to_string()))?;
    let stream_format = crate::storage::import::choose_stream_format(
        &*c.host.storage,
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
    c.host
        .storage
        .check_import(&req)
        .map_err(|e| fail(e.to_string()))?;
    let socket = c.host.cfg.run_dir.join(format!("{}.storage", c.vmid));
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
        Arc::clone(&c.host.storage),
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
    c.host.metrics.import_started();
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
            if let Err(e) = c.host.storage.check_untrusted(&volid).await {
                let msg = e.to_string();
                c.host.metrics.import_failed(import_failure::REJECTED);
                c.warn(&format!("imported image '{volid}' rejected: {msg}"));
                if c.host.storage.free(&volid).await.is_ok() {
                    c.record(|r| r.volumes.retain(|v| v != &volid)).await?;
                }
                return Ok(json!({"status": "error", "msg": msg}));
            }
            c.host.metrics.import_completed();
            c.info(&format!("successfully imported '{volid}'"));
            json!({"status": "complete", "volid": volid})
        }
        Err(msg) => {
            c.record(|r| r.import_running = false).await?;
            c.host.metrics.import_failed(import_failure_reason(&msg));
            c.warn(&format!("disk import failed: {msg}"));
            json!({"status": "error", "msg": msg})
        }
    })
}
