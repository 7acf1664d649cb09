//! An endpoint as data, and the one function that runs every endpoint (proxmox-backup's
//! `#[api]` + `Router` are the model). An [`Endpoint`] declares what the API checks before
//! any work is done: its parameters (a [`crate::schema`] table, plus [`Endpoint::formats`]
//! the schema language does not know), its path parameters, the privilege a token needs
//! ([`Access`]) and where that check stands among the parameter checks ([`Precedence`]).
//! [`route`] pairs an endpoint with a typed handler, `async fn(Call<Args>) -> Result<_,
//! Error>`: it refuses undeclared parameters, checks the path, the privilege and the
//! parameters in the declared order with PVE's texts (so the error that wins is the one
//! PVE's clients expect), deserializes the handler's `Args` and renders the outcome in the
//! request's format. A handler only checks what depends on the data it reads.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{MethodFilter, MethodRouter};
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};
use serde_json::{Map, Value};

use super::AppState;
use super::reply::{Data, render};
use super::request::{ApiReq, Params, Props};
use crate::error::Error;
use crate::task::Upid;

/// What an endpoint takes and who may call it.
pub(super) struct Endpoint {
    /// Query and body parameters (path parameters apart), built per request (a few
    /// entries; requests that reach an endpoint are rare next to the bytes of a tunnel).
    pub params: fn() -> Props,
    /// `(parameter, check)` for formats the schema language does not know; a check returns
    /// PVE's text for a bad value. A failed schema check of the same parameter wins.
    pub formats: &'static [(&'static str, FormatCheck)],
    /// The path parameters, checked in this order once no undeclared parameter is left.
    pub path: &'static [PathParam],
    pub access: Access,
    pub precedence: Precedence,
}

impl Endpoint {
    /// No parameters, no path parameters, any token: what an endpoint declares overrides this.
    pub const PLAIN: Endpoint = Endpoint {
        params: Props::new,
        formats: &[],
        path: &[],
        access: Access::Token,
        precedence: Precedence::PrivilegeFirst,
    };
}

/// PVE's text for a value that does not have a format, if it does not.
pub(super) type FormatCheck = fn(&str) -> Option<String>;

