//! A real etcd cluster for the cluster tests: Debian's `/usr/bin/etcd`, three members on
//! free loopback ports with their data in a temporary directory, killed on drop. Members
//! can be killed (SIGKILL) and started again on the same data, or frozen (SIGSTOP) while a
//! guard lives; keys can be read straight from one member's JSON gateway.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `etcd-server` puts the server.
pub const ETCD: &str = "/usr/bin/etcd";

/// Fails the test (not skips) when etcd is missing: CI must run these.
pub fn require_etcd() {
    assert!(
        std::path::Path::new(ETCD).exists(),
        "{ETCD} is missing: install Debian's etcd-server (scripts/test-all.sh installs it)"
    );
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// Clients speak TLS and must show a certificate signed by `ca.pem` in `dir`.
    tls: bool,
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free loopback port")
}

impl EtcdCluster {
    /// Starts `n` members and waits until each reports healthy (40 s, then once more on
    /// fresh ports).
    pub fn start(n: usize) -> Self {
        Self::start_with(n, false)
    }

    /// One member serving clients over TLS only (`--client-cert-auth`): its CA, server
    /// and client certificates are made here (`ca.pem`, `client.pem`, `client.key`).
    pub fn start_tls() -> Self {
        Self::start_with(1, true)
    }

    fn start_with(n: usize, tls: bool) -> Self {
        require_etcd();
        let dir = tempfile::Builder::new()
            .prefix("etcd")
            .tempdir_in("/tmp")
            .expect("creating the etcd directory");
        let members = (0..n)
            .map(|i| Member {
                name: format!("e{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { dir, members, tls };
        if tls {
            cluster.make_certificates();
        }
        let all: Vec<usize> = (0..n).collect();
        // Ports are picked free, then bound by etcd: another test may take one in between.
        // A start that does not get healthy is tried once more on fresh ports.
        for attempt in 0..2 {
            for i in 0..n {
                cluster.spawn(i);
            }
            if cluster.healthy_within(&all, Duration::from_secs(40)) {
                return cluster;
            }
            let logs = cluster.log_tails();
            assert!(
                attempt == 0,
                "etcd members {all:?} not healthy after two starts of 40 s; their logs end:\n{logs}"
            );
            eprintln!("etcd did not get healthy, starting it again on fresh ports:\n{logs}");
            for i in 0..n {
                cluster.kill(i);
                let _ = std::fs::remove_dir_all(cluster.data(i));
                cluster.members[i].client_port = free_port();
                cluster.members[i].peer_port = free_port();
            }
        }
        cluster
    }

    /// The last lines of each member's log.
    fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.file(&format!("{}.log", m.name)))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                format!("--- {} ---\n{tail}", m.name)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether the members `which` are healthy within `limit`.
    fn healthy_within(&self, which: &[usize], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if which.iter().all(|i| self.healthy(*i)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client URLs, for `[cluster] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// A file in the cluster's directory (the certificates of [`EtcdCluster::start_tls`]).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate, signed by it.
    fn make_certificates(&self) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(self.file("ca.pem"), ca.pem()).unwrap();
        for (name, sans) in [
            ("server", vec!["127.0.0.1".to_string()]),
            ("client", vec![]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(self.file(&format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(self.file(&format!("{name}.key")), key.serialize_pem()).unwrap();
        }
    }

    /// The `[cluster]` table for a node of cluster `name`.
    pub fn cluster_toml(&self, name: &str, lease_ttl_secs: u64, timeout_secs: u64) -> String {
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!(
            "\n[cluster]\nname = \"{name}\"\nendpoints = [{}]\nlease_ttl_secs = {lease_ttl_secs}\n\
             timeout_secs = {timeout_secs}\nsecret_file = \"{}\"\n",
            endpoints.join(", "),
            self.member_secret().display()
        )
    }

    /// The `[cluster] secret_file` of every node of [`EtcdCluster::cluster_toml`], written
    /// on first use.
    pub fn member_secret(&self) -> PathBuf {
        let path = self.dir.path().join("cluster.secret");
        if !path.exists() {
            std::fs::write(&path, "test-cluster-secret-0123456789\n").unwrap();
        }
        path
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("opening the etcd log");
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.data(i))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "mtunnel-test"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(if self.tls {
                vec![
                    "--client-cert-auth".to_string(),
                    format!("--trusted-ca-file={}", self.file("ca.pem").display()),
                    format!("--cert-file={}", self.file("server.pem").display()),
                    format!("--key-file={}", self.file("server.key").display()),
                ]
            } else {
                Vec::new()
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // If the test process dies without running destructors, take etcd with it.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().expect("starting etcd");
        self.members[i].child = Some(child);
    }

    /// `GET /health` of member `i` says `"health":"true"` (with TLS: the port accepts; the
    /// test's first request then waits for the single member to lead).
    pub fn healthy(&self, i: usize) -> bool {
        let port = self.members[i].client_port;
        if self.tls {
            return std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        }
        let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(3)));
        if tcp
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut reply = String::new();
        let _ = tcp.read_to_string(&mut reply);
        reply.contains("\"health\":\"true\"")
    }

    /// Waits (at most 60 s: a loaded machine starts etcd slowly) until the members `which`
    /// are healthy.
    pub fn wait_healthy(&self, which: &[usize]) {
        assert!(
            self.healthy_within(which, Duration::from_secs(60)),
            "etcd members {which:?} not healthy after 60 s; their logs end:\n{}",
            self.log_tails()
        );
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes member `i` (SIGSTOP: it accepts connections and answers nothing, like a hung
    /// host) until the guard is dropped, which resumes it (SIGCONT), also on a panic.
    pub fn freeze(&self, i: usize) -> Frozen {
        let pid = self.members[i].child.as_ref().expect("member runs").id() as i32;
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP etcd");
        Frozen { pid }
    }

    /// The keys under `prefix` as member `i` has them (a linearizable read through its JSON
    /// gateway): (key, value as JSON, lease).
    pub fn range(&self, i: usize, prefix: &str) -> Vec<(String, serde_json::Value, i64)> {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD as B64;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a prefix") += 1;
        let body = serde_json::json!({"key": B64.encode(prefix), "range_end": B64.encode(end)});
        let json = self.call(i, "/v3/kv/range", &body);
        let text = |v: &serde_json::Value| {
            String::from_utf8(B64.decode(v.as_str().unwrap_or("")).unwrap()).unwrap()
        };
        json["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        let value = serde_json::from_str(&text(&kv["value"])).unwrap();
                        let lease = kv["lease"].as_str().and_then(|l| l.parse().ok());
                        (text(&kv["key"]), value, lease.unwrap_or(0))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes `key` = `value` (no lease) through member `i`, as any etcd client could.
    pub fn put(&self, i: usize, key: &str, value: &[u8]) {
        self.put_on_lease(i, key, value, 0);
    }

    /// Like [`EtcdCluster::put`], on `lease` (0: none).
    pub fn put_on_lease(&self, i: usize, key: &str, value: &[u8], lease: i64) {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD as B64;
        let mut body = serde_json::json!({"key": B64.encode(key), "value": B64.encode(value)});
        if lease != 0 {
            body["lease"] = serde_json::json!(lease.to_string());
        }
        self.call(i, "/v3/kv/put", &body);
    }

    /// A new lease of `ttl_secs` through member `i`, as any etcd client could grant one.
    pub fn grant_lease(&self, i: usize, ttl_secs: u64) -> i64 {
        let reply = self.call(i, "/v3/lease/grant", &serde_json::json!({"TTL": ttl_secs}));
        reply["ID"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no lease granted: {reply}"))
    }

    /// One JSON gateway call to member `i`: its reply.
    fn call(&self, i: usize, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let body = body.to_string();
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", self.members[i].client_port))
            .expect("connecting to etcd");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            tcp,
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        tcp.read_to_string(&mut reply)
            .expect("reading the etcd reply");
        let json = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(json).unwrap_or_else(|_| panic!("etcd replied {reply}"))
    }

    /// Range requests (etcd's `grpc_server_handled_total{grpc_method="Range"}`, every
    /// code; the JSON gateway's `/v3/kv/range` is counted there too) all members served.
    pub fn range_requests(&self) -> u64 {
        (0..self.members.len())
            .map(|i| self.member_range_requests(i))
            .sum()
    }

    fn member_range_requests(&self, i: usize) -> u64 {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", self.members[i].client_port))
            .expect("connecting to etcd");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        tcp.read_to_string(&mut reply)
            .expect("reading etcd's metrics");
        reply
            .lines()
            .filter(|l| {
                l.starts_with("grpc_server_handled_total{")
                    && l.contains("grpc_method=\"Range\"")
                    && l.contains("grpc_service=\"etcdserverpb.KV\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// The members' logs (for a failing test's message).
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)));
            all.push_str(&format!(
                "---- etcd {} (client port {})\n",
                m.name, m.client_port
            ));
            all.push_str(&log.unwrap_or_default());
        }
        all
    }

    /// Starts member `i` again on its data (after [`EtcdCluster::kill`]).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }
}

/// A member frozen by [`EtcdCluster::freeze`]; dropping it resumes the member.
pub struct Frozen {
    pid: nix::unistd::Pid,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGCONT);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
