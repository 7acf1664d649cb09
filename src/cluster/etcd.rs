//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, ..., keys and values base64): the few calls the
//! cluster registry needs, on the hyper client and rustls the crate already has.
//!
//! It fails over as etcd's own clients do: one logical call is bounded by `timeout_secs`;
//! a try on one endpoint that has not answered within a shorter per-endpoint deadline (at
//! most the lease keepalive interval) is left open while the next endpoint is tried, and
//! the first answer wins (etcd electing a new leader answers late, a hung member never);
//! a refused connection or a 5xx moves on at once, and a failed endpoint is tried again
//! after a short pause, until the bound. A 4xx is etcd's answer and ends the call. The
//! endpoint that answered last is tried first; one that failed is marked unhealthy for a
//! while and tried only after the healthy ones. So a hung member (it accepts connections
//! and answers nothing) costs at most one per-endpoint deadline, never a whole call, and
//! the lease is kept alive through any healthy member. Replies are capped in size.
//!
//! Why not the gRPC client crates (etcd-client): they generate their protobuf code at build
//! time with `protoc`, which a fresh machine does not have, and pull in tonic/prost and a
//! second HTTP/2 stack; the few JSON calls here need none of it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::ClusterConfig;
use crate::net::stream::{Stream, connect_plain};

/// One etcd client URL.
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    tls: bool,
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("etcd endpoint '{url}' is not http:// or https://");
        };
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .with_context(|| format!("etcd endpoint '{url}' needs host:port"))?;
        Ok(Endpoint {
            url: url.trim_end_matches('/').to_string(),
            tls,
            host: host.to_string(),
            port,
        })
    }
}

/// A key as etcd returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// The largest etcd reply read: a bigger one is an error, not an allocation (a range of
/// 100 000 VMID entries is about 20 MiB).
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// How long an endpoint that failed a try stays behind the healthy ones (unless it answers
/// meanwhile, as the last resort).
const UNHEALTHY_FOR: Duration = Duration::from_secs(30);

/// How long an endpoint that failed a try waits before this call tries it again (e.g.
/// refusals during an etcd leader election), so that quick failures do not spin.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// The client: endpoints, TLS settings, the time bounds and what it learnt of the endpoints.
pub struct Etcd {
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<ClientConfig>>,
    /// Bound on one logical call, failover included (`timeout_secs`).
    timeout: Duration,
    /// Per-endpoint deadline: a try with no answer after it has the next endpoint tried too.
    attempt: Duration,
    /// The endpoint that answered last: tried first next time.
    preferred: AtomicUsize,
    /// Per endpoint: failed a try at this instant (None: healthy as far as we know).
    failed_at: Mutex<Vec<Option<Instant>>>,
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One logical call in progress: the endpoints in the order to try, how many tries each
/// has in flight and since when the latest, when a failed one may be tried again, and the
/// last failure of each.
struct Call<'a> {
    etcd: &'a Etcd,
    order: Vec<usize>,
    cursor: usize,
    busy: Vec<usize>,
    latest: Vec<Instant>,
    retry_at: Vec<Instant>,
    errors: Vec<Option<String>>,
    /// Per endpoint: its last try found no connection.
    unreachable: Vec<bool>,
}

impl<'a> Call<'a> {
    fn new(etcd: &'a Etcd) -> Self {
        let n = etcd.endpoints.len();
        let now = Instant::now();
        Call {
            etcd,
            order: etcd.order(),
            cursor: 0,
            busy: vec![0; n],
            latest: vec![now; n],
            retry_at: vec![now; n],
            errors: vec![None; n],
            unreachable: vec![false; n],
        }
    }

    /// Whether endpoint `idx` has a try in flight that is past the per-endpoint deadline.
    fn slow(&self, idx: usize, now: Instant) -> bool {
        self.busy[idx] > 0 && now.saturating_duration_since(self.latest[idx]) >= self.etcd.attempt
    }

