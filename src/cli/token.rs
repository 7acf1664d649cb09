//! API tokens from the command line: the initial token `serve` creates on a node without
//! any (full access on `/`, shown once and kept in `{data}/priv/initial-token`), and
//! `token create`, which resolves `--role` or `--privs` into privileges. The token store
//! and ACL checks themselves are the library's (`mtunnel::auth`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;

use super::{TokenCreateArgs, load_config};
use mtunnel::auth::acl::{self, Acl, AclEntry};
use mtunnel::node::Node;

/// On a node without tokens: creates `root@pam!mtunnel` with full access, stores its header
/// in `{data}/priv/initial-token` (0600) and returns the header and that path.
pub fn bootstrap_initial(node: &Node) -> anyhow::Result<Option<(String, PathBuf)>> {
    if !node.tokens.is_empty() {
        return Ok(None);
    }
    let header = node.tokens.create(
        "root@pam!mtunnel",
        full_access(),
        Some("initial token".into()),
    )?;
    let path = node.cfg.priv_dir().join("initial-token");
    mtunnel::util::write_atomic(&path, format!("{header}\n").as_bytes(), 0o600)?;
    Ok(Some((header, path)))
}

fn full_access() -> Acl {
    Acl {
        entries: vec![AclEntry {
            path: "/".into(),
            privs: acl::ALL_PRIVILEGES.iter().map(|p| p.to_string()).collect(),
            propagate: true,
        }],
    }
}

/// The privileges `--role` or `--privs` name (none when neither is given).
fn resolve_privs(role: Option<&str>, privs: &[String]) -> anyhow::Result<BTreeSet<String>> {
    Ok(match (role, privs.is_empty()) {
        (Some(role), _) => acl::role_privileges(role)
            .with_context(|| format!("unknown role '{role}'"))?
            .into_iter()
            .map(str::to_string)
            .collect(),
        (None, false) => privs
            .iter()
            .map(|p| {
                acl::known_privilege(p.trim())
                    .map(str::to_string)
                    .with_context(|| {
                        format!(
                            "unknown privilege '{p}' (known: {})",
                            acl::ALL_PRIVILEGES.join(", ")
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()?,
        (None, true) => BTreeSet::new(),
    })
}

/// `mtunnel token create`: creates (or replaces) a token and prints its header once.
pub fn create(args: TokenCreateArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.node, None)?;
    let privs = resolve_privs(args.role.as_deref(), &args.privs)?;
    if privs.is_empty() {
        eprintln!("note: the token has no privileges; grant some with --role or --privs");
    }
    mtunnel::util::ensure_dir(&cfg.priv_dir(), 0o700)?;
    let store = mtunnel::auth::TokenStore::open(&cfg.priv_dir())?;
    let acl = Acl {
        entries: vec![AclEntry {
            path: args.path,
            privs,
            propagate: true,
        }],
    };
    let header = if args.secret_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| anyhow::anyhow!("reading the secret from stdin: {e}"))?;
        store.create_with_secret(&args.authid, acl, None, line.trim())?
    } else {
        store.create(&args.authid, acl, None)?
    };
    println!("{header}");
    Ok(())
}
