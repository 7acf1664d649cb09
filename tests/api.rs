//! The HTTPS API of the real `mtunnel serve` binary, as PVE clients see it: exact status
//! lines, reason phrases and bodies for every endpoint of a migration target, every bad
//! input we know of, task endpoints (also across a restart; the task list's filters as
//! PVE's), the status page's static files, and the tunnel worker's accept timeout. WebSocket behaviour is in `tests/websocket.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{NODE, Options, TestServer, bounded, eventually, mint_tunnel_ticket, now, pct};
use hyper::Method;
use mtunnel::client::{ApiClient, ApiError};
use serde_json::{Value, json};

const JSON_CT: &str = "application/json;charset=UTF-8";

fn mtunnel_path(vmid: impl std::fmt::Display) -> String {
    format!("/nodes/{NODE}/qemu/{vmid}/mtunnel")
}

/// Asserts an `ApiError::Http` with this status, reason phrase and body `message`.
#[track_caller]
fn assert_http(err: &ApiError, status: u16, reason: &str) {
    match err {
        ApiError::Http {
            status: s,
            reason: r,
            message,
            ..
        } => {
            assert_eq!((*s, r.as_str()), (status, reason), "{err:?}");
            assert_eq!(message, &format!("{reason}\n"), "{err:?}");
        }
        other => panic!("expected HTTP {status}, got {other:?}"),
    }
}

/// Asserts `400 Parameter verification failed.` with exactly these per-field errors.
#[track_caller]
fn assert_param_error(err: &ApiError, errors: Value) {
    assert_http(err, 400, "Parameter verification failed.");
    match err {
        ApiError::Http { errors: e, .. } => assert_eq!(Value::Object(e.clone()), errors),
        _ => unreachable!(),
    }
}

/// The server still answers (after a bad request).
async fn still_serving(server: &mut TestServer) {
    assert!(server.is_running(), "server died; log:\n{}", server.log());
    let v = server.client().get("/version", &[]).await.unwrap();
    assert_eq!(v["repoid"], "mtunnel");
}