    /// The next endpoint to try now, marked in flight: one not pausing after a failure,
    /// with no try in flight or only one past the deadline (a request a member forwarded
    /// to a leader that hung is lost, so the member gets it anew once a leader is elected).
    fn pick(&mut self, now: Instant) -> Option<usize> {
        let n = self.order.len();
        let k = (0..n).find(|k| {
            let idx = self.order[(self.cursor + k) % n];
            (self.busy[idx] == 0 || self.slow(idx, now)) && self.retry_at[idx] <= now
        })?;
        let idx = self.order[(self.cursor + k) % n];
        self.cursor = (self.cursor + k + 1) % n;
        self.busy[idx] += 1;
        self.latest[idx] = now;
        Some(idx)
    }

    /// A try on `idx` ended.
    fn done(&mut self, idx: usize) {
        self.busy[idx] = self.busy[idx].saturating_sub(1);
    }

    /// Every endpoint was tried, none is in flight and none could be reached: nothing
    /// listens or nobody accepts this client (e.g. its certificate), so waiting for the
    /// timeout would only delay the error.
    fn hopeless(&self) -> bool {
        self.busy.iter().all(|b| *b == 0) && self.unreachable.iter().all(|u| *u)
    }

    fn failed(&mut self, idx: usize, text: String) {
        self.unreachable[idx] = false;
        self.etcd.mark(idx, false);
        self.retry_at[idx] = Instant::now() + ROUND_PAUSE;
        self.errors[idx] = Some(format!("{}: {text}", self.etcd.endpoints[idx].url));
    }

    /// Tries still in flight past the per-endpoint deadline count as failures.
    fn settle_slow(&mut self) {
        let now = Instant::now();
        for idx in 0..self.busy.len() {
            if self.slow(idx, now) {
                self.failed(idx, self.etcd.no_answer());
            }
        }
    }

    fn errors(&self) -> String {
        let errors: Vec<&str> = self.errors.iter().flatten().map(String::as_str).collect();
        if errors.is_empty() {
            "no endpoint tried".into()
        } else {
            errors.join("; ")
        }
    }
}

/// How one try on one endpoint ended.
enum Try {
    /// A 200 reply's body.
    Answer(Vec<u8>),
    /// The cluster's refusal (4xx): the same on every member, so not retried.
    Refused(String),
    /// This endpoint could not answer (timeout, 5xx): the next one may.
    Failed(String),
    /// No connection to this endpoint (refused, TLS rejected): the next one may.
    Unreachable(String),
}

/// An int64 as the gateway writes it (a JSON string), or a number.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

pub fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn parse_kv(v: &Value) -> Option<Kv> {
    let key = B64.decode(v.get("key")?.as_str()?).ok()?;
    let value = match v.get("value").and_then(Value::as_str) {
        Some(s) => B64.decode(s).ok()?,
        None => Vec::new(),
    };
    Some(Kv {
        key: String::from_utf8(key).ok()?,
        value,
        create_revision: int(v.get("create_revision").unwrap_or(&Value::Null)),
        mod_revision: int(v.get("mod_revision").unwrap_or(&Value::Null)),
        lease: int(v.get("lease").unwrap_or(&Value::Null)),
    })
}

/// The keys of a range reply (`kvs`, absent when there are none).
pub fn kvs_of(reply: &Value) -> Vec<Kv> {
    reply
        .get("kvs")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(parse_kv).collect())
        .unwrap_or_default()
}

/// The end of the range of all keys starting with `prefix` (etcd's "prefix + 1").
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Transaction building blocks, as the gateway spells them.
pub mod op {
    use super::*;

