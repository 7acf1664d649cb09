//! The service unit and the Debian package metadata: `systemd-analyze verify` accepts the
//! unit without a single warning (with `ExecStart` pointed at the binary under test), and
//! `mtunnel serve` speaks systemd's notify protocol as `Type=notify` needs — READY=1 once
//! it listens, STOPPING=1 on SIGTERM — over a real `NOTIFY_SOCKET` datagram socket.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

const UNIT: &str = include_str!("../packaging/mtunnel.service");

#[test]
fn service_unit_verifies_without_warnings() {
    let dir = tempfile::Builder::new()
        .prefix("mtu")
        .tempdir_in("/tmp")
        .unwrap();
    assert!(UNIT.contains("ExecStart=/usr/bin/mtunnel serve"), "{UNIT}");
    let unit = UNIT.replace("/usr/bin/mtunnel", BIN);
    let path = dir.path().join("mtunnel.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze failed: {stderr}");
    assert!(
        !stderr.contains("mtunnel.service"),
        "systemd-analyze warns about the unit:\n{stderr}"
    );
    // What the unit promises to operators.
    for line in [
        "Type=notify",
        "KillMode=process",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(UNIT.lines().any(|l| l == line), "unit lacks {line}");
    }
}

#[test]
fn package_metadata_names_existing_files() {
    let manifest = include_str!("../Cargo.toml");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("Cargo.toml has [package.metadata.deb]");
    for needed in [
        "maintainer-scripts = \"packaging/\"",
        "unit-name = \"mtunnel\"",
        "\"etc/mtunnel/mtunnel.toml\"",
    ] {
        assert!(deb.contains(needed), "deb metadata lacks {needed}");
    }
    for file in [
        "packaging/mtunnel.service",
        "packaging/mtunnel.toml",
        "packaging/postinst",
        "packaging/postrm",
        "scripts/build-deb.sh",
        "handlers/README.md",
        "README.md",
    ] {
        assert!(root.join(file).is_file(), "{file} is missing");
    }
    let config = std::fs::read_to_string(root.join("packaging/mtunnel.toml")).unwrap();
    let parsed: toml::Table = toml::from_str(&config).expect("default config is TOML");
    // Only the metrics listener is set (it is off when absent); the rest documents defaults.
    assert_eq!(
        parsed.into_iter().collect::<Vec<_>>(),
        [(
            "metrics_listen".to_string(),
            toml::Value::String("127.0.0.1:9710".into())
        )],
        "the default config sets only metrics_listen"
    );
}

/// The `[package.metadata.deb]` table of Cargo.toml.
fn deb_metadata() -> &'static str {
    include_str!("../Cargo.toml")
        .split("[package.metadata.deb]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("Cargo.toml has [package.metadata.deb]")
}

#[test]
fn package_ships_the_sysctl_snippet() {
    let asset = "[\"packaging/sysctl.conf\", \"usr/lib/sysctl.d/60-mtunnel.conf\", \"644\"]";
    assert!(deb_metadata().contains(asset), "deb assets lack {asset}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("packaging/sysctl.conf")).unwrap();
    let mut set = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("sysctl lines are KEY = VALUE");
        let (key, value) = (key.trim(), value.trim());
        // A key this kernel knows (sysctl.d ignores unknown ones silently).
        let proc = format!("/proc/sys/{}", key.replace('.', "/"));
        assert!(Path::new(&proc).exists(), "{key}: no {proc}");
        let max: u64 = value.split_whitespace().last().unwrap().parse().unwrap();
        assert!(max >= 32 << 20, "{key} = {value}: below 32 MiB");
        set.push(key.to_string());
    }
    assert_eq!(
        set,
        [
            "net.core.rmem_max",
            "net.core.wmem_max",
            "net.ipv4.tcp_rmem",
            "net.ipv4.tcp_wmem"
        ]
    );
    // fq and BBR are offered, commented out.
    for line in [
        "#net.core.default_qdisc = fq",
        "#net.ipv4.tcp_congestion_control = bbr",
    ] {
        assert!(text.lines().any(|l| l == line), "snippet lacks {line}");
    }
    let postinst = std::fs::read_to_string(root.join("packaging/postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysctl 60-mtunnel.conf"),
        "postinst does not apply the snippet"
    );
}

