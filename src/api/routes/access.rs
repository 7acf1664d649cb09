//! The `/access` area: `GET /access/permissions`, which Proxmox Datacenter Manager and
//! `qm remote-migrate` read before a migration, answered as PVE does for the calling token.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Areas;
use crate::api::endpoint::{self, Call, Endpoint};
use crate::api::reply::Data;
use crate::error::Error;
use crate::schema::{Prop, props};

pub(super) fn routes() -> Areas {
    Areas::new().route(
        "/api2/{fmt}/access/permissions",
        endpoint::get(&PERMISSIONS, permissions),
    )
}

/// `GET /access/permissions[?path=..][&userid=..]` for the calling token: `{path: {priv:
/// propagate}}` for `path`, or for every path its ACL names. Asking about another user
/// needs `Sys.Audit` on `/access` (checked in the handler: it depends on `userid`).
static PERMISSIONS: Endpoint = Endpoint {
    params: || {
        props([
            ("path", Prop::string().optional()),
            ("userid", Prop::string().optional()),
        ])
    },
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct PermissionsArgs {
    path: Option<String>,
    userid: Option<String>,
}

/// The paths PVE always reports (when the user has anything there).
const TOP_LEVEL_PATHS: [&str; 8] = [
    "/",
    "/access",
    "/access/groups",
    "/nodes",
    "/pool",
    "/sdn",
    "/storage",
    "/vms",
];

async fn permissions(call: Call<PermissionsArgs>) -> Result<Data, Error> {
    let (node, authid) = (&call.st.node, call.authid());
    if let Some(user) = &call.args.userid
        && user != authid
    {
        node.require(authid, "/access", "Sys.Audit")?;
        return Err(Error::param(
            "userid",
            format!("no such user or token '{user}' on this node"),
        ));
    }
    let acl = node.tokens.acl(authid);
    let asked = &call.args.path;
    let paths: Vec<String> = match asked {
        Some(path) => vec![path.clone()],
        // As PVE's `get_effective_permissions`: the top-level paths and every path the
        // ACL names, each with what the token has there (inherited included).
        None => TOP_LEVEL_PATHS
            .iter()
            .map(|p| p.to_string())
            .chain(acl.paths())
            .collect(),
    };
    let mut out = Map::new();
    for path in paths {
        let privs: Map<String, Value> = acl
            .permissions_on(&path)
            .into_iter()
            .map(|(k, propagate)| (k, json!(u8::from(propagate))))
            .collect();
        // Without `path`, paths where the token has nothing are left out.
        if asked.is_some() || !privs.is_empty() {
            out.insert(path, Value::Object(privs));
        }
    }
    Ok(Data::new(Value::Object(out)))
}
