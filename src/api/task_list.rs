//! `GET /nodes/{node}/tasks`, with PVE's parameters and filters (pve-manager
//! `PVE/API2/Tasks.pm`, `node_tasks`): `start`, `limit`, `userfilter` (the user part of
//! the task's owner, a case-insensitive substring), `typefilter`, `vmid`, `errors`,
//! `source` (`archive`: ended tasks, `active`: running ones, `all`: running first),
//! `since`/`until` (start time bounds) and `statusfilter` (`ok`, `warning`, `error`,
//! `unknown`; a running task counts as `unknown`, and `errors` wins over it). `total` is
//! the number of matching tasks, `start` and `limit` page through them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::AppState;
use super::reply::Data;
use super::request::{ApiReq, Props};
use super::routes::{finish, flag, path_param, text};
use crate::error::Error;
use crate::schema::{Prop, props};
use crate::task::{ExitStatus, TaskStatus};

static PARAMS: LazyLock<Props> = LazyLock::new(|| {
    props([
        ("start", Prop::integer().minimum(0).optional()),
        ("limit", Prop::integer().minimum(0).optional()),
        ("userfilter", Prop::string().optional()),
        ("typefilter", Prop::string().optional()),
        // `pve-vmid`: checked in `checked_params`, with PVE's format error.
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
        // `pve-task-status-type-list`: checked in `checked_params`.
        ("statusfilter", Prop::string().optional()),
    ])
});

/// PVE's task status types (`PVE::UPID::normalize_status_type`).
const STATUS_TYPES: [&str; 4] = ["ok", "warning", "error", "unknown"];

pub(super) async fn task_list(
    State(st): State<Arc<AppState>>,
    Path(p): Path<HashMap<String, String>>,
    req: ApiReq,
) -> Response {
    let r = (|| {
        req.params.only_declared(&PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let params = checked_params(&req)?;
        let filter = Filter::new(&st, &req.authid, &params);
        let start = count(&params, "start").unwrap_or(0);
        let limit = count(&params, "limit").unwrap_or(50);
        let (running, ended): (Vec<_>, Vec<_>) =
            st.node.tasks.list().into_iter().partition(|t| t.running);
        // As PVE: the active tasks first, then the archive (each newest first).
        let visible: Vec<TaskStatus> = match filter.source.as_str() {
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
            .skip(start)
            .take(limit)
            .map(|s| entry(&s))
            .collect();
        Ok(Data::new(Value::Array(data)).with("total", json!(total)))
    })();
    finish(&p, &req, r)
}

/// The schema check, plus the two formats it does not know (`pve-vmid` on an integer,
/// `pve-task-status-type-list`), every failing parameter named as PVE names it.
fn checked_params(req: &ApiReq) -> Result<Map<String, Value>, Error> {
    let raw = &req.params.0;
    let mut extra = BTreeMap::new();
    if let Some(vmid) = raw.get("vmid").map(as_text)
        && !crate::ident::is_vmid(&vmid)
    {
        let msg = "invalid format - value does not look like a valid VM ID";
        extra.insert("vmid".to_string(), msg.to_string());
    }
    if let Some(list) = raw.get("statusfilter").map(as_text) {
        let bad = crate::ident::split_id_list(&list)
            .into_iter()
            .find(|s| !STATUS_TYPES.contains(&s.to_lowercase().as_str()));
        if let Some(bad) = bad {
            let msg = format!("invalid format - invalid status '{bad}'");
            extra.insert("statusfilter".to_string(), msg);
        }
    }
    match req.params.checked(&PARAMS) {
        Ok(params) if extra.is_empty() => Ok(params),
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

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A checked `integer` parameter with `minimum` 0.
fn count(params: &Map<String, Value>, key: &str) -> Option<usize> {
    params.get(key).and_then(Value::as_u64).map(|n| n as usize)
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
    source: String,
}

impl Filter {
    fn new(st: &AppState, authid: &str, params: &Map<String, Value>) -> Self {
        let node = &st.node.cfg.node;
        let int = |key: &str| params.get(key).and_then(Value::as_i64);
        let statuses = match (flag(params, "errors"), text(params, "statusfilter")) {
            (true, _) => vec!["warning", "error", "unknown"],
            (false, Some(list)) => crate::ident::split_id_list(&list)
                .into_iter()
                .filter_map(|s| STATUS_TYPES.into_iter().find(|t| s.eq_ignore_ascii_case(t)))
                .collect(),
            (false, None) => STATUS_TYPES.to_vec(),
        };
        Filter {
            audit: st
                .node
                .allows(authid, &format!("/nodes/{node}"), "Sys.Audit"),
            authid: authid.to_string(),
            // PVE ignores an empty filter (Perl's false).
            user: text(params, "userfilter")
                .filter(|f| !f.is_empty())
                .map(|f| f.to_lowercase()),
            kind: text(params, "typefilter").filter(|k| !k.is_empty()),
            vmid: int("vmid").map(|v| v.to_string()),
            since: int("since"),
            until: int("until"),
            statuses: statuses.into_iter().map(str::to_string).collect(),
            source: text(params, "source").unwrap_or_else(|| "archive".into()),
        }
    }

    fn matches(&self, t: &TaskStatus) -> bool {
        let u = &t.upid;
        // PVE filters on the user part of a token id, ignoring case.
        let user = u.token_split().map(|(user, _)| user).unwrap_or(&u.user);
        let start = i64::try_from(u.starttime).unwrap_or(i64::MAX);
        (self.audit || super::status_page::is_owner(&self.authid, &u.user))
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