#[test]
fn serve_notifies_systemd_ready_and_stopping() {
    let dir = tempfile::Builder::new()
        .prefix("mtn")
        .tempdir_in("/tmp")
        .unwrap();
    let notify = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{d}/d\"\nrun_dir = \"{d}/r\"\nnode = \"n1\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = socket.recv(&mut buf).expect("STOPPING=1 within 30 s");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// The `Commands:` entries of `mtunnel ARGS --help`: (name, the whole line).
fn listed_commands(args: &[&str]) -> Vec<(String, String)> {
    let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "mtunnel {args:?} --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let name = l.split_whitespace().next().unwrap_or_default();
            (name.to_string(), l.to_string())
        })
        .collect()
}

/// `mtunnel --help` and the help of every command with subcommands give each command one
/// short line; the longer texts are in the command's own `--help` (and its man page).
#[test]
fn help_lists_each_command_on_one_short_line() {
    let top = listed_commands(&[]);
    assert!(top.iter().any(|(n, _)| n == "migrate"), "{top:?}");
    let mut lines = top.clone();
    for (name, _) in top.iter().filter(|(n, _)| n != "help") {
        lines.extend(listed_commands(&[name]));
    }
    assert!(lines.iter().any(|(n, _)| n == "destroy"), "{lines:?}");
    let long: Vec<&String> = lines
        .iter()
        .map(|(_, l)| l)
        .filter(|l| l.chars().count() > 100)
        .collect();
    assert!(
        long.is_empty(),
        "command lines of more than 100 columns in --help:\n{long:#?}"
    );
    let cleanup = Command::new(BIN)
        .args(["cleanup", "--help"])
        .output()
        .unwrap();
    let cleanup = String::from_utf8_lossy(&cleanup.stdout);
    assert!(
        cleanup.contains("Safe while `serve` runs"),
        "the long text moved out of cleanup --help:\n{cleanup}"
    );
}

/// The names of the fields a struct's derived `Deserialize` accepts: serde hands them to
/// `deserialize_struct`, where this deserializer returns them as its error.
struct FieldLister;

#[derive(Debug)]
struct Listed(String);

impl std::fmt::Display for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Listed {}

impl serde::de::Error for Listed {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Listed(format!("not a struct: {msg}"))
    }
}

impl<'de> serde::Deserializer<'de> for FieldLister {
    type Error = Listed;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Listed> {
        Err(Listed("not a struct".into()))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Listed> {
        Err(Listed(fields.join(" ")))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn fields_of<T: serde::de::DeserializeOwned>() -> BTreeSet<String> {
    match T::deserialize(FieldLister) {
        Err(Listed(fields)) => {
            assert!(!fields.starts_with("not a struct"), "{fields}");
            fields.split(' ').map(str::to_string).collect()
        }
        Ok(_) => panic!("FieldLister never yields a value"),
    }
}

/// A `key = value` line of the packaged config file, commented or not.
#[derive(Debug)]
struct KeyLine {
    /// The table it is in: "" (top level), "cluster", "storage.local".
    table: String,
    key: String,
    value: String,
    /// The comment after the value.
    note: String,
}

impl KeyLine {
    fn toml(&self) -> String {
        format!("{} = {}\n", self.key, self.value)
    }

    /// Whether the value is the built-in default (else an example, a placeholder such as
    /// `"<short host name>"`, or a value that depends on running as root).
    fn is_default(&self, is_root: bool) -> bool {
        !self.note.starts_with("required")
            && !self.note.starts_with("no default")
            && !self.value.starts_with("\"<")
            && (is_root || !self.note.contains("as root"))
    }
}

/// The key lines and the table headers (`[cluster]`) of the packaged config file.
fn packaged_key_lines(text: &str) -> (Vec<KeyLine>, Vec<String>) {
    let (mut keys, mut tables) = (Vec::new(), Vec::new());
    let mut table = String::new();
    for line in text.lines() {
        let text = line.trim_start_matches('#').trim();
        let (entry, note) = text.split_once(" # ").unwrap_or((text, ""));
        let entry = entry.trim();
        if let Some(name) = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')) {
            table = name.to_string();
            tables.push(table.clone());
        } else if let Some((key, value)) = entry.split_once(" = ")
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            keys.push(KeyLine {
                table: table.clone(),
                key: key.to_string(),
                value: value.to_string(),
                note: note.trim().to_string(),
            });
        }
    }
    (keys, tables)
}

/// The node settings a config text resolves to, printed (`NodeConfig` is not `PartialEq`).
fn resolved(text: &str) -> String {
    let file: mtunnel::config::ConfigFile =
        toml::from_str(text).unwrap_or_else(|e| panic!("{text}\n{e}"));
    let overrides = mtunnel::config::Overrides {
        node: Some("n1".into()),
        ..Default::default()
    };
    let cfg = mtunnel::config::NodeConfig::from_parts(file, &overrides)
        .unwrap_or_else(|e| panic!("{text}\n{e:#}"));
    format!("{cfg:?}")
}

fn assert_same_keys(what: &str, listed: BTreeSet<String>, accepted: BTreeSet<String>) {
    let missing: Vec<_> = accepted.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&accepted).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "packaging/mtunnel.toml, {what}: keys mtunnel accepts but the file lacks: {missing:?}; \
         keys the file has but mtunnel refuses: {unknown:?}"
    );
}