#[tokio::test]
async fn version_cluster_status_and_nodes() {
    bounded(60, async {
        let server = TestServer::start();
        let client = server.client();
        let raw = client
            .raw(Method::GET, "/api2/json/version", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!((raw.status, raw.reason.as_str()), (200, "OK"));
        assert_eq!(raw.content_type(), Some(JSON_CT));
        assert_eq!(
            raw.json(),
            json!({"data": {"version": "9.0.0", "release": "9.0", "repoid": "mtunnel",
                            "mtunnel": env!("CARGO_PKG_VERSION")}})
        );

        // A standalone PVE node reports nodeid 0.
        let status = client.get("/cluster/status", &[]).await.unwrap();
        assert_eq!(
            status,
            json!([{"type": "node", "id": format!("node/{NODE}"), "name": NODE, "nodeid": 0,
                    "ip": "127.0.0.1", "local": 1, "online": 1, "level": ""}])
        );

        let nodes = client.get("/nodes", &[]).await.unwrap();
        assert_eq!(
            nodes,
            json!([{"node": NODE, "status": "online", "type": "node",
                    "id": format!("node/{NODE}"), "ssl_fingerprint": server.fingerprint}])
        );
    })
    .await
}

#[tokio::test]
async fn certificate_fingerprint_matches_serve_output_and_handshake() {
    bounded(60, async {
        let server = TestServer::start();
        let info = server
            .client()
            .get("/nodes/localhost/certificates/info", &[])
            .await
            .unwrap();
        let cert = &info[0];
        assert_eq!(cert["filename"], "pveproxy-ssl.pem");
        // Read from the generated certificate (see src/api/tls.rs for a CA-signed one).
        assert_eq!(cert["subject"], "/CN=rcgen self signed cert");
        assert_eq!(cert["issuer"], "/CN=rcgen self signed cert");
        assert_eq!(cert["public-key-type"], "id-ecPublicKey");
        assert_eq!(cert["public-key-bits"], 256);
        assert_eq!(cert["san"], json!(["localhost", NODE, "127.0.0.1"]));
        let (before, after) = (
            cert["notbefore"].as_i64().unwrap(),
            cert["notafter"].as_i64().unwrap(),
        );
        assert!(before < after, "{cert}");
        assert_eq!(cert["fingerprint"], server.fingerprint.as_str());
        assert!(
            cert["pem"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        // By the node's own name as well.
        let by_name = server
            .client()
            .get(&format!("/nodes/{NODE}/certificates/info"), &[])
            .await
            .unwrap();
        assert_eq!(by_name, info);

        // The certificate the handshake presents has that fingerprint.
        let config = mtunnel::net::tls::client_config(Some(&server.fingerprint)).unwrap();
        let tls = mtunnel::net::tls::connect(&server.host, server.port, &config)
            .await
            .unwrap();
        let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
        assert_eq!(mtunnel::util::fingerprint_sha256(leaf), server.fingerprint);
        assert_eq!(server.fingerprint.len(), 32 * 3 - 1);
        assert!(
            server
                .fingerprint
                .bytes()
                .all(|b| b == b':' || b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        );

        // The same pin in lower case without colons is the same pin.
        let loose = server.fingerprint.to_ascii_lowercase().replace(':', "");
        let client = mtunnel::client::ApiClient::new(
            server.host.clone(),
            server.port,
            server.root_token.clone(),
            loose,
        )
        .unwrap();
        client.get("/version", &[]).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn wrong_fingerprint_is_refused_with_pve_message() {
    bounded(60, async {
        let mut server = TestServer::start();
        let wrong = vec!["6A"; 32].join(":");
        let client = mtunnel::client::ApiClient::new(
            server.host.clone(),
            server.port,
            server.root_token.clone(),
            wrong,
        )
        .unwrap();
        let err = client.get("/version", &[]).await.unwrap_err();
        assert!(matches!(err, ApiError::Connect(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("fingerprint '{}' not verified, abort!", server.fingerprint)
        );
        // A malformed pin, and none at all, never reach the network.
        let bad = mtunnel::client::ApiClient::new(
            "127.0.0.1",
            server.port,
            String::new(),
            "AB:CD".into(),
        );
        assert!(matches!(bad, Err(ApiError::Request(_))));
        let none =
            mtunnel::client::ApiClient::new("127.0.0.1", server.port, String::new(), String::new());
        assert_eq!(none.unwrap_err().to_string(), "no fingerprint given");
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn cluster_resources_shows_reserved_vmid() {
    bounded(60, async {
        let server = TestServer::start();
        let client = server.client();
        assert_eq!(
            client
                .get("/cluster/resources", &[("type", "vm")])
                .await
                .unwrap(),
            json!([])
        );
        server.open_tunnel(100).await;
        let vms = client
            .get("/cluster/resources", &[("type", "vm")])
            .await
            .unwrap();
        assert_eq!(
            vms,
            json!([{"id": "qemu/100", "vmid": 100, "type": "qemu", "node": NODE,
                    "status": "stopped"}])
        );
        let err = client
            .get("/cluster/resources", &[("type", "bogus")])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"type": "value 'bogus' does not have a value in the enumeration 'vm, storage, node, sdn, pool'"}),
        );
    })
    .await
}

/// `mtunnel <args> --config <server's config>`, which must succeed.
async fn mtunnel_on(server: &TestServer, args: &[&str]) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mtunnel"))
        .args(args)
        .arg("--config")
        .arg(&server.config)
        .kill_on_drop(true)
        .output()
        .await
        .expect("running mtunnel");
    assert!(
        out.status.success(),
        "mtunnel {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn cluster_resources_reports_whether_a_vm_runs() {
    assert!(
        std::env::var_os("PATH").is_some_and(
            |p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file())
        ),
        "qemu-system-x86_64 is not installed: run `bash .ci/install-qemu.sh` (scripts/test-all.sh does)"
    );
    bounded(120, async {
        let server = TestServer::start_with(Options {
            extra_toml: "qemu_accel = \"tcg\"\n".into(),
            ..Options::default()
        });
        let client = server.client();
        let status = || async {
            client
                .get("/cluster/resources", &[("type", "vm")])
                .await
                .unwrap()[0]["status"]
                .clone()
        };
        mtunnel_on(&server, &["vm", "create", "101", "--memory", "64"]).await;
        assert_eq!(status().await, "stopped");
        mtunnel_on(&server, &["vm", "start", "101"]).await;
        let running = status().await;
        mtunnel_on(&server, &["vm", "stop", "101"]).await;
        assert_eq!(running, "running");
        assert_eq!(status().await, "stopped");
    })
    .await
}

#[tokio::test]
async fn storage_list_enabled_and_content() {
    bounded(60, async {
        let server = TestServer::start();
        let client = server.client();
        let path = format!("/nodes/{NODE}/storage");
        let ids = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s["storage"].as_str().unwrap().to_string())
                .collect()
        };
        let all = client.get(&path, &[]).await.unwrap();
        assert_eq!(ids(&all), ["isos", "local", "off"]);
        let enabled = client.get(&path, &[("enabled", "1")]).await.unwrap();
        assert_eq!(ids(&enabled), ["isos", "local"]);
        let local = &enabled[1];
        assert_eq!(local["type"], "dir");
        assert!(
            local["content"]
                .as_str()
                .unwrap()
                .split(',')
                .any(|c| c == "images")
        );
        assert_eq!(
            (&local["enabled"], &local["active"]),
            (&json!(1), &json!(1))
        );
        assert!(local["total"].as_u64().unwrap() > 0);
        assert!(local["avail"].is_u64() && local["used"].is_u64());
        let images = client
            .get(
                "/nodes/localhost/storage",
                &[("enabled", "1"), ("content", "images")],
            )
            .await
            .unwrap();
        assert_eq!(ids(&images), ["local"]);
        // proxmoxer's Python booleans.
        let py = client.get(&path, &[("enabled", "True")]).await.unwrap();
        assert_eq!(ids(&py), ["isos", "local"]);
    })
    .await
}

#[tokio::test]
async fn unknown_path_method_and_format_are_501() {
    bounded(60, async {
        let mut server = TestServer::start();
        let client = server.client();

        let r = client
            .raw(Method::GET, "/api2/json/nope/nothing", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(r.status, 501);
        assert_eq!(r.reason, "Method 'GET /nope/nothing' not implemented");
        assert_eq!(r.content_type(), Some(JSON_CT));
        assert_eq!(
            r.json(),
            json!({"data": null, "message": "Method 'GET /nope/nothing' not implemented\n"})
        );

        // A known path with a method it does not have.
        let r = client
            .raw(
                Method::GET,
                &format!("/api2/json{}", mtunnel_path(100)),
                &[],
                Vec::new(),
            )
            .await
            .unwrap();
        let msg = format!("Method 'GET {}' not implemented", mtunnel_path(100));
        assert_eq!((r.status, r.reason.as_str()), (501, msg.as_str()));
        assert_eq!(
            r.json(),
            json!({"data": null, "message": format!("{msg}\n")})
        );

        // Unknown format on a known path, and outside any format.
        let r = client
            .raw(Method::GET, "/api2/xml/version", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str()),
            (501, "unknown API format 'xml'")
        );
        assert_eq!(
            r.json(),
            json!({"data": null, "message": "unknown API format 'xml'\n"})
        );
        let r = client
            .raw(Method::GET, "/index.html", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str()),
            (501, "no such API format or path '/index.html'")
        );
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn unknown_format_runs_nothing() {
    bounded(60, async {
        let mut server = TestServer::start();
        let r = server
            .client()
            .raw(
                Method::POST,
                &format!("/api2/xml{}", mtunnel_path(100)),
                &[],
                "storages=local",
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str()),
            (501, "unknown API format 'xml'")
        );
        assert!(
            !server.vm_config(100).exists(),
            "an unknown format opened a tunnel"
        );
        assert!(!server.socket(100).exists());
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn extjs_format_reports_status_in_body() {
    bounded(60, async {
        let server = TestServer::start();
        let client = server.client();
        let r = client
            .raw(Method::GET, "/api2/extjs/version", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
        let body = r.json();
        assert_eq!((&body["success"], &body["status"]), (&json!(1), &json!(200)));
        assert_eq!(body["data"]["repoid"], "mtunnel");

        // A parameter error: still HTTP 200, the error in the body.
        let r = client
            .raw(Method::GET, "/api2/extjs/nodes/elsewhere/tasks", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
        assert_eq!(
            r.json(),
            json!({"data": null, "success": 0, "status": 400,
                   "message": "Parameter verification failed.\n",
                   "errors": {"node": format!("node needs to be 'localhost' or local hostname '{NODE}'")}})
        );

        // Unknown path and failed authentication, extjs style.
        let r = client
            .raw(Method::GET, "/api2/extjs/nope", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json(),
            json!({"data": null, "success": 0, "status": 501,
                   "message": "Method 'GET /nope' not implemented\n"})
        );
        let r = server
            .client_with("")
            .raw(Method::GET, "/api2/extjs/version", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!((&r.json()["success"], &r.json()["status"]), (&json!(0), &json!(401)));
    })
    .await
}

/// Checks a fresh `POST .../mtunnel` reply for `vmid` made by `authid`.
fn check_tunnel_reply(server: &TestServer, vmid: u32, authid: &str, data: &Value) {
    let keys: Vec<&String> = data.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["socket", "ticket", "upid"]);

    // UPID: 9 fields, trailing ':', this process, qmtunnel, the token id as user.
    let upid = data["upid"].as_str().unwrap();
    let f: Vec<&str> = upid.split(':').collect();
    assert_eq!(f.len(), 9, "{upid}");
    assert_eq!((f[0], f[1]), ("UPID", NODE));
    assert_eq!(f[2], format!("{:08X}", server.pid()));
    for hex in [f[2], f[3], f[4]] {
        assert!(
            hex.len() >= 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{upid}"
        );
        assert_eq!(hex, hex.to_ascii_uppercase(), "{upid}");
    }
    let start = u64::from_str_radix(f[4], 16).unwrap();
    assert!(start.abs_diff(now()) <= 5, "{upid}");
    assert_eq!(
        (f[5], f[6], f[7], f[8]),
        ("qmtunnel", vmid.to_string().as_str(), authid, "")
    );

    // Socket: {run}/{vmid}.mtunnel, listening already.
    let socket = data["socket"].as_str().unwrap();
    assert_eq!(socket, server.socket(vmid).to_str().unwrap());
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(socket).expect("control socket missing at reply time");
    assert!(meta.file_type().is_socket());

    // Ticket: PVETUNNEL:<8 hex>::<base64>, and exactly what the node key gives for it.
    let ticket = data["ticket"].as_str().unwrap();
    let t = ticket
        .strip_prefix("PVETUNNEL:")
        .and_then(|r| r.split_once("::"))
        .unwrap_or_else(|| panic!("bad ticket {ticket}"))
        .0;
    assert!(
        t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()),
        "{ticket}"
    );
    let time = u64::from_str_radix(t, 16).unwrap();
    assert!(time.abs_diff(now()) <= 5);
    // Bound to this tunnel instance (its UPID): the next tunnel of the VMID refuses it.
    assert_eq!(
        ticket,
        mint_tunnel_ticket(&server.data, authid, socket, upid, time)
    );

    // The VMID is reserved by an empty config locked `create`.
    assert_eq!(
        std::fs::read_to_string(server.vm_config(vmid)).unwrap(),
        "lock: create\n"
    );
}

#[tokio::test]
async fn mtunnel_form_body_reply_shape() {
    bounded(60, async {
        let server = TestServer::start();
        let r = server
            .client()
            .raw(
                Method::POST,
                &format!("/api2/json{}", mtunnel_path(100)),
                &[("Content-Type", "application/x-www-form-urlencoded")],
                "storages=local&bridges=vmbr0",
            )
            .await
            .unwrap();
        assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
        assert_eq!(r.content_type(), Some(JSON_CT));
        let body = r.json();
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
        check_tunnel_reply(&server, 100, "root@pam!mtunnel", &body["data"]);

        // The library's post() sends the same; node `localhost` is this node.
        let data = server
            .client()
            .post(
                "/nodes/localhost/qemu/101/mtunnel",
                &[("storages", "local"), ("bridges", "vmbr0")],
            )
            .await
            .unwrap();
        check_tunnel_reply(&server, 101, "root@pam!mtunnel", &data);
    })
    .await
}

#[tokio::test]
async fn mtunnel_body_without_content_type_and_as_json() {
    bounded(60, async {
        let server = TestServer::start();
        let client = server.client();
        // proxmox-api: a form body and no Content-Type header at all.
        let r = client
            .raw(
                Method::POST,
                &format!("/api2/json{}", mtunnel_path(100)),
                &[],
                "bridges=vmbr0&storages=local",
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        check_tunnel_reply(&server, 100, "root@pam!mtunnel", &r.json()["data"]);

        // go-proxmox and Proxmox's Rust client: JSON.
        let r = client
            .raw(
                Method::POST,
                &format!("/api2/json{}", mtunnel_path(101)),
                &[("Content-Type", "application/json")],
                r#"{"storages":"local","bridges":"vmbr0"}"#,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        check_tunnel_reply(&server, 101, "root@pam!mtunnel", &r.json()["data"]);

        // A JSON body that is not an object, and one that is not JSON.
        for (body, msg) in [
            ("[1]", "JSON body must be an object"),
            (
                "{nope",
                "invalid JSON body - key must be a string at line 1 column 2",
            ),
        ] {
            let r = client
                .raw(
                    Method::POST,
                    &format!("/api2/json{}", mtunnel_path(102)),
                    &[("Content-Type", "application/json")],
                    body,
                )
                .await
                .unwrap();
            assert_eq!((r.status, r.reason.as_str()), (400, msg));
            assert!(!server.vm_config(102).exists());
        }
    })
    .await
}

#[tokio::test]
async fn mtunnel_query_overrides_body() {
    bounded(60, async {
        let server = TestServer::start();
        let r = server
            .client()
            .raw(
                Method::POST,
                &format!("/api2/json{}?storages=local", mtunnel_path(100)),
                &[("Content-Type", "application/x-www-form-urlencoded")],
                "storages=nope&bridges=vmbr0",
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        check_tunnel_reply(&server, 100, "root@pam!mtunnel", &r.json()["data"]);
        // A key repeated within the body is a list (proxmoxer sends lists so).
        let data = server
            .client()
            .post(
                &mtunnel_path(101),
                &[("storages", "local"), ("storages", "local")],
            )
            .await
            .unwrap();
        check_tunnel_reply(&server, 101, "root@pam!mtunnel", &data);
    })
    .await
}

#[tokio::test]
async fn mtunnel_existing_vmid_is_400() {
    bounded(60, async {
        let server = TestServer::start();
        server.open_tunnel(100).await;
        let err = server
            .client()
            .post(&mtunnel_path(100), &[])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"vmid": format!("unable to create empty VM config - VM 100 already exists on node '{NODE}'")}),
        );
        // PVE's client prints the reason phrase and the field errors.
        assert_eq!(
            err.to_string(),
            format!("400 Parameter verification failed.\nvmid: unable to create empty VM config - VM 100 already exists on node '{NODE}'")
        );
        assert_eq!(
            std::fs::read_to_string(server.vm_config(100)).unwrap(),
            "lock: create\n"
        );
    })
    .await
}

#[tokio::test]
async fn mtunnel_bad_parameters_are_400() {
    bounded(60, async {
        let mut server = TestServer::start();
        let client = server.client();

        let err = client
            .post("/nodes/elsewhere/qemu/100/mtunnel", &[])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"node": format!("node needs to be 'localhost' or local hostname '{NODE}'")}),
        );

        let err = client
            .post(&mtunnel_path(100), &[("storages", "local,Bad!")])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"storages": "invalid format - value 'Bad!' does not look like a valid storage ID"}),
        );
        let err = client
            .post(&mtunnel_path(100), &[("bridges", "vmbr0;br/x")])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"bridges": "invalid format - value 'br/x' does not look like a valid bridge ID"}),
        );

        let err = client
            .post(
                &mtunnel_path(100),
                &[("replica", "1"), ("storages", "local"), ("bridges", "vmbr0")],
            )
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"bridges": "not used with replica=1 (a replica keeps the source's NICs; 'vm start' checks their bridges once it is promoted)"}),
        );
        assert!(!server.vm_config(100).exists());

        let err = client
            .post(&mtunnel_path(100), &[("storages", "local"), ("force", "1")])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"force": "property is not defined in schema and the schema does not allow additional properties"}),
        );

        for vmid in ["99", "abc", "0100", "1000000000"] {
            let err = client.post(&mtunnel_path(vmid), &[]).await.unwrap_err();
            assert_param_error(
                &err,
                json!({"vmid": "invalid format - value does not look like a valid VM ID"}),
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(server.data.join("qemu-server"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn mtunnel_unusable_storage_or_bridge_leaves_no_config() {
    bounded(60, async {
        let mut server = TestServer::start();
        let client = server.client();
        let cases = [
            (
                ("storages", "nope"),
                "storage 'nope' does not exist".to_string(),
            ),
            (
                ("storages", "local,off"),
                "storage 'off' is disabled".to_string(),
            ),
            (
                ("storages", "isos"),
                "storage 'isos' does not support vm images".to_string(),
            ),
            (
                ("bridges", "vmbr0,vmbr9"),
                format!("bridge 'vmbr9' does not exist on node '{NODE}'"),
            ),
        ];
        for (param, msg) in cases {
            let err = client.post(&mtunnel_path(100), &[param]).await.unwrap_err();
            assert_http(&err, 500, &msg);
            assert!(!server.vm_config(100).exists(), "config left after '{msg}'");
            assert!(!server.socket(100).exists(), "socket left after '{msg}'");
        }
        // Empty lists are allowed.
        let data = client
            .post(&mtunnel_path(100), &[("storages", ""), ("bridges", "")])
            .await
            .unwrap();
        check_tunnel_reply(&server, 100, "root@pam!mtunnel", &data);
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn mtunnel_permission_checks_are_403() {
    bounded(60, async {
        let mut server = TestServer::start();
        let no_alloc = server.create_token(
            "mig@pve!noalloc",
            &["--privs", "Sys.Incoming,Datastore.AllocateSpace"],
        );
        let no_incoming = server.create_token(
            "mig@pve!noincoming",
            &["--privs", "VM.Allocate,Datastore.AllocateSpace"],
        );
        let no_space =
            server.create_token("mig@pve!nospace", &["--privs", "VM.Allocate,Sys.Incoming"]);
        let other_vm = server.create_token(
            "mig@pve!othervm",
            &["--privs", "VM.Allocate", "--path", "/vms/200"],
        );
        let cases = [
            (
                &no_alloc,
                vec![],
                "Permission check failed (/vms/100, VM.Allocate)",
            ),
            (
                &no_incoming,
                vec![],
                "Permission check failed (/, Sys.Incoming)",
            ),
            (
                &no_space,
                vec![("storages", "local")],
                "Permission check failed (/storage/local, Datastore.AllocateSpace)",
            ),
            (
                &other_vm,
                vec![],
                "Permission check failed (/vms/100, VM.Allocate)",
            ),
        ];
        for (token, params, msg) in cases {
            let err = server
                .client_with(token)
                .post(&mtunnel_path(100), &params)
                .await
                .unwrap_err();
            assert_http(&err, 403, msg);
            assert!(!server.vm_config(100).exists());
        }
        // Without storages the storage privilege is not needed.
        let data = server
            .client_with(&no_space)
            .post(&mtunnel_path(100), &[])
            .await
            .unwrap();
        check_tunnel_reply(&server, 100, "mig@pve!nospace", &data);
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn auth_failures_are_401_with_reason() {
    bounded(60, async {
        let mut server = TestServer::start();
        let secret = server.root_token.rsplit('=').next().unwrap().to_string();
        let cases: [(&str, &str); 6] = [
            (
                "",
                "authentication failure - no authentication credentials given",
            ),
            (
                "Bearer abc",
                "authentication failure - no authentication credentials given",
            ),
            (
                "PVEAPIToken=garbage",
                "authentication failure - invalid API token format",
            ),
            (
                "PVEAPIToken=root@pam!mtunnel=",
                "authentication failure - invalid API token format",
            ),
            (
                "PVEAPIToken=nobody@pam!x=secret",
                "authentication failure - invalid token value",
            ),
            (
                "PVEAPIToken=root@pam!mtunnel=wrong",
                "authentication failure - invalid token value",
            ),
        ];
        for (header, reason) in cases {
            let r = server
                .client_with(header)
                .raw(
                    Method::POST,
                    &format!("/api2/json{}", mtunnel_path(100)),
                    &[],
                    Vec::new(),
                )
                .await
                .unwrap();
            assert_eq!(
                (r.status, r.reason.as_str()),
                (401, reason),
                "header '{header}'"
            );
            assert_eq!(
                r.json(),
                json!({"data": null, "message": format!("{reason}\n")})
            );
            assert!(!server.vm_config(100).exists());
        }
        // The secret of one token does not open another.
        let r = server
            .client_with(&format!("PVEAPIToken=root@pam!other={secret}"))
            .get("/version", &[])
            .await
            .unwrap_err();
        assert_http(&r, 401, "authentication failure - invalid token value");
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn auth_failure_default_delay_is_3s() {
    bounded(60, async {
        let server = TestServer::start_with(Options {
            auth_delay_ms: None,
            ..Options::default()
        });
        let started = Instant::now();
        let err = server
            .client_with("PVEAPIToken=root@pam!mtunnel=wrong")
            .get("/version", &[])
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_http(&err, 401, "authentication failure - invalid token value");
        assert!(took >= Duration::from_millis(2900), "401 after {took:?}");
        // A good token is not delayed.
        let started = Instant::now();
        server.client().get("/version", &[]).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    })
    .await
}

#[tokio::test]
async fn token_header_variants_work() {
    bounded(60, async {
        let server = TestServer::start();
        let value = server.root_token.strip_prefix("PVEAPIToken=").unwrap();
        let (authid, secret) = value.split_once('=').unwrap();
        for header in [
            format!("PVEAPIToken {value}"),
            format!("PVEAPIToken=root%40pam%21mtunnel={secret}"),
        ] {
            let v = server.client_with(&header).get("/version", &[]).await;
            assert!(v.is_ok(), "header '{header}': {v:?}");
        }
        // The token id is the authenticated id: its tasks carry it.
        let data = server
            .client_with(&format!("PVEAPIToken {value}"))
            .post(&mtunnel_path(100), &[])
            .await
            .unwrap();
        check_tunnel_reply(&server, 100, authid, &data);
    })
    .await
}

#[tokio::test]
async fn initial_token_printed_once() {
    bounded(60, async {
        let mut server = TestServer::start();
        let printed: Vec<&String> = server
            .stdout
            .iter()
            .filter(|l| l.trim_start().starts_with("PVEAPIToken="))
            .collect();
        assert_eq!(printed.len(), 1, "{:?}", server.stdout);
        assert_eq!(printed[0].trim(), server.root_token);
        assert!(
            server
                .root_token
                .starts_with("PVEAPIToken=root@pam!mtunnel=")
        );
        assert!(
            server
                .stdout
                .iter()
                .any(|l| l == &format!("URL: {}", server.url))
        );
        server.restart();
        assert!(
            !server.stdout.iter().any(|l| l.contains("PVEAPIToken")),
            "{:?}",
            server.stdout
        );
        server.client().get("/version", &[]).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn oversized_body_and_headers_are_rejected() {
    bounded(60, async {
        let mut server = TestServer::start_with(Options {
            max_body_bytes: Some(64 * 1024),
            ..Options::default()
        });
        let client = server.client();
        let body = format!("storages=local&pad={}", "x".repeat(100 * 1024));
        let r = client
            .raw(
                Method::POST,
                &format!("/api2/json{}", mtunnel_path(100)),
                &[("Content-Type", "application/x-www-form-urlencoded")],
                body,
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str()),
            (413, "request entity too large (limit 65536 bytes)")
        );
        assert!(!server.vm_config(100).exists());
        still_serving(&mut server).await;

        let big = "y".repeat(80 * 1024);
        let r = client
            .raw(
                Method::GET,
                "/api2/json/version",
                &[("X-Big", &big)],
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 431);
        still_serving(&mut server).await;

        // A body on GET is refused, as pveproxy does.
        let r = client
            .raw(Method::GET, "/api2/json/version", &[], "a=b")
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str()),
            (501, "Unexpected content for method 'GET'")
        );
        still_serving(&mut server).await;
    })
    .await
}

// ---- the status page ----

/// The page's three files are served without a token (they hold no data), with headers
/// that keep the page to its own origin; the data routes it reads answer 401 without one.
#[tokio::test]
async fn status_page_files_are_served_without_a_token() {
    bounded(60, async {
        let server = TestServer::start();
        let anonymous = server.client_with("");
        let csp = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";
        for (path, content_type, marker) in [
            (
                "/",
                "text/html; charset=utf-8",
                "<script src=\"/mtunnel/status.js\" defer>",
            ),
            (
                "/mtunnel/status.js",
                "text/javascript; charset=utf-8",
                "mtunnel-status",
            ),
            ("/mtunnel/status.css", "text/css; charset=utf-8", "tr.task"),
        ] {
            let r = anonymous
                .raw(Method::GET, path, &[], Vec::new())
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{path}");
            let header = |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok());
            assert_eq!(header("content-type"), Some(content_type), "{path}");
            assert_eq!(header("content-security-policy"), Some(csp), "{path}");
            assert_eq!(header("referrer-policy"), Some("no-referrer"), "{path}");
            assert_eq!(header("x-content-type-options"), Some("nosniff"), "{path}");
            let body = String::from_utf8(r.body).unwrap();
            assert!(body.contains(marker), "{path}: {body}");
            // Static: nothing of the node in it.
            assert!(!body.contains(NODE), "{path}");
        }
        let r = anonymous
            .raw(Method::GET, "/mtunnel/other.js", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str()),
            (501, "no such API format or path '/mtunnel/other.js'")
        );
        let r = anonymous
            .raw(
                Method::GET,
                &format!("/api2/json/nodes/{NODE}/mtunnel-status"),
                &[],
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str()),
            (
                401,
                "authentication failure - no authentication credentials given"
            )
        );
    })
    .await
}

// ---- tasks ----

fn task_path(upid: &str, rest: &str) -> String {
    format!("/nodes/{NODE}/tasks/{upid}{rest}")
}

fn upids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| t["upid"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn task_list_shows_own_tasks() {
    bounded(60, async {
        let server = TestServer::start();
        // What opening a tunnel needs, without Sys.Audit.
        let mig = server.create_token("mig@pve!mig", &["--privs", "VM.Allocate,Sys.Incoming"]);
        let root_t = server.open_tunnel(100).await;
        let mig_t = common::Tunnel::from_reply(
            200,
            &server
                .client_with(&mig)
                .post(&mtunnel_path(200), &[])
                .await
                .unwrap(),
        );
        let root = server.client();
        let path = format!("/nodes/{NODE}/tasks");

        // Running tasks are `active`, not in the default `archive` list.
        let active = root.get(&path, &[("source", "active")]).await.unwrap();
        let mut got = upids(&active);
        got.sort();
        let mut want = vec![root_t.upid.clone(), mig_t.upid.clone()];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(
            upids(&root.get(&path, &[]).await.unwrap()),
            Vec::<String>::new()
        );

        // Without Sys.Audit a token sees its own tasks only.
        let mine = server
            .client_with(&mig)
            .get(&path, &[("source", "all")])
            .await
            .unwrap();
        assert_eq!(upids(&mine), [mig_t.upid.as_str()]);
        let entry = &mine[0];
        assert_eq!(entry["type"], "qmtunnel");
        assert_eq!(entry["id"], "200");
        // As PVE: the token id split into user and token name.
        assert_eq!(
            (&entry["user"], &entry["tokenid"]),
            (&json!("mig@pve"), &json!("mig"))
        );
        assert_eq!(entry["status"], "RUNNING");
        assert_eq!(entry["node"], NODE);

        // Filters.
        let only_100 = root
            .get(&path, &[("source", "all"), ("vmid", "100")])
            .await
            .unwrap();
        assert_eq!(upids(&only_100), [root_t.upid.as_str()]);
        let by_user = root
            .get(&path, &[("source", "all"), ("userfilter", "MIG@pve")])
            .await
            .unwrap();
        assert_eq!(upids(&by_user), [mig_t.upid.as_str()]);

        // Once stopped, a task is in the archive with its end status.
        root.delete(&task_path(&root_t.upid, ""), &[])
            .await
            .unwrap();
        server.wait_stopped(&root_t.upid, 10).await;
        let archive = root.get(&path, &[]).await.unwrap();
        assert_eq!(upids(&archive), [root_t.upid.as_str()]);
        assert_eq!(archive[0]["status"], "received interrupt");
        assert!(
            archive[0]["endtime"].as_u64().unwrap() >= archive[0]["starttime"].as_u64().unwrap()
        );
    })
    .await
}

/// Ends tunnel `t` with `quit` (no cleanup needed: nothing was created): its task ends OK.
async fn quit_tunnel(server: &TestServer, t: &common::Tunnel) {
    use futures_util::{SinkExt, StreamExt};
    let mut ws = server.connect(t).await;
    let quit =
        tokio_tungstenite::tungstenite::Message::binary(&b"{\"cmd\":\"quit\",\"cleanup\":1}\n"[..]);
    ws.send(quit).await.unwrap();
    let reply = ws.next().await;
    assert!(matches!(reply, Some(Ok(_))), "{reply:?}");
    drop(ws);
    let status = server.wait_stopped(&t.upid, 20).await;
    assert_eq!(status["exitstatus"], "OK", "{status}");
}

/// PVE's `node_tasks` (pve-manager `PVE/API2/Tasks.pm`): `source` is `archive` (default,
/// ended tasks), `active` or `all` (active first); `statusfilter` lists the status types
/// `ok`, `warning`, `error`, `unknown` (a task without status, i.e. a running one, is
/// `unknown`), `errors` means every type but `ok` and wins over `statusfilter`; `since`
/// and `until` bound the start time; `total` counts every match, `start`/`limit` page.
#[tokio::test]
async fn task_list_filters_as_pve() {
    bounded(60, async {
        let server = TestServer::start();
        let before = now();
        let ok = server.open_tunnel(101).await;
        quit_tunnel(&server, &ok).await;
        let failed = server.open_tunnel(102).await;
        let root = server.client();
        root.delete(&task_path(&failed.upid, ""), &[]).await.unwrap();
        server.wait_stopped(&failed.upid, 10).await;
        let running = server.open_tunnel(103).await;
        let after = now();
        let path = format!("/nodes/{NODE}/tasks");
        let list = |params: Vec<(&'static str, String)>| {
            let root = root.clone();
            let path = path.clone();
            async move {
                let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let raw = root
                    .raw(Method::GET, &format!("/api2/json{path}?{}", query(&params)), &[], Vec::new())
                    .await
                    .unwrap();
                assert_eq!(raw.status, 200, "{params:?}: {}", String::from_utf8_lossy(&raw.body));
                let body = raw.json();
                (upids(&body["data"]), body["total"].as_u64().unwrap())
            }
        };
        let s = |v: &str| v.to_string();
        let (ok, failed, running) = (ok.upid, failed.upid, running.upid);
        let cases: Vec<ListCase> = vec![
            (vec![], vec![&failed, &ok]),
            (vec![("source", s("active"))], vec![&running]),
            (vec![("source", s("all"))], vec![&running, &failed, &ok]),
            (vec![("source", s("all")), ("errors", s("1"))], vec![&running, &failed]),
            (vec![("source", s("all")), ("statusfilter", s("ok"))], vec![&ok]),
            (vec![("source", s("all")), ("statusfilter", s("OK;Error"))], vec![&failed, &ok]),
            (vec![("source", s("all")), ("statusfilter", s("unknown"))], vec![&running]),
            (vec![("source", s("all")), ("statusfilter", s("warning"))], vec![]),
            (vec![("source", s("all")), ("statusfilter", s("ok")), ("errors", s("1"))], vec![&running, &failed]),
            (vec![("source", s("all")), ("typefilter", s("qmtunnel"))], vec![&running, &failed, &ok]),
            (vec![("source", s("all")), ("typefilter", s("vzdump"))], vec![]),
            (vec![("source", s("all")), ("vmid", s("102"))], vec![&failed]),
            (vec![("source", s("all")), ("since", before.to_string()), ("until", after.to_string())], vec![&running, &failed, &ok]),
            (vec![("source", s("all")), ("since", (after + 1).to_string())], vec![]),
            (vec![("source", s("all")), ("until", (before - 1).to_string())], vec![]),
        ];
        for (params, want) in cases {
            let (got, total) = list(params.clone()).await;
            assert_eq!(got, want.iter().map(|u| u.as_str()).collect::<Vec<_>>(), "{params:?}");
            assert_eq!(total as usize, want.len(), "{params:?}");
        }
        // `total` counts every match; `start` and `limit` page through them.
        let page = list(vec![("source", s("all")), ("start", s("1")), ("limit", s("1"))]).await;
        assert_eq!(page, (vec![failed.clone()], 3));

        // Bad values: PVE's messages, every bad parameter at once.
        let err = root
            .get(
                &path,
                &[
                    ("source", "bogus"),
                    ("vmid", "5"),
                    ("statusfilter", "ok,running"),
                    ("since", "yesterday"),
                ],
            )
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({
                "source": "value 'bogus' does not have a value in the enumeration 'archive, active, all'",
                "vmid": "invalid format - value does not look like a valid VM ID",
                "statusfilter": "invalid format - invalid status 'running'",
                "since": "type check ('integer') failed - got 'yesterday'",
            }),
        );
        let err = root.get(&path, &[("vmid", "abc")]).await.unwrap_err();
        assert_param_error(&err, json!({"vmid": "type check ('integer') failed - got 'abc'"}));
    })
    .await
}

/// Query parameters of a task list request and the UPIDs it must list, in order.
type ListCase<'a> = (Vec<(&'static str, String)>, Vec<&'a String>);

fn query(params: &[(&str, &str)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}", pct(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn task_status_raw_and_percent_encoded_upid() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let client = server.client();
        let raw = client
            .get(&task_path(&t.upid, "/status"), &[])
            .await
            .unwrap();
        let f: Vec<&str> = t.upid.split(':').collect();
        assert_eq!(
            raw,
            json!({
                "upid": t.upid, "node": NODE,
                "pid": u32::from_str_radix(f[2], 16).unwrap(),
                "pstart": u64::from_str_radix(f[3], 16).unwrap(),
                "starttime": u64::from_str_radix(f[4], 16).unwrap(),
                "type": "qmtunnel", "id": "100", "user": "root@pam",
                "tokenid": "mtunnel", "status": "running",
            })
        );
        // pve-api-types: /api2/extjs and every path parameter percent-encoded.
        let encoded = client
            .raw(
                Method::GET,
                &format!("/api2/extjs/nodes/{NODE}/tasks/{}/status", pct(&t.upid)),
                &[],
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(pct(&t.upid).contains("%3A") && pct(&t.upid).contains("%40"));
        assert_eq!(encoded.status, 200);
        assert_eq!(encoded.json()["data"], raw);
        assert_eq!(encoded.json()["success"], 1);
        // The index of a task.
        let index = client
            .get(&task_path(&pct(&t.upid), ""), &[])
            .await
            .unwrap();
        assert_eq!(index, json!([{"name": "log"}, {"name": "status"}]));

        // Stopped: `exitstatus` appears.
        client.delete(&task_path(&t.upid, ""), &[]).await.unwrap();
        let stopped = server.wait_stopped(&t.upid, 10).await;
        let mut want = raw.clone();
        want["status"] = json!("stopped");
        want["exitstatus"] = json!("received interrupt");
        assert_eq!(stopped, want);
    })
    .await
}

#[tokio::test]
async fn task_log_pages() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let client = server.client();
        let r = client
            .raw(
                Method::GET,
                &format!("/api2/json{}?start=0&limit=50", task_path(&t.upid, "/log")),
                &[],
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json(),
            json!({"data": [{"n": 1, "t": "mtunnel started"}], "total": 1})
        );
        client.delete(&task_path(&t.upid, ""), &[]).await.unwrap();
        server.wait_stopped(&t.upid, 10).await;
        assert_eq!(
            server.task_log(&t.upid).await,
            [
                "mtunnel started",
                "tunnel stopped before the source connected: cleaning up",
                "cleanup: removed config of VM 100",
                "TASK ERROR: received interrupt"
            ]
        );
        let page = client
            .get(
                &task_path(&t.upid, "/log"),
                &[("start", "3"), ("limit", "1")],
            )
            .await
            .unwrap();
        assert_eq!(
            page,
            json!([{"n": 4, "t": "TASK ERROR: received interrupt"}])
        );
        let err = client
            .get(&task_path(&t.upid, "/log"), &[("start", "-1")])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"start": "value must have a minimum value of 0"}),
        );
    })
    .await
}

#[tokio::test]
async fn task_delete_stops_waiting_worker() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let client = server.client();
        let r = client
            .raw(
                Method::DELETE,
                &format!("/api2/json{}", task_path(&t.upid, "")),
                &[],
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!((r.status, r.json()), (200, json!({"data": null})));
        let status = server.wait_stopped(&t.upid, 10).await;
        assert_eq!(status["exitstatus"], "received interrupt");
        assert!(
            eventually(Duration::from_secs(5), || !server.vm_config(100).exists()).await,
            "reserved config not removed"
        );
        // The VMID is free again.
        server.open_tunnel(100).await;
    })
    .await
}