/// A path parameter and how it is checked.
#[derive(Debug, Clone, Copy)]
pub(super) enum PathParam {
    /// `{node}`: this node's name, or `localhost`.
    Node,
    /// `{vmid}`: PVE's `pve-vmid`; the handler gets a number.
    Vmid,
    /// `{upid}`: a task id, parsed.
    Upid,
    /// Taken as it is (`{storage}`, `{cputype}`): the privilege or the data decides.
    Text(&'static str),
}

/// The privilege a token needs. In paths, `{node}` is this node's name and `{vmid}`,
/// `{storage}` the path's values.
#[derive(Debug, Clone, Copy)]
pub(super) enum Access {
    /// Any authenticated token: what it sees or may do is decided by the data (its own
    /// tasks and tunnels, a tunnel's ticket).
    Token,
    /// Each `(path, privilege)` in turn; the first one missing is the 403.
    All(&'static [(&'static str, &'static str)]),
    /// One of the privileges on the path (PVE's `any => 1`); the 403 names them all.
    Any(&'static str, &'static [&'static str]),
    /// The owner of the path's task (a user owns its tokens' tasks too), or the privilege
    /// on `/nodes/{node}`.
    TaskOwnerOr(&'static str),
}

/// Where the privilege check stands. Undeclared parameters are always refused first and
/// the path parameters checked next. Which error wins when a request has several faults is
/// wire behaviour that clients see (`tests/api.rs` pins it), so it is declared per
/// endpoint, never left to the order of a handler's lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Precedence {
    /// The privilege before the other parameters' values.
    PrivilegeFirst,
    /// The parameters' values before the privilege.
    ParamsFirst,
}

/// A checked request, as a handler gets it.
pub(super) struct Call<A> {
    pub st: Arc<AppState>,
    pub args: A,
    /// The request (headers and upgrade for the WebSocket route).
    pub req: ApiReq,
}

impl<A> Call<A> {
    pub fn authid(&self) -> &str {
        &self.req.authid
    }
}

/// Arguments of an endpoint without any.
#[derive(Deserialize)]
pub(super) struct NoArgs {}

/// What a handler answers: data in PVE's envelope, or a response of its own (101).
pub(super) enum Reply {
    Data(Data),
    Raw(Response),
}

impl From<Data> for Reply {
    fn from(data: Data) -> Self {
        Reply::Data(data)
    }
}

impl From<Response> for Reply {
    fn from(response: Response) -> Self {
        Reply::Raw(response)
    }
}

/// `GET` on `endpoint`, answered by `handler` once the request passed its checks.
pub(super) fn get<A, F, Fut, R>(
    endpoint: &'static Endpoint,
    handler: F,
) -> MethodRouter<Arc<AppState>>
where
    A: DeserializeOwned + Send + 'static,
    F: Fn(Call<A>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
    R: Into<Reply> + 'static,
{
    route(MethodFilter::GET, endpoint, handler)
}

/// The method router that checks a request against `endpoint` and runs `handler` with
/// its typed arguments.
pub(super) fn route<A, F, Fut, R>(
    method: MethodFilter,
    endpoint: &'static Endpoint,
    handler: F,
) -> MethodRouter<Arc<AppState>>
where
    A: DeserializeOwned + Send + 'static,
    F: Fn(Call<A>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
    R: Into<Reply> + 'static,
{
    axum::routing::on(
        method,
        move |State(st): State<Arc<AppState>>,
              Path(path): Path<HashMap<String, String>>,
              req: ApiReq| {
            let handler = handler.clone();
            async move {
                let format = req.format;
                let outcome = match endpoint.check::<A>(&st, &path, &req) {
                    Ok(args) => handler(Call { st, args, req }).await.map(Into::into),
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(Reply::Raw(response)) => response,
                    Ok(Reply::Data(data)) => render(format, Ok(data)),
                    Err(e) => render(format, Err(e)),
                }
            }
        },
    )
}

/// The path parameters as checked: by name, for the handler's arguments and the
/// privilege's path, and the task's id when the path names one.
struct PathArgs {
    values: Map<String, Value>,
    upid: Option<Upid>,
}

impl Endpoint {
    /// Every check in the declared order; the handler's arguments if all pass.
    fn check<A: DeserializeOwned>(
        &self,
        st: &AppState,
        raw: &HashMap<String, String>,
        req: &ApiReq,
    ) -> Result<A, Error> {
        let declared = (self.params)();
        req.params.only_declared(&declared)?;
        let path = self.path_args(st, raw)?;
        if self.precedence == Precedence::PrivilegeFirst {
            self.access.check(st, &req.authid, &path)?;
        }
        let mut args = self.checked(&req.params, &declared)?;
        if self.precedence == Precedence::ParamsFirst {
            self.access.check(st, &req.authid, &path)?;
        }
        args.extend(path.values);
        serde_json::from_value(Value::Object(args)).map_err(|e| {
            Error::internal(format!("the checked parameters do not fit the route: {e}"))
        })
    }

    fn path_args(&self, st: &AppState, raw: &HashMap<String, String>) -> Result<PathArgs, Error> {
        let mut out = PathArgs {
            values: Map::new(),
            upid: None,
        };
        let get = |name: &str| raw.get(name).map(String::as_str).unwrap_or("");
        for param in self.path {
            match *param {
                PathParam::Node => {
                    st.node.check_node(get("node"))?;
                    out.values.insert("node".into(), get("node").into());
                }
                PathParam::Vmid => {
                    let vmid = parse_vmid(get("vmid"))?;
                    out.values.insert("vmid".into(), vmid.into());
                }
                PathParam::Upid => {
                    let text = get("upid");
                    let upid = text.parse::<Upid>().map_err(|_| {
                        Error::param("upid", format!("unable to parse worker upid '{text}'"))
                    })?;
                    out.values.insert("upid".into(), text.into());
                    out.upid = Some(upid);
                }
                PathParam::Text(name) => {
                    out.values.insert(name.into(), get(name).into());
                }
            }
        }
        Ok(out)
    }

    /// The schema check and the extra formats, every failing parameter named.
    fn checked(&self, params: &Params, declared: &Props) -> Result<Map<String, Value>, Error> {
        let mut extra = BTreeMap::new();
        for (key, check) in self.formats {
            // `null` counts as absent, as in the schema check.
            let given = params.0.get(*key).filter(|v| !v.is_null());
            if let Some(reason) = given.map(as_text).and_then(|v| check(&v)) {
                extra.insert(key.to_string(), reason);
            }
        }
        match params.checked(declared) {
            Ok(map) if extra.is_empty() => Ok(map),
            Ok(_) => Err(Error::Param(extra)),
            // A failed type check is what PVE reports for a parameter, not its format.
            Err(Error::Param(mut errors)) => {
                for (k, v) in extra {
                    errors.entry(k).or_insert(v);
                }
                Err(Error::Param(errors))
            }
            Err(e) => Err(e),
        }
    }
}

impl Access {
    fn check(self, st: &AppState, authid: &str, path: &PathArgs) -> Result<(), Error> {
        let node = &st.node;
        let at = |template: &str| {
            let mut p = template.replace("{node}", &node.cfg.node);
            for (name, value) in &path.values {
                p = p.replace(&format!("{{{name}}}"), &as_text(value));
            }
            p
        };
        match self {
            Access::Token => Ok(()),
            Access::All(list) => list
                .iter()
                .try_for_each(|(p, privilege)| node.require(authid, &at(p), privilege)),
            Access::Any(p, privileges) => {
                let p = at(p);
                if privileges
                    .iter()
                    .any(|privilege| node.allows(authid, &p, privilege))
                {
                    Ok(())
                } else {
                    Err(Error::permission(&p, &privileges.join("|")))
                }
            }
            Access::TaskOwnerOr(privilege) => match &path.upid {
                Some(upid) if is_owner(authid, &upid.user) => Ok(()),
                _ => node.require(authid, &at("/nodes/{node}"), privilege),
            },
        }
    }
}

/// Whether `authid` counts as the owner of what `owner` opened: the same token, or the
/// user whose token it is (PVE's rule for tasks).
pub(super) fn is_owner(authid: &str, owner: &str) -> bool {
    owner == authid || (!authid.contains('!') && crate::auth::token::token_user(owner) == authid)
}

/// A VMID: 100..=999999999 as PVE's `pve-vmid`.
fn parse_vmid(raw: &str) -> Result<u32, Error> {
    crate::ident::parse_vmid(raw).ok_or_else(|| Error::param("vmid", VMID_FORMAT))
}

const VMID_FORMAT: &str = "invalid format - value does not look like a valid VM ID";

/// The `pve-vmid` format of a query parameter (for [`Endpoint::formats`]).
pub(super) fn vmid_format(value: &str) -> Option<String> {
    (!crate::ident::is_vmid(value)).then(|| VMID_FORMAT.to_string())
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Deserializes a checked string (or number) through `FromStr`: a task id, a VMID given
/// as text.
pub(super) fn parsed<'de, D: Deserializer<'de>, T: FromStr>(d: D) -> Result<T, D::Error> {
    let text = as_text(&Value::deserialize(d)?);
    text.parse()
        .map_err(|_| D::Error::custom(format!("unexpected value '{text}'")))
}

/// [`parsed`] for an optional parameter (use with `#[serde(default)]`).
pub(super) fn parsed_opt<'de, D: Deserializer<'de>, T: FromStr>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => parsed(v).map(Some).map_err(D::Error::custom),
    }
}