/// `packaging/mtunnel.toml` lists every key `ConfigFile`, `[cluster]` and `[storage.*]`
/// accept (as serde sees them: a key added to the code and not to the file fails), and each
/// commented value is the code's default: setting it alone resolves to the same node
/// settings as an empty file.
#[test]
fn packaged_config_lists_every_key_with_its_default() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("packaging/mtunnel.toml")).unwrap();
    let (keys, tables) = packaged_key_lines(&text);
    let in_table = |t: &str| -> BTreeSet<String> {
        keys.iter()
            .filter(|k| k.table == t)
            .map(|k| k.key.clone())
            .collect()
    };
    let mut top = in_table("");
    top.extend(
        tables
            .iter()
            .map(|t| t.split('.').next().unwrap().to_string()),
    );
    assert_same_keys("top level", top, fields_of::<mtunnel::config::ConfigFile>());
    assert_same_keys(
        "[cluster]",
        in_table("cluster"),
        fields_of::<mtunnel::config::ClusterFile>(),
    );
    assert_same_keys(
        "[storage.local]",
        in_table("storage.local"),
        fields_of::<mtunnel::storage::StorageDef>(),
    );
    check_defaults(&keys);
}

/// `docs/config.md` (the config reference) names every key the config file, `[cluster]`
/// and a storage table accept: as a `key = ` line, as `` `key` `` in the text or as a
/// `[key]` table header; the `[cluster]` keys in `docs/cluster.md`.
#[test]
fn config_reference_names_every_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let (config, cluster) = (read("docs/config.md"), read("docs/cluster.md"));
    let named = |text: &str, key: &str| {
        text.lines().any(|l| l.starts_with(&format!("{key} = ")))
            || text.contains(&format!("`{key}`"))
            || text.contains(&format!("`{key} = "))
            || text.contains(&format!("[{key}]"))
            || text.contains(&format!("[{key}."))
    };
    let mut missing = Vec::new();
    for (table, keys, doc) in [
        ("", fields_of::<mtunnel::config::ConfigFile>(), &config),
        (
            "[storage.*] ",
            fields_of::<mtunnel::storage::StorageDef>(),
            &config,
        ),
        (
            "[cluster] ",
            fields_of::<mtunnel::config::ClusterFile>(),
            &cluster,
        ),
    ] {
        missing.extend(
            keys.iter()
                .filter(|k| !named(doc, k))
                .map(|k| format!("{table}{k}")),
        );
    }
    assert!(
        missing.is_empty(),
        "keys mtunnel accepts that the config reference (docs/config.md, docs/cluster.md) \
         does not name: {missing:?}"
    );
    // And the example in docs/config.md shows no key mtunnel refuses.
    let accepted: BTreeSet<String> = fields_of::<mtunnel::config::ConfigFile>()
        .into_iter()
        .chain(fields_of::<mtunnel::storage::StorageDef>())
        .collect();
    let unknown: Vec<&str> = config
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .filter(|k| !accepted.contains(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/config.md shows keys mtunnel refuses: {unknown:?}"
    );
}