#[tokio::test]
async fn task_of_other_token_is_403() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        // May open tunnels, but has no Sys.Audit (the role PVEMigrationTarget has: PVE's
        // /cluster/status needs it, and with it come others' tasks, as in PVE).
        let other = server.create_token("mig@pve!other", &["--privs", "VM.Allocate,Sys.Incoming"]);
        let client = server.client_with(&other);
        for rest in ["/status", "/log", ""] {
            let err = client
                .get(&task_path(&t.upid, rest), &[])
                .await
                .unwrap_err();
            assert_http(
                &err,
                403,
                &format!("Permission check failed (/nodes/{NODE}, Sys.Audit)"),
            );
        }
        let err = client
            .delete(&task_path(&t.upid, ""), &[])
            .await
            .unwrap_err();
        assert_http(
            &err,
            403,
            &format!("Permission check failed (/nodes/{NODE}, Sys.Modify)"),
        );
        // Still running: the refused DELETE stopped nothing.
        let status = server
            .client()
            .get(&task_path(&t.upid, "/status"), &[])
            .await
            .unwrap();
        assert_eq!(status["status"], "running");
        // An auditor may look but not stop.
        let auditor = server.create_token("audit@pve!a", &["--role", "PVEAuditor"]);
        let audit = server.client_with(&auditor);
        audit
            .get(&task_path(&t.upid, "/status"), &[])
            .await
            .unwrap();
        let err = audit
            .delete(&task_path(&t.upid, ""), &[])
            .await
            .unwrap_err();
        assert_http(
            &err,
            403,
            &format!("Permission check failed (/nodes/{NODE}, Sys.Modify)"),
        );
    })
    .await
}

