//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, ..., keys and values base64): the few calls the
//! cluster registry needs, on the hyper client and rustls the crate already has. Each call
//! is bounded by the configured timeout, failing over across the endpoints in order.
//!
//! Why not the gRPC client crates: they generate their protobuf code at build time with
//! `protoc`, which a fresh machine does not have, and pull in tonic/prost.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use serde_json::{Value, json};

use crate::client::stream::{Stream, connect_plain};
use crate::config::ClusterConfig;

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

/// The client: endpoints, TLS settings and the time bound of a call.
pub struct Etcd {
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<ClientConfig>>,
    timeout: Duration,
    /// The endpoint that answered last: tried first next time.
    preferred: AtomicUsize,
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
        Ok(Etcd {
            endpoints,
            tls,
            timeout: cfg.timeout,
            preferred: AtomicUsize::new(0),
        })
    }

    /// POSTs `body` to `path` on the first endpoint that answers 200, within the timeout.
    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let first = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        let payload = serde_json::to_vec(body).context("encoding an etcd request")?;
        for i in 0..self.endpoints.len() {
            let idx = (first + i) % self.endpoints.len();
            let ep = &self.endpoints[idx];
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let attempt = self.exchange(ep, Method::POST, path, payload.clone());
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok((200, reply))) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return serde_json::from_slice(&reply)
                        .with_context(|| format!("etcd {} answered {path} with no JSON", ep.url));
                }
                Ok(Ok((status, reply))) => {
                    let text = serde_json::from_slice::<Value>(&reply)
                        .ok()
                        .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
                        .unwrap_or_else(|| String::from_utf8_lossy(&reply).into_owned());
                    errors.push(format!("{}: HTTP {status} {text}", ep.url));
                }
                Ok(Err(e)) => errors.push(format!("{}: {e:#}", ep.url)),
                Err(_) => errors.push(format!("{}: no answer in time", ep.url)),
            }
        }
        if errors.is_empty() {
            errors.push("no endpoint tried".into());
        }
        Err(anyhow!(
            "etcd {path} failed within {} s: {}",
            self.timeout.as_secs(),
            errors.join("; ")
        ))
    }

    async fn exchange(
        &self,
        ep: &Endpoint,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let stream = match (&self.tls, ep.tls) {
            (Some(config), true) => Stream::Tls(Box::new(
                crate::client::tls::connect(&ep.host, ep.port, config).await?,
            )),
            _ => connect_plain(&ep.host, ep.port).await?,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        let conn = tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", ep.host, ep.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .context("building the request")?;
        let result = async {
            let response = sender.send_request(request).await.context("request")?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .context("reading the reply")?
                .to_bytes()
                .to_vec();
            anyhow::Ok((status, body))
        }
        .await;
        drop(sender);
        conn.abort();
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
        None => crate::client::tls::system_roots(),
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
}
