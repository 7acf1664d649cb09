//! Unit tests of the scripted backend: the defaults, overrides, `backend.sleep`, load errors.

use super::*;
use crate::config::{ConfigFile, Overrides};
use crate::guest::hypervisor::Hypervisor;
use crate::storage::Storage;
use tokio::io::AsyncRead;

fn cfg() -> NodeConfig {
    NodeConfig::from_parts(
        ConfigFile::default(),
        &Overrides {
            node: Some("t".into()),
            data_dir: Some(PathBuf::from("/nonexistent/d")),
            run_dir: Some(PathBuf::from("/nonexistent/r")),
            ..Default::default()
        },
    )
    .unwrap()
}

fn backend(code: &str) -> Arc<ScriptedBackend> {
    ScriptedBackend::from_source(code, "inline.lua", &cfg()).unwrap()
}

fn stream(size: u64, payload: &[u8]) -> Box<dyn AsyncRead + Send + Unpin> {
    let mut bytes = size.to_le_bytes().to_vec();
    bytes.extend_from_slice(payload);
    Box::new(std::io::Cursor::new(bytes))
}

fn req(volname: &str, format: &str, allow_rename: bool) -> ImportRequest {
    ImportRequest {
        storage: "local".into(),
        vmid: 100,
        volname: volname.into(),
        format: format.into(),
        stream_format: format!("{format}+size"),
        allow_rename,
    }
}

#[tokio::test]
async fn default_storage_behaves_like_a_dir_storage() {
    let b = backend("return nil");
    assert_eq!(
        b.alloc("local", 100, "raw", None, 1024).await.unwrap(),
        "local:100/vm-100-disk-0.raw"
    );
    assert_eq!(
        b.alloc("local", 100, "qcow2", None, 2).await.unwrap(),
        "local:100/vm-100-disk-1.qcow2"
    );
    assert_eq!(
        b.volume_size("local:100/vm-100-disk-1.qcow2")
            .await
            .unwrap(),
        2048
    );
    assert_eq!(
        b.volume_format("local:100/vm-100-disk-0.raw")
            .await
            .unwrap(),
        "raw"
    );
    assert_eq!(
        b.path("local:100/vm-100-disk-0.raw").unwrap(),
        PathBuf::from("/nonexistent/d/images/100/vm-100-disk-0.raw")
    );
    let exists = b
        .alloc("local", 100, "raw", Some("vm-100-disk-0"), 1)
        .await
        .unwrap_err();
    assert_eq!(
        exists.to_string(),
        "disk image '/nonexistent/d/images/100/vm-100-disk-0.raw' already exists"
    );
    assert_eq!(
        b.alloc("local", 100, "vmdk", None, 1)
            .await
            .unwrap_err()
            .to_string(),
        "unsupported format 'vmdk' for storage type dir"
    );
    assert_eq!(
        b.alloc("nope", 100, "raw", None, 1)
            .await
            .unwrap_err()
            .to_string(),
        "storage 'nope' does not exist"
    );
    assert_eq!(
        b.import_formats("local", "qcow2").unwrap(),
        vec!["qcow2+size".to_string()]
    );
    b.free("local:100/vm-100-disk-0.raw").await.unwrap();
    assert_eq!(
        b.free("local:100/vm-100-disk-0.raw")
            .await
            .unwrap_err()
            .to_string(),
        "volume 'local:100/vm-100-disk-0.raw' does not exist: no file \
         '/nonexistent/d/images/100/vm-100-disk-0.raw'"
    );
    assert!(matches!(
        b.free("local:../etc").await.unwrap_err(),
        StorageError::InvalidVolid { .. }
    ));
    assert_eq!(
        b.volumes(),
        vec!["local:100/vm-100-disk-1.qcow2".to_string()]
    );
    assert_eq!(
        b.bwlimit("migration", &[Some("local".into())], Some(10)),
        Some(10)
    );
}

