//! Privileges, roles and ACL evaluation as in PVE: an ACL entry grants privileges on a path;
//! with `propagate` it also applies below that path, and the most specific path that has an
//! entry for the token decides (a deeper entry overrides inherited privileges).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The privileges this node checks (a subset of PVE's).
pub const ALL_PRIVILEGES: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.Audit",
    "Sys.Audit",
    "Sys.Incoming",
    "Sys.Modify",
    "VM.Allocate",
    "VM.Audit",
    "VM.Config.Disk",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.Migrate",
    "VM.PowerMgmt",
];

pub type Privilege = &'static str;

/// Expands a PVE role name to its privileges (the roles a migration target needs).
pub fn role_privileges(role: &str) -> Option<Vec<&'static str>> {
    let privs: &[&str] = match role {
        "Administrator" => ALL_PRIVILEGES,
        "NoAccess" => &[],
        "PVEAuditor" => &["Datastore.Audit", "Sys.Audit", "VM.Audit"],
        "PVEDatastoreUser" => &["Datastore.AllocateSpace", "Datastore.Audit"],
        "PVEVMAdmin" => &[
            "VM.Allocate",
            "VM.Audit",
            "VM.Config.Disk",
            "VM.Config.Network",
            "VM.Config.Options",
            "VM.Migrate",
            "VM.PowerMgmt",
        ],
        // What a remote-migration token needs on `/`: accept incoming VMs and place disks,
        // and read `/cluster/status` (Sys.Audit), where every source learns the node name.
        "PVEMigrationTarget" => &[
            "Datastore.AllocateSpace",
            "Datastore.Audit",
            "Sys.Audit",
            "Sys.Incoming",
            "VM.Allocate",
            "VM.Audit",
            "VM.Config.Disk",
            "VM.Config.Network",
            "VM.Config.Options",
            "VM.PowerMgmt",
        ],
        _ => return None,
    };
    Some(privs.to_vec())
}

/// Checks a privilege name against the known set, returning its static form.
pub fn known_privilege(name: &str) -> Option<&'static str> {
    ALL_PRIVILEGES.iter().copied().find(|p| *p == name)
}

/// One ACL entry: privileges on `path`, optionally inherited by the paths below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclEntry {
    pub path: String,
    pub privs: BTreeSet<String>,
    #[serde(default = "yes")]
    pub propagate: bool,
}

fn yes() -> bool {
    true
}

/// The ACL of one token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acl {
    pub entries: Vec<AclEntry>,
}

impl Acl {
    /// Privileges effective on `path` (e.g. `/vms/100`): the entry on the deepest ancestor
    /// (or the path itself) wins, as in PVE.
    pub fn privileges_on(&self, path: &str) -> BTreeSet<String> {
        let target = normalize_acl_path(path);
        let mut best: Option<(usize, BTreeSet<String>)> = None;
        for entry in &self.entries {
            let entry_path = normalize_acl_path(&entry.path);
            let applies =
                entry_path == target || (entry.propagate && is_ancestor(&entry_path, &target));
            if !applies {
                continue;
            }
            let depth = path_depth(&entry_path);
            match &mut best {
                Some((d, privs)) if *d == depth => privs.extend(entry.privs.iter().cloned()),
                Some((d, _)) if *d > depth => {}
                _ => best = Some((depth, entry.privs.clone())),
            }
        }
        best.map(|(_, p)| p).unwrap_or_default()
    }

    pub fn allows(&self, path: &str, privilege: &str) -> bool {
        self.privileges_on(path).contains(privilege)
    }

    /// What `GET /access/permissions` reports for `path`: each effective privilege with
    /// the propagate flag of the entry it comes from (PVE's `{priv: 0|1}` map).
    pub fn permissions_on(&self, path: &str) -> BTreeMap<String, bool> {
        let target = normalize_acl_path(path);
        let privs = self.privileges_on(path);
        let mut out = BTreeMap::new();
        for entry in &self.entries {
            let entry_path = normalize_acl_path(&entry.path);
            if entry_path != target && !(entry.propagate && is_ancestor(&entry_path, &target)) {
                continue;
            }
            for p in entry.privs.iter().filter(|p| privs.contains(*p)) {
                let flag = out.entry(p.clone()).or_insert(false);
                *flag |= entry.propagate;
            }
        }
        out
    }

    /// The paths that have entries, normalized and sorted.
    pub fn paths(&self) -> BTreeSet<String> {
        self.entries
            .iter()
            .map(|e| normalize_acl_path(&e.path))
            .collect()
    }
}

fn normalize_acl_path(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

fn is_ancestor(ancestor: &str, path: &str) -> bool {
    ancestor == "/" || path.starts_with(&format!("{ancestor}/"))
}

fn path_depth(path: &str) -> usize {
    path.split('/').filter(|p| !p.is_empty()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, privs: &[&str], propagate: bool) -> AclEntry {
        AclEntry {
            path: path.into(),
            privs: privs.iter().map(|s| s.to_string()).collect(),
            propagate,
        }
    }

    #[test]
    fn root_entry_propagates_to_children() {
        let acl = Acl {
            entries: vec![entry("/", &["VM.Allocate"], true)],
        };
        assert!(acl.allows("/vms/100", "VM.Allocate"));
        assert!(acl.allows("/", "VM.Allocate"));
        assert!(!acl.allows("/vms/100", "Sys.Incoming"));
    }

    #[test]
    fn non_propagating_entry_applies_only_to_its_path() {
        let acl = Acl {
            entries: vec![entry("/vms", &["VM.Allocate"], false)],
        };
        assert!(acl.allows("/vms", "VM.Allocate"));
        assert!(!acl.allows("/vms/100", "VM.Allocate"));
    }

    #[test]
    fn deeper_entry_overrides_inherited_privileges() {
        let acl = Acl {
            entries: vec![
                entry("/", &["VM.Allocate", "Sys.Incoming"], true),
                entry("/vms/200", &[], true),
            ],
        };
        assert!(acl.allows("/vms/100", "VM.Allocate"));
        assert!(!acl.allows("/vms/200", "VM.Allocate"));
        // `/vms/200` is no ancestor of `/vms/2000`: the root entry still decides there.
        assert!(acl.allows("/vms/2000", "VM.Allocate"));
    }

    #[test]
    fn roles_expand() {
        assert!(
            role_privileges("Administrator")
                .unwrap()
                .contains(&"Sys.Incoming")
        );
        assert!(role_privileges("nope").is_none());
    }
}