/// When a request has several faults, which one is answered is wire behaviour: an
/// undeclared parameter first, then the path, then the privilege and the parameters'
/// values in the order each endpoint declares (`src/api/endpoint.rs`, `Precedence`).
#[tokio::test]
async fn the_declared_order_decides_which_fault_is_answered() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let nobody = server.create_token("mig@pve!nobody", &["--privs", "Datastore.Audit"]);
        let client = server.client_with(&nobody);
        // Undeclared parameter before the privilege.
        let err = client.get("/cluster/status", &[("x", "1")]).await.unwrap_err();
        assert_param_error(
            &err,
            json!({"x": "property is not defined in schema and the schema does not allow additional properties"}),
        );
        // The path's node before the privilege.
        let other_node = format!("/nodes/elsewhere/tasks/{}/log", t.upid);
        let err = client.get(&other_node, &[]).await.unwrap_err();
        assert_param_error(
            &err,
            json!({"node": format!("node needs to be 'localhost' or local hostname '{NODE}'")}),
        );
        // A task's log: the privilege before the parameters' values.
        let err = client
            .get(&task_path(&t.upid, "/log"), &[("start", "-1")])
            .await
            .unwrap_err();
        assert_http(
            &err,
            403,
            &format!("Permission check failed (/nodes/{NODE}, Sys.Audit)"),
        );
        // Opening a tunnel: the parameters' values before the privilege.
        let err = client
            .post(&mtunnel_path(101), &[("storages", "Bad!")])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"storages": "invalid format - value 'Bad!' does not look like a valid storage ID"}),
        );
        let err = client.post(&mtunnel_path(101), &[]).await.unwrap_err();
        assert_http(&err, 403, "Permission check failed (/vms/101, VM.Allocate)");
    })
    .await
}