fn check_defaults(keys: &[KeyLine]) {
    let is_root = nix::unistd::geteuid().is_root();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, "0123456789abcdef\n").unwrap();
    let cluster = format!(
        "[cluster]\nname = \"lab\"\nendpoints = [\"http://127.0.0.1:2379\"]\nsecret_file = {:?}\n",
        secret.display().to_string()
    );
    let mut checked = 0;
    for k in keys.iter().filter(|k| k.is_default(is_root)) {
        let base = match k.table.as_str() {
            // The package's one setting: its default is off (absent).
            "" if k.key == "metrics_listen" => continue,
            "" => String::new(),
            "cluster" => cluster.clone(),
            _ => continue,
        };
        assert_eq!(
            resolved(&format!("{base}{}", k.toml())),
            resolved(&base),
            "packaging/mtunnel.toml: {} = {} is not the default",
            k.key,
            k.value
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} defaults checked");
    // The storage table as a whole is the storage made when none is configured.
    if is_root {
        let storage: String = keys
            .iter()
            .filter(|k| k.table == "storage.local")
            .map(KeyLine::toml)
            .collect();
        assert_eq!(
            resolved(&format!("[storage.local]\n{storage}")),
            resolved(""),
            "packaging/mtunnel.toml: [storage.local] is not the built-in storage"
        );
    } else {
        eprintln!("not root: data_dir, run_dir, handlers_dir and [storage.local] not compared");
    }
}

/// What `scripts/test-all.sh` installs, from its `echo "== installing A, B and C (...)"`
/// lines (the parenthesis says where it comes from), plus the venv's proxmoxer.
fn installed_by_test_script(script: &str) -> Vec<String> {
    let mut names: Vec<String> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("echo \"== installing "))
        .flat_map(|l| {
            let list = l.split(['(', '"']).next().unwrap_or("");
            list.split([',', ' '])
                .filter(|w| !w.is_empty() && *w != "and")
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    if script.contains("pip install") {
        names.push("proxmoxer".into());
    }
    names
}

/// Every package `scripts/test-all.sh` installs is named in its opening comment and in the
/// README's sentence on running every test.
#[test]
fn test_script_and_readme_name_everything_it_installs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = std::fs::read_to_string(root.join("scripts/test-all.sh")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let header: String = script
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let sentence = readme
        .split("\n\n")
        .find(|p| p.starts_with("Run every test ("))
        .expect("README.md: no paragraph starting 'Run every test ('")
        .replace('\n', " ");
    let names = installed_by_test_script(&script);
    assert!(names.len() >= 9, "too few installs found: {names:?}");
    for (what, text) in [("its opening comment", &header), ("README.md", &sentence)] {
        let missing: Vec<_> = names
            .iter()
            .filter(|n| !text.contains(n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "scripts/test-all.sh installs {missing:?} but {what} does not say so:\n{text}"
        );
    }
}

/// Runs `cmd`, fails the test with its output unless it succeeds, returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The section names of an ELF file, as `readelf -S -W` lists them.
fn elf_sections(path: &Path) -> Vec<String> {
    let table = run_ok(Command::new("readelf").args(["-S", "-W"]).arg(path));
    table
        .lines()
        .filter_map(|l| l.split_once(']')?.1.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The one file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn only_file(dir: &Path, prefix: &str, suffix: &str) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{prefix}*{suffix} in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// What `man -l` prints for a page (plain text, 80 columns).
fn man(page: &Path) -> String {
    run_ok(
        Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat"),
    )
}

/// The .deb as `scripts/build-deb.sh` builds it (here from the debug build under test, as
/// `--profile dev --no-build`) holds the man pages (gzip'd, readable with `man -l`), the
/// bash, zsh and fish completions (bash's offering the visible commands only) and a
/// /usr/bin/mtunnel without debug info that still runs; the debug info is in the
/// mtunnel-dbgsym package. Needs cargo-deb (scripts/test-all.sh installs it).
#[test]
fn deb_package_holds_man_pages_completions_and_a_stripped_binary() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        Path::new(BIN),
        repo.join("target/debug/mtunnel"),
        "build-deb.sh --profile dev packages target/debug/mtunnel"
    );
    let dir = tempfile::Builder::new().prefix("mtd").tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    run_ok(
        Command::new(repo.join("scripts/build-deb.sh"))
            .args(["--profile", "dev", "--no-build", "--fast", "--output"])
            .arg(&out_dir),
    );
    let deb = only_file(&out_dir, "mtunnel_", ".deb");
    let dbgsym = only_file(&out_dir, "mtunnel-dbgsym_", ".ddeb");
    let root = dir.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));

    let bin = root.join("usr/bin/mtunnel");
    let sections = elf_sections(&bin);
    assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    assert!(
        !sections.iter().any(|s| s == ".debug_info"),
        "/usr/bin/mtunnel in the .deb has debug info: {sections:?}"
    );
    let version = run_ok(Command::new(&bin).arg("--version"));
    assert_eq!(
        version.trim(),
        concat!("mtunnel ", env!("CARGO_PKG_VERSION"))
    );
    let dbg_root = dir.path().join("dbgsym");
    run_ok(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&dbgsym)
            .arg(&dbg_root),
    );
    let debug_file = run_ok(
        Command::new("find")
            .arg(dbg_root.join("usr/lib/debug/.build-id"))
            .args(["-name", "*.debug"]),
    );
    let debug_file = debug_file.trim();
    assert!(
        !debug_file.is_empty() && !debug_file.contains('\n'),
        "{debug_file}"
    );
    assert!(
        elf_sections(Path::new(debug_file))
            .iter()
            .any(|s| s == ".debug_info")
    );

    check_man_pages(&root);
    check_completions(&root);
    // The replica timer, its service and the settings example (docs/replicas.md).
    for (file, packaged_as) in [
        (
            "usr/lib/systemd/system/mtunnel-replicate@.service",
            "mtunnel-replicate@.service",
        ),
        (
            "usr/lib/systemd/system/mtunnel-replicate@.timer",
            "mtunnel-replicate@.timer",
        ),
        (
            "usr/share/doc/mtunnel/examples/replicate.env",
            "replicate.env",
        ),
    ] {
        let shipped = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("the .deb lacks /{file}: {e}"));
        assert_eq!(shipped, packaged(packaged_as), "/{file}");
    }
}

