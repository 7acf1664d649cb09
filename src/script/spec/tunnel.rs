//! Tunnels as a spec sees them: `t:open` opens one the real way and returns an object
//! whose methods send command lines over its control socket; the `t` natives.

use super::*;

type Io = (BufReader<OwnedReadHalf>, OwnedWriteHalf);

pub(super) struct TunnelConn {
    /// What the tunnel's node gives its tunnel layer (task logs, settings).
    svc: crate::tunnel::Services,
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
    pub(super) async fn close(&self) -> Result<String, String> {
        drop(self.io.lock().await.take());
        let start = tokio::time::Instant::now();
        while self.svc.tasks.is_running(&self.upid) {
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
            .svc
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
            let r = match this.0.svc.tasks.read_log(&this.0.upid, 0, usize::MAX) {
                Some((lines, _)) => lua
                    .create_sequence_from(lines.into_iter().map(|(_, l)| l))
                    .map_err(|e| clean_error(&e))
                    .and_then(|t| one(lua, t)),
                None => Err("no task log".into()),
            };
            pack(lua, r)
        });
        methods.add_async_method("connect", |lua, this, path: String| {
            let run_dir = this.0.svc.host.cfg.run_dir.clone();
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

pub(super) fn natives(lua: &Lua, current: &Current) -> mlua::Result<Table> {
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
            svc: node.tunnel_services(),
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