#[tokio::test]
async fn garbage_upid_is_400() {
    bounded(60, async {
        let mut server = TestServer::start();
        let client = server.client();
        for bad in [
            "garbage",
            "UPID:testnode:zz:1:2:qmtunnel:100:root@pam:",
            "UPID:testnode:00000001:00000002:00000003:qmtunnel:100:root@pam",
        ] {
            let err = client
                .get(&task_path(&pct(bad), "/status"), &[])
                .await
                .unwrap_err();
            assert_param_error(
                &err,
                json!({"upid": format!("unable to parse worker upid '{bad}'")}),
            );
        }
        // Well-formed but unknown, or of another node.
        for unknown in [
            format!("UPID:{NODE}:00000001:00000002:00000003:qmtunnel:100:root@pam!mtunnel:"),
            "UPID:othernode:00000001:00000002:00000003:qmtunnel:100:root@pam!mtunnel:".to_string(),
        ] {
            for (method, rest) in [
                (Method::GET, "/status"),
                (Method::GET, "/log"),
                (Method::DELETE, ""),
            ] {
                let err = client
                    .call(method, &task_path(&unknown, rest), &[])
                    .await
                    .unwrap_err();
                assert_param_error(&err, json!({"upid": "no such task"}));
            }
        }
        still_serving(&mut server).await;
    })
    .await
}