fn check_man_pages(root: &Path) {
    let man1 = root.join("usr/share/man/man1");
    for page in [
        "mtunnel",
        "mtunnel-serve",
        "mtunnel-migrate",
        "mtunnel-cleanup",
        "mtunnel-vm-create",
        "mtunnel-handlers-test",
    ] {
        assert!(
            man1.join(format!("{page}.1.gz")).is_file(),
            "{page}.1.gz is missing"
        );
    }
    for hidden in ["mtunnel-bench-relay", "mtunnel-generate-docs"] {
        assert!(
            !man1.join(format!("{hidden}.1.gz")).exists(),
            "{hidden}(1) is packaged"
        );
    }
    let top = man(&man1.join("mtunnel.1.gz"));
    for text in [
        "NAME\n       mtunnel",
        "Move running VMs between hosts",
        "SUBCOMMANDS",
        "mtunnel-migrate(1)",
        "/etc/mtunnel/mtunnel.toml",
    ] {
        assert!(top.contains(text), "man mtunnel lacks {text:?}:\n{top}");
    }
    let cleanup = man(&man1.join("mtunnel-cleanup.1.gz"));
    assert!(cleanup.contains("--dry-run"), "{cleanup}");
    let config = man(&root.join("usr/share/man/man5/mtunnel.toml.5.gz"));
    for text in [
        "tunnel_accept_timeout_secs = 300",
        "[cluster]",
        "lease_ttl_secs = 10",
    ] {
        assert!(
            config.contains(text),
            "man 5 mtunnel.toml lacks {text:?}:\n{config}"
        );
    }
}

