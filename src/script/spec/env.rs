//! A spec case's temporary node: its directories, config, scripted backend, tokens and
//! tunnel layer, made on the case's first `t:open` or `t:node`.

use super::*;

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

pub(super) struct CaseEnv {
    lua: Lua,
    /// The handlers directory under test.
    dir: Option<PathBuf>,
    tmp: TempDir,
    node: Mutex<Option<Arc<Node>>>,
    /// The node's tunnel layer (with the Lua handlers), made with the node.
    layer: Mutex<Option<Arc<crate::tunnel::Tunnels>>>,
    backend: Mutex<Option<Arc<ScriptedBackend>>>,
    pub(super) tunnels: Mutex<Vec<Arc<TunnelConn>>>,
    tokens: AtomicU32,
}

pub(super) const NODE_KEYS: &[&str] = &["storages", "bridges", "backend", "handlers"];

impl CaseEnv {
    pub(super) fn new(lua: &Lua, dir: Option<PathBuf>) -> std::io::Result<CaseEnv> {
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
    pub(super) fn node(&self, opts: Option<&Table>) -> Result<Arc<Node>, String> {
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
            node.tunnel_services(),
            Arc::new(crate::script::handler::lua_handler),
        );
        *self.layer.lock().unwrap_or_else(|e| e.into_inner()) = Some(layer);
        Ok(node)
    }

    /// The tunnel layer of the case's node (made by [`CaseEnv::node`]).
    pub(super) fn layer(&self) -> Result<Arc<crate::tunnel::Tunnels>, String> {
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
    pub(super) fn token_for(&self, node: &Node, privs: LuaValue) -> Result<String, String> {
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

    pub(super) fn backend(&self) -> Option<Arc<ScriptedBackend>> {
        self.backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes every tunnel of the case (running their cleanup) and drops the node.
    pub(super) async fn teardown(&self, lua: &Lua) -> Result<(), String> {
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

pub(super) fn api_error_text(e: &crate::error::Error) -> String {
    match e {
        crate::error::Error::Param(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}