#[tokio::test]
async fn task_status_survives_restart() {
    bounded(60, async {
        let mut server = TestServer::start();
        let done = server.open_tunnel(100).await;
        server
            .client()
            .delete(&task_path(&done.upid, ""), &[])
            .await
            .unwrap();
        let before = server.wait_stopped(&done.upid, 10).await;
        let running = server.open_tunnel(101).await;

        server.restart();
        let client = server.client();
        let after = client
            .get(&task_path(&done.upid, "/status"), &[])
            .await
            .unwrap();
        assert_eq!(after, before);
        assert_eq!(
            server.task_log(&done.upid).await,
            [
                "mtunnel started",
                "tunnel stopped before the source connected: cleaning up",
                "cleanup: removed config of VM 100",
                "TASK ERROR: received interrupt"
            ]
        );
        // Killed mid-task: the restart recovered the tunnel and ended its log.
        let killed = client
            .get(&task_path(&running.upid, "/status"), &[])
            .await
            .unwrap();
        assert_eq!(killed["status"], "stopped");
        assert_eq!(
            killed["exitstatus"],
            "mtunnel was stopped or crashed during the migration; recovered at restart"
        );
        assert!(!server.vm_config(101).exists(), "reservation left behind");
        let all = client
            .get(&format!("/nodes/{NODE}/tasks"), &[("source", "all")])
            .await
            .unwrap();
        assert_eq!(upids(&all).len(), 2);
    })
    .await
}