#[tokio::test]
async fn default_import_reads_the_stream_and_checks_raw_lengths() {
    let b = backend("return {}");
    let volid = b
        .import(req("vm-100-disk-0.qcow2", "raw", false), stream(4, b"abcd"))
        .await
        .unwrap();
    assert_eq!(volid, "local:100/vm-100-disk-0.raw");
    assert_eq!(b.volume_size(&volid).await.unwrap(), 4);
    // taken: an error without allow_rename, the next free name with it
    let err = b
        .import(req("vm-100-disk-0", "raw", false), stream(4, b"abcd"))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Exists { .. }), "{err}");
    let renamed = b
        .import(req("vm-100-disk-0", "raw", true), stream(4, b"abcd"))
        .await
        .unwrap();
    assert_eq!(renamed, "local:100/vm-100-disk-1.raw");
    // qcow2 payloads are files: their length is not the virtual size
    assert_eq!(
        b.import(
            req("vm-100-disk-5", "qcow2", false),
            stream(1 << 30, b"QFI")
        )
        .await
        .unwrap(),
        "local:100/vm-100-disk-5.qcow2"
    );
    let short = b
        .import(req("vm-100-disk-7", "raw", false), stream(10, b"abc"))
        .await
        .unwrap_err();
    assert_eq!(
        short.to_string(),
        "import stream for '/nonexistent/d/images/100/vm-100-disk-7.raw' ended early: got 3 of 10 bytes"
    );
    let long = b
        .import(req("vm-100-disk-7", "raw", false), stream(1, b"abc"))
        .await
        .unwrap_err();
    assert!(matches!(long, StorageError::LongStream { .. }), "{long}");
    let headless = b
        .import(
            req("vm-100-disk-7", "raw", false),
            Box::new(std::io::Cursor::new(vec![1u8, 2])),
        )
        .await
        .unwrap_err();
    assert!(matches!(headless, StorageError::MissingSizeHeader));
    let mut wrong = req("vm-100-disk-7", "raw", false);
    wrong.stream_format = "qcow2+size".into();
    assert_eq!(
        b.import(wrong, stream(0, b""))
            .await
            .unwrap_err()
            .to_string(),
        "no matching import/export format found for storage 'local'"
    );
    assert_eq!(b.calls.raw_get::<i64>("storage.import").unwrap(), 8);
}

