//! The remote side of a migration: the target's API client, the tunnel's control connection
//! with its commands, and the forwards of local sockets to the target's. It knows nothing of
//! the phases; they decide which command to send when.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{TUNNEL_VERSION, as_u64};
use crate::client::http::{ApiClient, encode_segment};
use crate::client::tunnel::{Control, Endpoint, Forward, forward};

/// The remote side while a migration runs.
pub(super) struct Remote {
    pub(super) api: ApiClient,
    pub(super) control: Control,
    pub(super) node: String,
    pub(super) tvmid: u32,
    pub(super) base_url: String,
    pub(super) forwards: Vec<Forward>,
    /// `resume` was sent: the target VM may run as the only live copy from here on.
    pub(super) resume_sent: bool,
    /// The RAM migration completed: the source VM stays paused until the target resumed
    /// its copy, or the migration is aborted (then the source VM runs on).
    pub(super) ram_done: bool,
    /// Most multifd channels the target accepts, from its `version` reply (`None`: it did
    /// not announce multifd, e.g. a PVE node: one stream only).
    pub(super) multifd_max: Option<u32>,
    /// The target accepts zstd-compressed multifd channels (`mtunnel-features`).
    pub(super) zstd_offered: bool,
    /// The target accepts `postcopy` in `start` (`mtunnel-features`).
    pub(super) postcopy_offered: bool,
    /// The target's `resume` succeeded before the switch to postcopy: it committed the VM
    /// and runs it as soon as its state arrives, so phase 3 does not resume it again.
    pub(super) resumed_early: bool,
    /// The RAM migration switched to postcopy: from then on the guest's memory is split
    /// between both hosts until it completes.
    pub(super) postcopy: bool,
    /// The target takes a replica over for a migration (`mtunnel-features` `cutover`).
    pub(super) cutover_offered: bool,
}

impl Remote {
    fn endpoint(&self, url: String) -> Endpoint {
        Endpoint {
            url,
            headers: vec![("Authorization".into(), self.api.token_header().to_string())],
            fingerprint: Some(self.api.fingerprint().to_string()),
        }
    }

    pub(super) async fn cmd(&self, cmd: Value, secs: u64) -> anyhow::Result<Value> {
        Ok(self
            .control
            .command(&cmd, Duration::from_secs(secs))
            .await?)
    }

    /// Forwards local `local` to the remote socket `remote`, with `prepared` WebSockets
    /// opened right away for the first connections (see [`forward`]).
    pub(super) fn forward(
        &mut self,
        local: &Path,
        remote: &str,
        prepared: usize,
    ) -> anyhow::Result<&Forward> {
        let url = format!(
            "{}/mtunnelwebsocket?socket={}&",
            self.base_url,
            encode_segment(remote)
        );
        let f = forward(
            &self.control,
            self.endpoint(url),
            local,
            remote.to_string(),
            prepared,
        )?;
        self.forwards.push(f);
        Ok(self.forwards.last().expect("just pushed"))
    }

    /// `e` behind the break of the first of the forwards on `locals` whose WebSocket broke
    /// (the cause an operator can act on; QEMU then only saw a broken pipe), or `e` as is.
    pub(super) fn name_break(
        &self,
        locals: &[&Path],
        stream: &str,
        e: anyhow::Error,
    ) -> anyhow::Error {
        let broken = (self.forwards.iter())
            .filter(|f| locals.contains(&f.local.as_path()))
            .find_map(|f| Some((f.peer.as_str(), f.broken()?)));
        match broken {
            Some((peer, why)) => anyhow::anyhow!(
                "the {stream}'s WebSocket to {peer} broke: {why}; the source QEMU then reported: {e:#}"
            ),
            None => e,
        }
    }

    /// The `version` check: the target must speak our protocol version. Then which
    /// extensions it offers (`mtunnel-features`, sent right behind `version`: it only
    /// reads, a PVE target answers "unknown command" and a failed `version` ends the
    /// migration whatever it answered). A target without it gets upstream's flow.
    pub(super) async fn check_version(&mut self) -> anyhow::Result<()> {
        // `join!` polls `version` first, and a command is queued on its first poll.
        let features = json!({"cmd": "mtunnel-features"});
        let (reply, features) = tokio::join!(
            self.cmd(json!({"cmd": "version"}), 10),
            self.control.request(&features, Duration::from_secs(10))
        );
        let reply = reply?;
        let api = reply
            .get("api")
            .and_then(as_u64)
            .context("version reply without api")?;
        let age = reply.get("age").and_then(as_u64).unwrap_or(0);
        if TUNNEL_VERSION < api.saturating_sub(age) {
            bail!("Remote tunnel endpoint not compatible, upgrade required");
        }
        if TUNNEL_VERSION > api {
            bail!("Remote tunnel endpoint too old, upgrade required");
        }
        let features = features
            .ok()
            .filter(|f| f.get("success").and_then(Value::as_bool) == Some(true))
            .unwrap_or(Value::Null);
        self.multifd_max = features
            .get("multifd")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 1);
        self.zstd_offered = features
            .get("compression")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|c| c == "zstd"));
        self.postcopy_offered = features.get("postcopy").and_then(Value::as_bool) == Some(true);
        self.cutover_offered = features.get("cutover").and_then(Value::as_u64) == Some(1);
        Ok(())
    }
}