#[tokio::test]
async fn tunnel_accept_timeout_removes_config() {
    bounded(60, async {
        let server = TestServer::start_with(Options {
            accept_timeout_secs: Some(2),
            ..Options::default()
        });
        let t = server.open_tunnel(100).await;
        assert!(server.vm_config(100).exists());
        let started = Instant::now();
        let status = server.wait_stopped(&t.upid, 15).await;
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(status["exitstatus"], "Exiting mtunnel");
        assert!(
            !server.vm_config(100).exists(),
            "reserved config left behind"
        );
        assert_eq!(
            server.task_log(&t.upid).await,
            [
                "mtunnel started",
                "mtunnel timeout: no connection within 2 s",
                "no control connection: cleaning up",
                "cleanup: removed config of VM 100",
                "TASK ERROR: Exiting mtunnel"
            ]
        );
    })
    .await
}

// ---- HTTP limits: reason phrase, body read timeout ----

#[tokio::test]
async fn long_error_message_gets_a_capped_reason_phrase() {
    bounded(60, async {
        let mut server = TestServer::start();
        // 100 000 characters of one storage id: the message quotes it whole.
        let id = format!("s{}", "x".repeat(99_999));
        let r = server
            .client()
            .raw(
                Method::POST,
                &format!("/api2/json{}", mtunnel_path(100)),
                &[("Content-Type", "application/x-www-form-urlencoded")],
                format!("storages={id}"),
            )
            .await
            .unwrap();
        let message = r.json()["message"].as_str().unwrap().to_string();
        assert_eq!(r.status, 500, "{}", r.reason);
        assert_eq!(message, format!("storage '{id}' does not exist\n"));
        // The reason phrase: the message's start, cut to 200 bytes and marked.
        assert_eq!(r.reason, format!("storage '{}...", &id[..188]));
        assert_eq!(r.reason.len(), 200);
        assert!(!server.vm_config(100).exists());
        still_serving(&mut server).await;
    })
    .await
}

/// Reads an HTTP response head from `s` (up to the blank line); returns its status line.
async fn status_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_err() {
            break;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    text.split("\r\n").next().unwrap_or("").to_string()
}