    /// The key does not exist (it was never created, or was deleted).
    pub fn absent(key: &str) -> Value {
        json!({"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
    }

    /// The key was last changed at `rev` (nobody changed it since we read it).
    pub fn unchanged(key: &str, rev: i64) -> Value {
        json!({"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()})
    }

    /// The key holds exactly `value`.
    pub fn value_is(key: &str, value: &[u8]) -> Value {
        json!({"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": B64.encode(value)})
    }

    /// The key is attached to `lease` (and so exists: an expired lease takes its keys).
    pub fn on_lease(key: &str, lease: i64) -> Value {
        json!({"key": b64(key), "target": "LEASE", "result": "EQUAL", "lease": lease.to_string()})
    }

    pub fn put(key: &str, value: &[u8], lease: i64) -> Value {
        let mut put = json!({"key": b64(key), "value": B64.encode(value)});
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        json!({"request_put": put})
    }

    pub fn get(key: &str) -> Value {
        json!({"request_range": {"key": b64(key)}})
    }

    pub fn delete(key: &str) -> Value {
        json!({"request_delete_range": {"key": b64(key)}})
    }
}

/// What a transaction did.
#[derive(Debug)]
pub struct TxnReply {
    pub succeeded: bool,
    /// One reply per operation of the branch that ran (`response_range` etc.).
    pub responses: Vec<Value>,
}

impl Etcd {
    pub fn new(cfg: &ClusterConfig) -> anyhow::Result<Self> {
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|u| Endpoint::parse(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tls = if endpoints.iter().any(|e| e.tls) {
            Some(tls_config(cfg)?)
        } else {
            None
        };
        // A try on a hung member must end before the next keepalive is due, so that the
        // keepalive after it still reaches a healthy member within the lease TTL.
        let attempt = cfg
            .timeout
            .min(super::keepalive_every(cfg.lease_ttl))
            .max(Duration::from_millis(200));
        Ok(Etcd {
            failed_at: Mutex::new(vec![None; endpoints.len()]),
            endpoints,
            tls,
            timeout: cfg.timeout,
            attempt,
            preferred: AtomicUsize::new(0),
        })
    }

    /// The order of the endpoints for the next round: from the preferred one on, the
    /// healthy before those that failed lately.
    fn order(&self) -> Vec<usize> {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let failed = super::locked(&self.failed_at).clone();
        let now = Instant::now();
        let unhealthy = |i: usize| {
            failed[i].is_some_and(|at| now.saturating_duration_since(at) < UNHEALTHY_FOR)
        };
        let rotation = (0..n).map(|k| (first + k) % n);
        let (healthy, rest): (Vec<usize>, Vec<usize>) = rotation.partition(|i| !unhealthy(*i));
        healthy.into_iter().chain(rest).collect()
    }

    fn mark(&self, idx: usize, ok: bool) {
        if ok {
            self.preferred.store(idx, Ordering::Relaxed);
        }
        if let Some(slot) = super::locked(&self.failed_at).get_mut(idx) {
            *slot = (!ok).then(Instant::now);
        }
    }

    /// One try of `path` on endpoint `ep`, bounded by `limit`.
    async fn try_once(&self, ep: &Endpoint, path: &str, payload: Bytes, limit: Duration) -> Try {
        let attempt = self.exchange(ep, Method::POST, path, payload);
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok((200, reply))) => Try::Answer(reply),
            Ok(Ok((status, reply))) => {
                let text = serde_json::from_slice::<Value>(&reply)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
                    .unwrap_or_else(|| String::from_utf8_lossy(&reply).into_owned());
                let text = format!("HTTP {status} {text}");
                if (400..500).contains(&status) {
                    Try::Refused(text)
                } else {
                    Try::Failed(text)
                }
            }
            Ok(Err(e)) => Try::Unreachable(format!("{e:#}")),
            Err(_) => Try::Failed(self.no_answer()),
        }
    }

    fn no_answer(&self) -> String {
        format!("no answer within {} ms", self.attempt.as_millis())
    }

    /// POSTs `body` to `path` and returns the first 200 reply. A try that has not answered
    /// within the per-endpoint deadline stays open while the next endpoint is tried (an
    /// etcd electing a new leader answers late, a hung one never); one that fails is tried
    /// again after a pause; the whole call ends at the timeout.
    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.timeout;
        let payload = Bytes::from(serde_json::to_vec(body).context("encoding an etcd request")?);
        let mut call = Call::new(self);
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        let mut next_launch = Instant::now();
        while Instant::now() < deadline {
            let now = Instant::now();
            if now >= next_launch {
                next_launch = match call.pick(now) {
                    Some(idx) => {
                        let (ep, payload) = (&self.endpoints[idx], payload.clone());
                        let left = deadline.saturating_duration_since(now);
                        inflight.push(async move {
                            (idx, self.try_once(ep, path, payload, left).await)
                        });
                        now + self.attempt
                    }
                    None => now + ROUND_PAUSE.min(self.attempt),
                };
            }
            tokio::select! {
                Some((idx, outcome)) = inflight.next(), if !inflight.is_empty() => {
                    call.done(idx);
                    match outcome {
                        Try::Answer(reply) => {
                            self.mark(idx, true);
                            call.settle_slow();
                            let url = &self.endpoints[idx].url;
                            return serde_json::from_slice(&reply)
                                .with_context(|| format!("etcd {url} answered {path} with no JSON"));
                        }
                        Try::Refused(text) => {
                            self.mark(idx, true);
                            call.settle_slow();
                            bail!("etcd {path}: {}: {text}", self.endpoints[idx].url);
                        }
                        Try::Failed(text) => {
                            tracing::debug!("etcd {path} on {}: {text}", self.endpoints[idx].url);
                            call.failed(idx, text);
                            next_launch = Instant::now();
                        }
                        Try::Unreachable(text) => {
                            tracing::debug!("etcd {path} on {}: {text}", self.endpoints[idx].url);
                            call.failed(idx, text);
                            call.unreachable[idx] = true;
                            if call.hopeless() {
                                break;
                            }
                            next_launch = Instant::now();
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_launch.min(deadline)) => {}
            }
        }
        call.settle_slow();
        Err(anyhow!(
            "etcd {path} failed within {} s: {}",
            self.timeout.as_secs(),
            call.errors()
        ))
    }

    async fn exchange(
        &self,
        ep: &Endpoint,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let stream = match (&self.tls, ep.tls) {
            (Some(config), true) => Stream::Tls(Box::new(
                crate::net::tls::connect(&ep.host, ep.port, config).await?,
            )),
            _ => connect_plain(&ep.host, ep.port).await?,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        // Aborted also when this try is dropped unfinished (a hung member's connection).
        let conn = AbortOnDrop(tokio::spawn(conn));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", ep.host, ep.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .context("building the request")?;
        let result = async {
            let response = sender.send_request(request).await.context("request")?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the reply (at most {MAX_REPLY_BYTES} bytes): {e}"))?
                .to_bytes()
                .to_vec();
            anyhow::Ok((status, body))
        }
        .await;
        drop(sender);
        drop(conn);
        result
    }

    /// The key `key` (`prefix`: every key starting with it).
    pub async fn range(&self, key: &str, prefix: bool) -> anyhow::Result<Vec<Kv>> {
        let mut body = json!({"key": b64(key)});
        if prefix {
            body["range_end"] = json!(B64.encode(prefix_end(key)));
        }
        Ok(kvs_of(&self.post("/v3/kv/range", &body).await?))
    }

    pub async fn get(&self, key: &str) -> anyhow::Result<Option<Kv>> {
        Ok(self.range(key, false).await?.into_iter().next())
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> anyhow::Result<()> {
        let put = op::put(key, value, lease);
        self.post("/v3/kv/put", &put["request_put"]).await?;
        Ok(())
    }

    pub async fn txn(
        &self,
        compare: Vec<Value>,
        success: Vec<Value>,
        failure: Vec<Value>,
    ) -> anyhow::Result<TxnReply> {
        let body = json!({"compare": compare, "success": success, "failure": failure});
        let reply = self.post("/v3/kv/txn", &body).await?;
        Ok(TxnReply {
            succeeded: reply.get("succeeded").and_then(Value::as_bool) == Some(true),
            responses: reply
                .get("responses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// A new lease of `ttl`; returns its ID.
    pub async fn lease_grant(&self, ttl: Duration) -> anyhow::Result<i64> {
        let reply = self
            .post(
                "/v3/lease/grant",
                &json!({"TTL": ttl.as_secs().to_string()}),
            )
            .await?;
        match int(reply.get("ID").unwrap_or(&Value::Null)) {
            0 => bail!(
                "etcd granted no lease: {}",
                reply.get("error").cloned().unwrap_or(reply)
            ),
            id => Ok(id),
        }
    }

    /// Refreshes lease `id`; returns its TTL, 0 when etcd no longer has it (expired).
    pub async fn lease_keepalive(&self, id: i64) -> anyhow::Result<i64> {
        let reply = self
            .post("/v3/lease/keepalive", &json!({"ID": id.to_string()}))
            .await?;
        let result = reply.get("result").unwrap_or(&reply);
        Ok(int(result.get("TTL").unwrap_or(&Value::Null)))
    }

    /// The seconds lease `id` has left (-1: expired or unknown).
    pub async fn lease_time_to_live(&self, id: i64) -> anyhow::Result<i64> {
        let reply = self
            .post("/v3/lease/timetolive", &json!({"ID": id.to_string()}))
            .await?;
        Ok(match reply.get("TTL") {
            Some(ttl) => int(ttl),
            None => -1,
        })
    }

    pub async fn lease_revoke(&self, id: i64) -> anyhow::Result<()> {
        self.post("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .await?;
        Ok(())
    }

    /// Whether the etcd cluster has quorum: a linearizable read (it needs the leader and a
    /// majority) answered within the timeout.
    pub async fn quorate(&self) -> anyhow::Result<()> {
        self.range("/mtunnel-quorum-probe", false).await.map(|_| ())
    }
}

/// rustls settings for `https://` endpoints: the CA file (or the system roots) and the
/// optional client certificate.
fn tls_config(cfg: &ClusterConfig) -> anyhow::Result<Arc<ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let roots = match &cfg.ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading [cluster] ca_file {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("adding the CA of {}", path.display()))?;
            }
            roots
        }
        None => crate::net::tls::system_roots(),
    };
    let builder = ClientConfig::builder_with_provider(crate::util::tls_provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading [cluster] cert_file {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading [cluster] key_file {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the [cluster] client certificate and key do not fit")?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_gateway() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(
            op::absent("/k"),
            json!({"key": "L2s=", "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
        );
        assert_eq!(
            op::put("/k", b"v", 7),
            json!({"request_put": {"key": "L2s=", "value": "dg==", "lease": "7"}})
        );
        assert_eq!(
            op::put("/k", b"v", 0),
            json!({"request_put": {"key": "L2s=", "value": "dg=="}})
        );
        let reply = json!({"header": {"revision": "9"}, "kvs": [{"key": "L2s=",
            "create_revision": "5", "mod_revision": "8", "version": "2", "value": "dg==",
            "lease": "7"}], "count": "1"});
        let kv = &kvs_of(&reply)[0];
        assert_eq!(
            (kv.key.as_str(), kv.value.as_slice()),
            ("/k", b"v".as_slice())
        );
        assert_eq!((kv.create_revision, kv.mod_revision), (5, 8));
        assert!(kvs_of(&json!({"header": {}})).is_empty());
        let ep = Endpoint::parse("https://127.0.0.1:2379/").unwrap();
        assert_eq!(
            (ep.tls, ep.host.as_str(), ep.port),
            (true, "127.0.0.1", 2379)
        );
        assert!(Endpoint::parse("127.0.0.1:2379").is_err());
    }

    /// An endpoint whose reply runs past [`MAX_REPLY_BYTES`] (a loopback HTTP server that
    /// sends one byte more) fails the call with the cap named; nothing more is read.
    #[tokio::test]
    async fn a_reply_over_the_cap_is_an_error() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = tcp.read(&mut request);
            let size = MAX_REPLY_BYTES + 1;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
            let _ = tcp.write_all(head.as_bytes());
            let chunk = vec![b' '; 1 << 20];
            // The client hangs up at the cap: the writes after that fail, which ends this.
            for _ in 0..=size / chunk.len() {
                if tcp.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let cfg = ClusterConfig {
            name: "lab".into(),
            endpoints: vec![format!("http://127.0.0.1:{port}")],
            lease_ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            advertise_url: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            member_secret: crate::config::MemberSecret(b"0123456789abcdef".to_vec()),
        };
        let err = Etcd::new(&cfg).unwrap().get("/k").await.unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!(
                "etcd /v3/kv/range failed within 5 s: http://127.0.0.1:{port}: reading the \
                 reply (at most {MAX_REPLY_BYTES} bytes): length limit exceeded"
            )
        );
        server.join().unwrap();
    }
}