fn check_completions(root: &Path) {
    let bash = root.join("usr/share/bash-completion/completions/mtunnel");
    // What bash offers after `mtunnel b` and `mtunnel vm de`.
    let offered = run_ok(Command::new("bash").arg("-c").arg(format!(
        "source {}; for line in 'mtunnel b' 'mtunnel vm de'; do \
         COMP_WORDS=($line); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_LINE=$line; \
         COMP_POINT=${{#line}}; COMPREPLY=(); _mtunnel mtunnel \"${{COMP_WORDS[-1]}}\" \
         \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[*]}}\"; done",
        bash.display()
    )));
    assert_eq!(offered, "bench\ndestroy\n", "bash completion offers");
    let zsh = std::fs::read_to_string(root.join("usr/share/zsh/vendor-completions/_mtunnel"))
        .expect("zsh completion");
    assert!(zsh.starts_with("#compdef mtunnel"), "{}", &zsh[..80]);
    let fish = root.join("usr/share/fish/vendor_completions.d/mtunnel.fish");
    let fish = std::fs::read_to_string(fish).expect("fish completion");
    assert!(fish.contains("complete -c mtunnel"), "fish completion");
    for text in [&zsh, &fish] {
        assert!(!text.contains("generate-docs") && !text.contains("bench-relay"));
    }
}

/// `packaging/NAME` of the repository (read at run time: a missing unit fails its test).
fn packaged(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The replica timer and its service (docs/replicas.md) pass `systemd-analyze verify`
/// without a warning as instance 100, and the package ships them with the settings example.
#[test]
fn replicate_timer_units_verify_and_are_packaged() {
    let dir = tempfile::Builder::new()
        .prefix("mtr")
        .tempdir_in("/tmp")
        .unwrap();
    let service = packaged("mtunnel-replicate@.service");
    let timer = packaged("mtunnel-replicate@.timer");
    let exec = "ExecStart=/usr/bin/mtunnel replicate %i ${ENDPOINT} \
                --target-storage ${TARGET_STORAGE} $OPTIONS";
    for line in [
        exec,
        "EnvironmentFile=/etc/mtunnel/replicate/%i.env",
        "Type=oneshot",
    ] {
        assert!(service.lines().any(|l| l == line), "service lacks {line}");
    }
    for line in [
        "OnCalendar=hourly",
        "Persistent=true",
        "WantedBy=timers.target",
    ] {
        assert!(timer.lines().any(|l| l == line), "timer lacks {line}");
    }
    let service = service.replace("/usr/bin/mtunnel", BIN);
    std::fs::write(dir.path().join("mtunnel-replicate@.service"), service).unwrap();
    std::fs::write(dir.path().join("mtunnel-replicate@.timer"), timer).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("mtunnel-replicate@100.service"))
        .arg(dir.path().join("mtunnel-replicate@100.timer"))
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze failed: {stderr}");
    assert!(
        !stderr.contains("mtunnel-replicate"),
        "systemd-analyze warns about the units:\n{stderr}"
    );
    for asset in [
        "[\"packaging/mtunnel-replicate@.service\", \"usr/lib/systemd/system/\", \"644\"]",
        "[\"packaging/mtunnel-replicate@.timer\", \"usr/lib/systemd/system/\", \"644\"]",
        "[\"packaging/replicate.env\", \"usr/share/doc/mtunnel/examples/replicate.env\", \"644\"]",
    ] {
        assert!(deb_metadata().contains(asset), "deb assets lack {asset}");
    }
}

/// The settings example's variables, expanded as systemd expands the service's
/// `ExecStart` (`${X}`: one word; `$X`: split at spaces), make a command line that
/// `mtunnel replicate` accepts: it gets as far as looking for the VM.
#[test]
fn replicate_settings_example_makes_a_valid_command_line() {
    let env = packaged("replicate.env");
    let vars: std::collections::BTreeMap<&str, &str> = env
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=\"VALUE\" lines");
            (k, v.trim_matches('"'))
        })
        .collect();
    assert_eq!(
        vars.keys().copied().collect::<Vec<_>>(),
        ["ENDPOINT", "OPTIONS", "TARGET_STORAGE"]
    );
    let mut args = vec!["replicate", "100", vars["ENDPOINT"], "--target-storage"];
    args.push(vars["TARGET_STORAGE"]);
    args.extend(vars["OPTIONS"].split_whitespace());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mtunnel.toml");
    let data = dir.path().join("data");
    let run = dir.path().join("run");
    let toml = format!(
        "node = \"n1\"\ndata_dir = {data:?}\nrun_dir = {run:?}\n[storage.local]\ntype = \"dir\"\npath = {:?}\n",
        dir.path().join("s")
    );
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(BIN)
        .args(&args)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        !stderr.contains("Usage:"),
        "the arguments were refused: {stderr}"
    );
    assert!(stderr.contains("VM 100"), "{stderr}");
}