#[tokio::test]
async fn trickled_body_times_out_with_408() {
    bounded(60, async {
        use tokio::io::AsyncWriteExt;
        let mut server = TestServer::start_with(Options {
            extra_toml: "body_read_timeout_secs = 1\n".into(),
            ..Options::default()
        });
        let config = mtunnel::net::tls::client_config(Some(&server.fingerprint)).unwrap();
        let tls = mtunnel::net::tls::connect(&server.host, server.port, &config)
            .await
            .unwrap();
        let (mut read, mut write) = tokio::io::split(tls);
        let head = format!(
            "POST /api2/json{} HTTP/1.1\r\nHost: {}:{}\r\nAuthorization: {}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n",
            mtunnel_path(100),
            server.host,
            server.port,
            server.root_token
        );
        write.write_all(head.as_bytes()).await.unwrap();
        write.flush().await.unwrap();
        // One byte every 200 ms: 1000 bytes would take 200 s.
        let trickle = tokio::spawn(async move {
            loop {
                if write.write_all(b"s").await.is_err() || write.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let started = Instant::now();
        let line = status_line(&mut read).await;
        let took = started.elapsed();
        trickle.abort();
        assert_eq!(
            line,
            "HTTP/1.1 408 request body not received within 1 s (body_read_timeout_secs)"
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(!server.vm_config(100).exists());
        still_serving(&mut server).await;
    })
    .await
}

/// One keep-alive HTTP exchange on a plain connection: the status code and whether the
/// server closes the connection after it.
async fn plain_exchange(conn: &mut tokio::net::TcpStream, token: &str) -> (u16, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req =
        format!("GET /api2/json/version HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    let head_end = loop {
        let n = conn.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "connection closed before a reply");
        got += n;
        if let Some(pos) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    (status, head.contains("connection: close"))
}

#[tokio::test]
async fn tunnel_and_connection_caps_answer_503() {
    bounded(60, async {
        let server = TestServer::start_with(Options {
            extra_toml: "max_tunnels = 1\nmax_connections = 3\ntls = false\n".into(),
            ..Options::default()
        });
        let client = ApiClient::plain(server.host.clone(), server.port, server.root_token.clone());
        let first = client.post(&mtunnel_path(100), &[]).await.unwrap();
        let upid = first["upid"].as_str().unwrap().to_string();
        let err = client.post(&mtunnel_path(101), &[]).await.unwrap_err();
        assert_http(
            &err,
            503,
            "too many open tunnels on node 'testnode' (max_tunnels = 1) - try again later",
        );
        assert!(
            !server.vm_config(101).exists(),
            "a refused tunnel reserves nothing"
        );
        client.delete(&task_path(&upid, ""), &[]).await.unwrap();
        let mut stopped = false;
        for _ in 0..100 {
            let st = client.get(&task_path(&upid, "/status"), &[]).await.unwrap();
            if st["status"] == "stopped" {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(stopped, "the stopped tunnel's task ends");
        // Three kept-alive connections that were answered hold the three slots.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut conn = tokio::net::TcpStream::connect((server.host.as_str(), server.port))
                .await
                .unwrap();
            assert_eq!(
                plain_exchange(&mut conn, &server.root_token).await,
                (200, false)
            );
            held.push(conn);
        }
        // One more is answered 503 once, with PVE's text, and closed.
        let err = client.get("/version", &[]).await.unwrap_err();
        assert_http(
            &err,
            503,
            "too many connections (max_connections = 3) - try again later",
        );
        let mut extra = tokio::net::TcpStream::connect((server.host.as_str(), server.port))
            .await
            .unwrap();
        assert_eq!(
            plain_exchange(&mut extra, &server.root_token).await,
            (503, true)
        );
        // A freed slot serves again.
        held.pop();
        let mut served = false;
        for _ in 0..50 {
            if client.get("/version", &[]).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served, "a freed slot serves again");
    })
    .await
}

/// Issue 17: the tunnel cap was checked, then several awaits passed before the tunnel was
/// registered, so 100 concurrent opens with `max_tunnels = 4` opened 11, 53 or 6 tunnels.
/// Now exactly the cap opens, every other request gets the 503 and reserves nothing, and
/// the places are free again once the tunnels ended.
#[tokio::test]
async fn max_tunnels_holds_under_concurrent_opens() {
    const CONCURRENT: u32 = 64;
    bounded(120, async {
        let server = TestServer::start_with(Options {
            extra_toml: "max_tunnels = 4\ntls = false\n".into(),
            ..Options::default()
        });
        let client = ApiClient::plain(server.host.clone(), server.port, server.root_token.clone())
            .with_timeout(Duration::from_secs(60));
        let open_all = |first: u32, count: u32| {
            let requests = (first..first + count).map(|vmid| {
                let client = client.clone();
                tokio::spawn(async move { (vmid, client.post(&mtunnel_path(vmid), &[]).await) })
            });
            futures_util::future::join_all(requests)
        };
        let busy = "too many open tunnels on node 'testnode' (max_tunnels = 4) - try again later";
        let mut opened = Vec::new();
        for joined in open_all(100, CONCURRENT).await {
            let (vmid, reply) = joined.unwrap();
            match reply {
                Ok(data) => opened.push((vmid, data["upid"].as_str().unwrap().to_string())),
                Err(err) => {
                    assert_http(&err, 503, busy);
                    assert!(
                        !server.vm_config(vmid).exists(),
                        "refused {vmid} reserved nothing"
                    );
                }
            }
        }
        let vmids = opened.iter().map(|(vmid, _)| *vmid).collect::<Vec<_>>();
        assert_eq!(vmids.len(), 4, "opened tunnels for {vmids:?}");
        for (vmid, upid) in &opened {
            assert!(server.vm_config(*vmid).exists());
            client.delete(&task_path(upid, ""), &[]).await.unwrap();
        }
        for (_, upid) in &opened {
            let mut stopped = false;
            for _ in 0..300 {
                let st = client.get(&task_path(upid, "/status"), &[]).await.unwrap();
                if st["status"] == "stopped" {
                    stopped = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(stopped, "the stopped tunnel {upid} ends");
        }
        // The ended tunnels gave their places back: the cap admits four again, no more.
        let again = open_all(1000, 5).await;
        let refused = again
            .into_iter()
            .filter_map(|joined| joined.unwrap().1.err())
            .collect::<Vec<_>>();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_http(&refused[0], 503, busy);
    })
    .await
}

#[tokio::test]
async fn datacenter_manager_calls() {
    bounded(60, async {
        let server = TestServer::start();
        let client = server.client();
        assert_eq!(
            client.get("/cluster/nextid", &[]).await.unwrap(),
            json!("100")
        );
        let t = server.open_tunnel(100).await;
        // An open tunnel's reservation counts; a taken VMID is PVE's parameter error.
        assert_eq!(
            client.get("/cluster/nextid", &[]).await.unwrap(),
            json!("101")
        );
        assert_eq!(
            client
                .get("/cluster/nextid", &[("vmid", "105")])
                .await
                .unwrap(),
            json!("105")
        );
        let err = client
            .get("/cluster/nextid", &[("vmid", "100")])
            .await
            .unwrap_err();
        assert_param_error(&err, json!({"vmid": "VM 100 already exists"}));
        // Bridges, on the node's name and on "localhost" (PDM's default).
        for node in [NODE, "localhost"] {
            let list = client
                .get(&format!("/nodes/{node}/network"), &[("type", "any_bridge")])
                .await
                .unwrap();
            let vmbr0 = list
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["iface"] == "vmbr0")
                .cloned()
                .unwrap_or_else(|| panic!("vmbr0 missing: {list}"));
            assert_eq!(vmbr0["type"], "bridge", "{vmbr0}");
        }
        let none = client
            .get(&format!("/nodes/{NODE}/network"), &[("type", "eth")])
            .await
            .unwrap();
        assert_eq!(none, json!([]));
        // The calling token's permissions.
        let perms = client
            .get("/access/permissions", &[("path", "/vms/100")])
            .await
            .unwrap();
        assert_eq!(perms["/vms/100"]["VM.Allocate"], 1, "{perms}");
        let scoped =
            server.create_token("mig@pve!t", &["--privs", "VM.Allocate", "--path", "/vms"]);
        let mine = server
            .client_with(&scoped)
            .get("/access/permissions", &[])
            .await
            .unwrap();
        assert_eq!(mine, json!({"/vms": {"VM.Allocate": 1}}));
        assert_eq!(
            client
                .get("/cluster/qemu/custom-cpu-models", &[])
                .await
                .unwrap(),
            json!([])
        );
        // PDM speaks extjs and reads `success`.
        let r = client
            .raw(Method::GET, "/api2/extjs/cluster/nextid", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(
            r.json(),
            json!({"data": "101", "success": 1, "status": 200})
        );
        client.delete(&task_path(&t.upid, ""), &[]).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn storage_list_as_datacenter_manager_asks() {
    bounded(60, async {
        let server = TestServer::start();
        // PDM: `content` joined with NUL (any of them), `format=1`, on node "localhost".
        let list = server
            .client()
            .get(
                "/nodes/localhost/storage",
                &[
                    ("content", "images\0rootdir"),
                    ("enabled", "1"),
                    ("format", "1"),
                ],
            )
            .await
            .unwrap();
        let local = &list[0];
        assert_eq!(local["storage"], "local", "{list}");
        assert_eq!(local["content"], "images");
        assert_eq!(
            local["formats"],
            json!({"default": "raw", "supported": ["raw", "qcow2"]})
        );
        assert_eq!(local["format"], json!([{"raw": 1, "qcow2": 1}, "raw"]));
        assert!(local["total"].as_u64().unwrap() > 0, "{local}");
    })
    .await
}

/// Issue 22: what Datacenter Manager and PVE's tools read, answered as pve-manager and
/// pve-storage answer it (each case names PVE's behaviour).
#[tokio::test]
async fn pdm_reads_what_pve_answers() {
    bounded(60, async {
        let server = TestServer::start();
        let client = server.client();
        // 1. `/cluster/status` needs Sys.Audit on `/` (pve-manager: check perm '/').
        let nodes_only =
            server.create_token("aud@pve!t", &["--privs", "Sys.Audit", "--path", "/nodes"]);
        let err = server
            .client_with(&nodes_only)
            .get("/cluster/status", &[])
            .await
            .unwrap_err();
        assert_http(&err, 403, "Permission check failed (/, Sys.Audit)");
        // 2. `any_local_bridge` lists the local bridges (bridges and OVS bridges, no vnets).
        let network = format!("/nodes/{NODE}/network");
        let local = client
            .get(&network, &[("type", "any_local_bridge")])
            .await
            .unwrap();
        assert!(
            local
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["iface"] == "vmbr0"),
            "{local}"
        );
        // 3. An unknown type is a parameter error (the schema's enum).
        let err = client
            .get(&network, &[("type", "nosuchtype")])
            .await
            .unwrap_err();
        assert_param_error(
            &err,
            json!({"type": "value 'nosuchtype' does not have a value in the enumeration 'bridge, \
                    bond, eth, alias, vlan, fabric, OVSBridge, OVSBond, OVSPort, OVSIntPort, vnet, \
                    any_bridge, any_local_bridge, include_sdn'"}),
        );
        // 4. A disabled storage is never activated: enabled 0, active 0, sizes 0.
        let storage = format!("/nodes/{NODE}/storage");
        let off = client.get(&storage, &[("storage", "off")]).await.unwrap();
        assert_eq!(
            off,
            json!([{"storage": "off", "type": "dir", "content": "images", "enabled": 0,
                    "active": 0, "shared": 0, "total": 0, "avail": 0, "used": 0}])
        );
        // 5. A content filter drops disabled storages, `enabled` or not.
        let images = client
            .get(&storage, &[("content", "images")])
            .await
            .unwrap();
        let ids: Vec<&str> = images
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["storage"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["local"]);
        // And an enabled storage has `used_fraction` (used / total).
        let l = &images[0];
        let fraction = l["used"].as_f64().unwrap() / l["total"].as_f64().unwrap();
        assert_eq!(l["used_fraction"].as_f64(), Some(fraction), "{l}");
        // 6. A storage asked for by name that does not exist (or that the content filter
        // leaves out) is a parameter error.
        for query in [
            vec![("storage", "nosuch")],
            vec![("storage", "off"), ("content", "images")],
        ] {
            let err = client.get(&storage, &query).await.unwrap_err();
            assert_param_error(&err, json!({"storage": "No such storage."}));
        }
        // 7. `/storage/{id}/status` (PDM's storage view).
        let status = client
            .get(&format!("{storage}/local/status"), &[])
            .await
            .unwrap();
        assert_eq!(
            (&status["type"], &status["enabled"], &status["active"]),
            (&json!("dir"), &json!(1), &json!(1)),
            "{status}"
        );
        assert!(status["total"].as_u64().unwrap() > 0 && status.get("storage").is_none());
        let status = client
            .get(&format!("{storage}/off/status"), &[])
            .await
            .unwrap();
        assert_eq!(
            status,
            json!({"type": "dir", "content": "images", "enabled": 0, "active": 0,
                   "shared": 0, "total": 0, "avail": 0, "used": 0})
        );
        let err = client
            .get(&format!("{storage}/nosuch/status"), &[])
            .await
            .unwrap_err();
        assert_param_error(&err, json!({"storage": "No such storage."}));
        let err = server
            .client_with(&nodes_only)
            .get(&format!("{storage}/local/status"), &[])
            .await
            .unwrap_err();
        assert_http(
            &err,
            403,
            "Permission check failed (/storage/local, Datastore.Audit|Datastore.AllocateSpace)",
        );
        // 8. Without `path`, PVE lists its top-level paths with the inherited privileges.
        let perms = client.get("/access/permissions", &[]).await.unwrap();
        let paths: Vec<&String> = perms.as_object().unwrap().keys().collect();
        assert_eq!(
            paths,
            [
                "/",
                "/access",
                "/access/groups",
                "/nodes",
                "/pool",
                "/sdn",
                "/storage",
                "/vms"
            ]
        );
        assert_eq!(perms["/access/groups"]["Sys.Audit"], 1, "{perms}");
    })
    .await
}
