//! The node's tasks: one task's index, status, log and stop, and `GET
//! /nodes/{node}/tasks`, with PVE's parameters and filters (pve-manager
//! `PVE/API2/Tasks.pm`, `node_tasks`): `start`, `limit`, `userfilter` (the user part of
//! the task's owner, a case-insensitive substring), `typefilter`, `vmid`, `errors`,
//! `source` (`archive`: ended tasks, `active`: running ones, `all`: running first),
//! `since`/`until` (start time bounds) and `statusfilter` (`ok`, `warning`, `error`,
//! `unknown`; a running task counts as `unknown`, and `errors` wins over it). `total` is
//! the number of matching tasks, `start` and `limit` page through them.

use axum::routing::MethodFilter;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Areas;
use crate::api::AppState;
use crate::api::endpoint::{
    self, Access, Call, Endpoint, PathParam, is_owner, parsed, parsed_opt, vmid_format,
};
use crate::api::reply::Data;
use crate::error::Error;
use crate::schema::{Prop, props};
use crate::task::{ExitStatus, TaskStatus, Upid};

pub(super) fn routes() -> Areas {
    Areas::new()
        .route("/api2/{fmt}/nodes/{node}/tasks", endpoint::get(&LIST, list))
        .route(
            "/api2/{fmt}/nodes/{node}/tasks/{upid}",
            endpoint::get(&INDEX, index).merge(endpoint::route(MethodFilter::DELETE, &STOP, stop)),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/tasks/{upid}/status",
            endpoint::get(&STATUS, status),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/tasks/{upid}/log",
            endpoint::get(&LOG, log),
        )
}

/// One task: PVE's task visibility is the owner (a user also sees its tokens' tasks), or
/// `Sys.Audit` (`Sys.Modify` to stop) on `/nodes/{node}`, checked before the parameters.
const fn task_endpoint(privilege: &'static str) -> Endpoint {
    Endpoint {
        path: &[PathParam::Node, PathParam::Upid],
        access: Access::TaskOwnerOr(privilege),
        ..Endpoint::PLAIN
    }
}

/// The path of a one-task endpoint.
#[derive(Deserialize)]
struct TaskArgs {
    #[serde(deserialize_with = "parsed")]
    upid: Upid,
}

/// PVE's answer for a well-formed UPID without a task log.
fn task_not_found() -> Error {
    Error::param("upid", "no such task")
}

/// `GET /nodes/{node}/tasks/{upid}`.
static INDEX: Endpoint = task_endpoint("Sys.Audit");

async fn index(call: Call<TaskArgs>) -> Result<Data, Error> {
    let tasks = &call.st.node.tasks;
    tasks.status(&call.args.upid).ok_or_else(task_not_found)?;
    Ok(Data::new(json!([{"name": "log"}, {"name": "status"}])))
}

/// `GET /nodes/{node}/tasks/{upid}/status`.
static STATUS: Endpoint = task_endpoint("Sys.Audit");

async fn status(call: Call<TaskArgs>) -> Result<Data, Error> {
    let tasks = &call.st.node.tasks;
    let status = tasks.status(&call.args.upid).ok_or_else(task_not_found)?;
    Ok(Data::new(status.to_json()))
}

/// `DELETE /nodes/{node}/tasks/{upid}`.
static STOP: Endpoint = task_endpoint("Sys.Modify");

async fn stop(call: Call<TaskArgs>) -> Result<Data, Error> {
    let (tasks, upid) = (&call.st.node.tasks, &call.args.upid);
    tasks.status(upid).ok_or_else(task_not_found)?;
    tasks.request_stop(upid);
    Ok(Data::new(Value::Null))
}

/// `GET /nodes/{node}/tasks/{upid}/log[?start=..][&limit=..][&download=1]`.
static LOG: Endpoint = Endpoint {
    params: || {
        props([
            ("start", Prop::integer().minimum(0).optional()),
            ("limit", Prop::integer().minimum(0).optional()),
            ("download", Prop::boolean().optional()),
        ])
    },
    ..task_endpoint("Sys.Audit")
};

#[derive(Deserialize)]
struct LogArgs {
    #[serde(deserialize_with = "parsed")]
    upid: Upid,
    #[serde(default)]
    start: usize,
    limit: Option<usize>,
    #[serde(default)]
    download: bool,
}

async fn log(call: Call<LogArgs>) -> Result<Data, Error> {
    let args = &call.args;
    let limit = match args.download {
        true => usize::MAX,
        false => args.limit.unwrap_or(50),
    };
    let (lines, total) = (call.st.node.tasks)
        .read_log(&args.upid, args.start, limit)
        .ok_or_else(task_not_found)?;
    let data: Vec<Value> = lines
        .into_iter()
        .map(|(n, t)| json!({"n": n + 1, "t": t}))
        .collect();
    Ok(Data::new(Value::Array(data)).with("total", json!(total)))
}