#[tokio::test]
async fn default_hypervisor_tracks_running_vms() {
    let b = backend("return nil");
    let start = |nbd: &[(&str, &str)]| IncomingStart {
        vmid: 100,
        config: crate::guest::VmConfig::default(),
        machine: None,
        cpu: None,
        nbd: nbd
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    assert_eq!(
        b.resume(100).await.unwrap_err().to_string(),
        "VM 100 not running"
    );
    let started = b
        .start_incoming(start(&[("scsi0", "local:100/vm-100-disk-0.raw")]))
        .await
        .unwrap();
    assert_eq!(
        started.migrate_socket,
        PathBuf::from("/nonexistent/r/100.migrate")
    );
    assert_eq!(
        started.nbd_socket,
        Some(PathBuf::from("/nonexistent/r/100_nbd.migrate"))
    );
    assert_eq!(
        started.nbd_uris.get("scsi0").map(String::as_str),
        Some("nbd:unix:/nonexistent/r/100_nbd.migrate:exportname=drive-scsi0")
    );
    assert!(b.is_running(100).await);
    assert_eq!(
        b.start_incoming(start(&[])).await.unwrap_err().to_string(),
        "VM 100 already running"
    );
    b.resume(100).await.unwrap();
    b.nbd_stop(100).await.unwrap();
    b.fstrim(100).await.unwrap();
    b.stop(100).await.unwrap();
    assert!(!b.is_running(100).await);
    b.stop(100).await.unwrap();
    let started = b.start_incoming(start(&[])).await.unwrap();
    assert_eq!(started.nbd_socket, None);
    assert!(started.nbd_uris.is_empty());
}

#[tokio::test]
async fn overrides_fail_count_and_fall_back_to_the_defaults() {
    let b = backend(
        r#"
        return {
          storage = {
            alloc = function(storage, vmid, format, name, size_kib)
              if backend.calls["storage.alloc"] == 2 then
                backend.fail("disk full (rehearsal)")
              end
              backend.state.last = {storage, vmid, format, name, size_kib}
              return backend.default.storage.alloc(storage, vmid, format, name, size_kib)
            end,
            path = function(volid) return "/dev/fake/" .. volid end,
            volume_size = function(volid) return 42 end,
            import = function(req, data)
              if #data ~= req.received or req.size ~= 5 then
                backend.fail("got " .. #data .. " of " .. tostring(req.size))
              end
              return "local:100/vm-100-disk-9.raw"
            end,
          },
          hypervisor = {
            is_running = function(vmid) return vmid == 7 end,
            resume = function(vmid) error("raw lua error") end,
            start_incoming = function(req)
              return {migrate_socket = "/x/" .. req.vmid .. ".migrate", nbd_uris = {}}
            end,
          },
        }
        "#,
    );
    assert_eq!(
        b.alloc("local", 100, "raw", None, 8).await.unwrap(),
        "local:100/vm-100-disk-0.raw"
    );
    assert_eq!(
        b.alloc("local", 100, "raw", None, 8)
            .await
            .unwrap_err()
            .to_string(),
        "disk full (rehearsal)"
    );
    assert_eq!(b.path("a:b").unwrap(), PathBuf::from("/dev/fake/a:b"));
    assert_eq!(b.volume_size("x").await.unwrap(), 42);
    assert_eq!(
        b.import(req("vm-100-disk-0", "raw", false), stream(5, b"hello"))
            .await
            .unwrap(),
        "local:100/vm-100-disk-9.raw"
    );
    assert!(b.is_running(7).await);
    assert!(!b.is_running(8).await);
    let err = b.resume(1).await.unwrap_err().to_string();
    assert!(
        err.starts_with("inline.lua:") && err.ends_with("raw lua error"),
        "{err}"
    );
    let started = b
        .start_incoming(IncomingStart {
            vmid: 5,
            config: crate::guest::VmConfig::default(),
            machine: None,
            cpu: None,
            nbd: BTreeMap::new(),
        })
        .await
        .unwrap();
    assert_eq!(started.migrate_socket, PathBuf::from("/x/5.migrate"));
    assert_eq!(b.calls.raw_get::<i64>("storage.alloc").unwrap(), 2);
    assert_eq!(b.calls.raw_get::<i64>("hypervisor.is_running").unwrap(), 2);
    // not overridden: the default answers, and the call still counts
    assert_eq!(
        b.volume_format("local:100/vm-100-disk-0.raw")
            .await
            .unwrap(),
        "raw"
    );
    assert_eq!(b.calls.raw_get::<i64>("storage.volume_format").unwrap(), 1);
    assert_eq!(b.volumes(), vec!["local:100/vm-100-disk-0.raw".to_string()]);
}

#[tokio::test]
async fn sleep_lets_other_calls_through() {
    let b = backend(
        r#"
        return {
          storage = {
            free = function(volid)
              backend.state.sleeping = true
              backend.sleep(1000)
              backend.state.sleeping = false
            end,
            volume_format = function(volid)
              return backend.state.sleeping and "during" or "after"
            end,
          },
        }
        "#,
    );
    let slow = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.free("local:100/vm-100-disk-0.raw").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast = tokio::time::timeout(Duration::from_millis(800), b.volume_format("v"))
        .await
        .expect("not blocked by the sleeping call")
        .unwrap();
    assert_eq!(fast, "during");
    slow.await.unwrap().unwrap();
    assert_eq!(b.volume_format("v").await.unwrap(), "after");
}

#[test]
fn load_errors_name_the_script() {
    let err = |code: &str| {
        ScriptedBackend::from_source(code, "rehearse.lua", &cfg())
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };
    let syntax = err("return {\n  storage = {alloc = function() end,,}\n}");
    assert!(syntax.contains("rehearse.lua:2:"), "{syntax}");
    assert_eq!(
        err("return {storage = {aloc = function() end}}"),
        "rehearse.lua: unknown function 'storage.aloc' (known: alloc, free, path, \
         volume_size, volume_format, import, import_formats, check_untrusted, bwlimit)"
    );
    assert_eq!(
        err("return {qemu = {}}"),
        "rehearse.lua: unknown key 'qemu' (expected 'storage' and/or 'hypervisor')"
    );
    assert_eq!(
        err("return {hypervisor = {stop = 1}}"),
        "rehearse.lua: 'hypervisor.stop' must be a function, got integer"
    );
    assert_eq!(
        err("return 5"),
        "rehearse.lua: must return a table {storage = {...}, hypervisor = {...}}, got integer"
    );
    let runtime = err("error('boom')");
    assert!(runtime.contains("rehearse.lua:1: boom"), "{runtime}");
    assert!(err("return {}").is_empty());
}

#[test]
fn backend_argument() {
    assert_eq!(parse_backend_arg("real"), Ok(None));
    assert_eq!(
        parse_backend_arg("scripted:/tmp/b.lua"),
        Ok(Some(PathBuf::from("/tmp/b.lua")))
    );
    assert!(parse_backend_arg("scripted:").is_err());
    assert!(parse_backend_arg("fake").is_err());
}