/// `GET /nodes/{node}/tasks`: every token may list; it sees its own tasks, or all with
/// `Sys.Audit` on `/nodes/{node}`.
static LIST: Endpoint = Endpoint {
    params: || {
        props([
            ("start", Prop::integer().minimum(0).optional()),
            ("limit", Prop::integer().minimum(0).optional()),
            ("userfilter", Prop::string().optional()),
            ("typefilter", Prop::string().optional()),
            ("vmid", Prop::integer().optional()),
            (
                "source",
                Prop::string()
                    .one_of(&["archive", "active", "all"])
                    .optional(),
            ),
            ("errors", Prop::boolean().optional()),
            ("since", Prop::integer().optional()),
            ("until", Prop::integer().optional()),
            ("statusfilter", Prop::string().optional()),
        ])
    },
    formats: &[("vmid", vmid_format), ("statusfilter", status_list_format)],
    path: &[PathParam::Node],
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct ListArgs {
    #[serde(default)]
    start: usize,
    limit: Option<usize>,
    userfilter: Option<String>,
    typefilter: Option<String>,
    #[serde(default, deserialize_with = "parsed_opt")]
    vmid: Option<u32>,
    source: Option<String>,
    #[serde(default)]
    errors: bool,
    since: Option<i64>,
    until: Option<i64>,
    statusfilter: Option<String>,
}

/// PVE's task status types (`PVE::UPID::normalize_status_type`).
const STATUS_TYPES: [&str; 4] = ["ok", "warning", "error", "unknown"];

/// `pve-task-status-type-list`: status types, any case.
fn status_list_format(list: &str) -> Option<String> {
    crate::ident::split_id_list(list)
        .into_iter()
        .find(|s| !STATUS_TYPES.contains(&s.to_lowercase().as_str()))
        .map(|bad| format!("invalid format - invalid status '{bad}'"))
}

async fn list(call: Call<ListArgs>) -> Result<Data, Error> {
    let args = &call.args;
    let filter = Filter::new(&call.st, call.authid(), args);
    let (running, ended): (Vec<_>, Vec<_>) = call
        .st
        .node
        .tasks
        .list()
        .into_iter()
        .partition(|t| t.running);
    // As PVE: the active tasks first, then the archive (each newest first).
    let visible: Vec<TaskStatus> = match args.source.as_deref().unwrap_or("archive") {
        "active" => running,
        "all" => running.into_iter().chain(ended).collect(),
        _ => ended,
    }
    .into_iter()
    .filter(|t| filter.matches(t))
    .collect();
    let total = visible.len();
    let data: Vec<Value> = visible
        .into_iter()
        .skip(args.start)
        .take(args.limit.unwrap_or(50))
        .map(|s| entry(&s))
        .collect();
    Ok(Data::new(Value::Array(data)).with("total", json!(total)))
}

/// Which tasks a request lists.
struct Filter {
    /// `Sys.Audit` on `/nodes/{node}`: every task, not only the token's own.
    audit: bool,
    authid: String,
    /// Lower case.
    user: Option<String>,
    kind: Option<String>,
    vmid: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    /// The status types listed ([`STATUS_TYPES`]).
    statuses: Vec<String>,
}

impl Filter {
    fn new(st: &AppState, authid: &str, args: &ListArgs) -> Self {
        let node = &st.node.cfg.node;
        let statuses = match (args.errors, &args.statusfilter) {
            (true, _) => vec!["warning", "error", "unknown"],
            (false, Some(list)) => crate::ident::split_id_list(list)
                .into_iter()
                .filter_map(|s| STATUS_TYPES.into_iter().find(|t| s.eq_ignore_ascii_case(t)))
                .collect(),
            (false, None) => STATUS_TYPES.to_vec(),
        };
        // PVE ignores an empty filter (Perl's false).
        let given = |f: &Option<String>| f.clone().filter(|f| !f.is_empty());
        Filter {
            audit: st
                .node
                .allows(authid, &format!("/nodes/{node}"), "Sys.Audit"),
            authid: authid.to_string(),
            user: given(&args.userfilter).map(|f| f.to_lowercase()),
            kind: given(&args.typefilter),
            vmid: args.vmid.map(|v| v.to_string()),
            since: args.since,
            until: args.until,
            statuses: statuses.into_iter().map(str::to_string).collect(),
        }
    }

    fn matches(&self, t: &TaskStatus) -> bool {
        let u = &t.upid;
        // PVE filters on the user part of a token id, ignoring case.
        let user = u.token_split().map(|(user, _)| user).unwrap_or(&u.user);
        let start = i64::try_from(u.starttime).unwrap_or(i64::MAX);
        (self.audit || is_owner(&self.authid, &u.user))
            && self
                .user
                .as_deref()
                .is_none_or(|f| user.to_lowercase().contains(f))
            && self.kind.as_deref().is_none_or(|k| u.kind == k)
            && self.vmid.as_deref().is_none_or(|v| u.id == v)
            && self.since.is_none_or(|s| start >= s)
            && self.until.is_none_or(|s| start <= s)
            && self.statuses.iter().any(|s| s == status_type(t))
    }
}

/// PVE's `normalize_status_type`: a running task (no status yet) is `unknown`.
fn status_type(t: &TaskStatus) -> &'static str {
    match &t.exit {
        Some(ExitStatus::Ok) => "ok",
        Some(ExitStatus::Warnings(_)) => "warning",
        Some(ExitStatus::Error(msg)) if msg != "unexpected status" => "error",
        Some(ExitStatus::Error(_)) | Some(ExitStatus::Unknown) | None => "unknown",
    }
}

/// One task as PVE lists it: the UPID's fields, `status` (`RUNNING` while it runs) and
/// `endtime` once ended.
fn entry(s: &TaskStatus) -> Value {
    let mut m = s.upid.to_json();
    if let Some(exit) = &s.exit {
        m.insert("status".into(), json!(exit.as_text()));
    } else if s.running {
        m.insert("status".into(), json!("RUNNING"));
    }
    if let Some(end) = s.endtime {
        m.insert("endtime".into(), json!(end));
    }
    Value::Object(m)
}
