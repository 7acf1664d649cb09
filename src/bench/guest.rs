//! A real guest for the bench's busy-guest section and the migration tests: a Debian
//! kernel and a busybox initramfs booted with `-kernel`/`-initrd` on the source (TCG),
//! talking on its first serial port (the VM config's `serial0: socket`, a UNIX socket in
//! the node's run directory). `tests/common/guest.rs` includes this file (`#[path]`), so it
//! refers to nothing of the bench or of the crate it is compiled into, only to
//! dependencies.
//!
//! The kernel comes from the `linux-image-amd64` package's dependency, fetched with
//! `apt-get download` and unpacked with `dpkg-deb` into a cache directory (the cargo target
//! dir's `guest/`, never the host's `/boot`), once per cache. The initramfs is built from
//! the host's `busybox-static`, the guest's `init` (`guest/init.sh`: heartbeat, disk
//! marker, kernel log check) and a memory writer (`guest/dirty.c`, built with
//! `gcc -static`), and cached under a hash of its inputs. Both sources are compiled into
//! the binary, so a packaged `mtunnel bench` can build the guest too. A file lock
//! serializes processes building the cache.
//!
//! Only the source needs `-kernel`: QEMU's `linuxboot_dma.bin` is a fw_cfg file without a
//! RAM block of its own (the firmware copies it into guest RAM, which migrates), so a target
//! started from the plain VM config accepts the running guest. [`Console`] reads the
//! heartbeat and sends the init's commands.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;

const INIT: &str = include_str!("guest/init.sh");
const DIRTY_C: &str = include_str!("guest/dirty.c");

/// The kernel modules the guest loads, in load order, with their path under
/// `lib/modules/VERSION/kernel/`: virtio PCI and the virtio-scsi disk (Debian builds them
/// as modules). The crypto modules back `crc-t10dif`/`crc64-rocksoft` that `sd_mod` needs.
const MODULES: &[(&str, &str)] = &[
    ("virtio", "drivers/virtio/virtio.ko"),
    ("virtio_ring", "drivers/virtio/virtio_ring.ko"),
    (
        "virtio_pci_legacy_dev",
        "drivers/virtio/virtio_pci_legacy_dev.ko",
    ),
    (
        "virtio_pci_modern_dev",
        "drivers/virtio/virtio_pci_modern_dev.ko",
    ),
    ("virtio_pci", "drivers/virtio/virtio_pci.ko"),
    ("scsi_common", "drivers/scsi/scsi_common.ko"),
    ("scsi_mod", "drivers/scsi/scsi_mod.ko"),
    ("virtio_scsi", "drivers/scsi/virtio_scsi.ko"),
    ("crct10dif_common", "crypto/crct10dif_common.ko"),
    ("crct10dif_generic", "crypto/crct10dif_generic.ko"),
    ("crc-t10dif", "lib/crc-t10dif.ko"),
    ("crc64", "lib/crc64.ko"),
    ("crc64_rocksoft_generic", "crypto/crc64_rocksoft_generic.ko"),
    ("crc64-rocksoft", "lib/crc64-rocksoft.ko"),
    ("t10-pi", "block/t10-pi.ko"),
    ("sd_mod", "drivers/scsi/sd_mod.ko"),
];

/// The boot files of the guest.
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The `mtunnel vm start` arguments that boot this guest; `append` is added to the
    /// kernel command line (e.g. `mt.dirty=40,64`).
    pub fn start_args(&self, append: &str) -> Vec<String> {
        vec![
            "--qemu-arg=-kernel".into(),
            format!("--qemu-arg={}", self.kernel.display()),
            "--qemu-arg=-initrd".into(),
            format!("--qemu-arg={}", self.initrd.display()),
            "--qemu-arg=-append".into(),
            format!("--qemu-arg=console=ttyS0 panic=-1 {append}"),
        ]
    }
}

/// The guest's kernel and initramfs, built on first use in `cache` (created if missing);
/// fails with what is missing on this host (`apt-get download` access, `busybox-static`,
/// `gcc` with a static libc).
pub fn build(cache: &Path) -> anyhow::Result<GuestImage> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock_path = cache.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    // Held until this function returns (the file closes): one builder per cache.
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if !cache.join("kernel.ok").exists() {
        fetch_kernel(cache)?;
    }
    let initrd = build_initrd(cache)?;
    Ok(GuestImage {
        kernel: cache.join("vmlinuz"),
        initrd,
    })
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run it (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `apt-get download` of `linux-image-amd64` and the image package it depends on; the
/// kernel and [`MODULES`] unpacked into `cache`; the downloads removed.
fn fetch_kernel(cache: &Path) -> anyhow::Result<()> {
    let dl = cache.join("download");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    let apt = |pkg: &str| {
        run(
            Command::new("apt-get")
                .args(["download", "-q", pkg])
                .current_dir(&dl),
            &format!("apt-get download {pkg} (is `apt-get update` needed?)"),
        )
    };
    apt("linux-image-amd64")?;
    let meta = find_deb(&dl, "linux-image-amd64_")?;
    let depends = run(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&meta)
            .arg("Depends"),
        "dpkg-deb -f",
    )?;
    let image = depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-") && d != &"linux-image-amd64")
        .with_context(|| format!("no linux-image-* in Depends: {depends}"))?
        .to_string();
    apt(&image)?;
    let deb = find_deb(&dl, &format!("{image}_"))?;
    let version = image.trim_start_matches("linux-image-");
    let unpacked = dl.join("x");
    std::fs::create_dir_all(&unpacked)?;
    let mut members = vec![format!("./boot/vmlinuz-{version}")];
    members.extend(
        MODULES
            .iter()
            .map(|(_, p)| format!("./lib/modules/{version}/kernel/{p}")),
    );
    let tar = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' {}",
        deb.display(),
        unpacked.display(),
        members.join(" ")
    );
    run(
        Command::new("sh").args(["-c", &tar]),
        "unpacking the kernel",
    )?;
    let modules = cache.join("modules");
    let _ = std::fs::remove_dir_all(&modules);
    std::fs::create_dir_all(&modules)?;
    for (name, p) in MODULES {
        let from = unpacked.join(format!("lib/modules/{version}/kernel/{p}"));
        std::fs::copy(&from, modules.join(format!("{name}.ko")))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    std::fs::copy(
        unpacked.join(format!("boot/vmlinuz-{version}")),
        cache.join("vmlinuz"),
    )
    .context("copying the kernel image")?;
    std::fs::remove_dir_all(&dl)?;
    std::fs::write(cache.join("kernel.ok"), format!("{image}\n"))?;
    Ok(())
}

fn find_deb(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {prefix}*.deb in {}",
                dir.display()
            )
        })
}

/// The initramfs for the current init, memory writer, busybox and kernel, built when its
/// inputs changed: `initrd-HASH.cpio` in `cache`.
fn build_initrd(cache: &Path) -> anyhow::Result<PathBuf> {
    let busybox = std::fs::read("/bin/busybox").context("/bin/busybox: install busybox-static")?;
    if !is_static(&busybox) {
        bail!("/bin/busybox is linked dynamically: install busybox-static");
    }
    let mut h = DefaultHasher::new();
    (INIT, DIRTY_C, &busybox, MODULES).hash(&mut h);
    std::fs::read_to_string(cache.join("kernel.ok"))
        .unwrap_or_default()
        .hash(&mut h);
    let initrd = cache.join(format!("initrd-{:016x}.cpio", h.finish()));
    if initrd.exists() {
        return Ok(initrd);
    }
    let stage = cache.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    stage_files(cache, &stage, &busybox)?;
    // Initramfs files of older inputs: nothing of this tree boots them any more.
    for e in std::fs::read_dir(cache)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("initrd-") && name.ends_with(".cpio") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let tmp = cache.join("initrd.tmp");
    cpio(&stage, &tmp)?;
    std::fs::rename(&tmp, &initrd)?;
    std::fs::remove_dir_all(&stage)?;
    Ok(initrd)
}

/// The initramfs's tree in `stage`: busybox, init, the modules, the memory writer.
fn stage_files(cache: &Path, stage: &Path, busybox: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in ["bin", "dev", "proc", "sys", "lib/modules"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::write(stage.join("bin/busybox"), busybox)?;
    std::fs::write(stage.join("init"), INIT)?;
    let order: Vec<&str> = MODULES.iter().map(|(n, _)| *n).collect();
    std::fs::write(stage.join("modules.order"), order.join("\n") + "\n")?;
    for (name, _) in MODULES {
        let ko = format!("{name}.ko");
        std::fs::copy(
            cache.join("modules").join(&ko),
            stage.join("lib/modules").join(&ko),
        )
        .with_context(|| format!("copying module {ko}"))?;
    }
    std::fs::write(stage.join("dirty.c"), DIRTY_C)?;
    run(
        Command::new("gcc")
            .args(["-static", "-O2", "-o", "bin/dirty", "dirty.c"])
            .current_dir(stage),
        "gcc -static (the guest's memory writer)",
    )?;
    std::fs::remove_file(stage.join("dirty.c"))?;
    for f in ["init", "bin/busybox", "bin/dirty"] {
        std::fs::set_permissions(stage.join(f), std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// `busybox cpio -o -H newc` of everything under `stage` into `out`.
fn cpio(stage: &Path, out: &Path) -> anyhow::Result<()> {
    fn walk(dir: &Path, root: &Path, list: &mut Vec<String>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)?.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p);
            list.push(format!("./{}", rel.display()));
            if p.is_dir() {
                walk(&p, root, list)?;
            }
        }
        Ok(())
    }
    let mut list = Vec::new();
    walk(stage, stage, &mut list)?;
    let mut child = Command::new("/bin/busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(stage)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out)?)
        .stderr(Stdio::null())
        .spawn()
        .context("busybox cpio")?;
    let mut stdin = child.stdin.take().context("busybox cpio's stdin")?;
    stdin.write_all((list.join("\n") + "\n").as_bytes())?;
    drop(stdin);
    if !child.wait()?.success() {
        bail!("busybox cpio failed");
    }
    Ok(())
}

/// Whether an ELF64 file has no program interpreter (PT_INTERP), i.e. is linked statically.
fn is_static(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return false;
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&elf[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).all(|i| {
        let o = phoff + i * size;
        elf.get(o..o + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

/// The guest's serial port, read line by line in the background.
pub struct Console {
    lines: Arc<Mutex<Vec<String>>>,
    closed: Arc<Mutex<bool>>,
    writer: OwnedWriteHalf,
}

impl Console {
    /// Connects to the serial socket (QEMU creates it asynchronously: retried for 10 s).
    pub async fn connect(path: &Path) -> anyhow::Result<Console> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| {
                        format!("connecting to the guest's serial port {}", path.display())
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(false));
        let (l, c) = (lines.clone(), closed.clone());
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            let mut buf = Vec::new();
            while let Ok(n) = read.read_until(b'\n', &mut buf).await {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                lock(&l).push(line);
                buf.clear();
            }
            *lock(&c) = true;
        });
        Ok(Console {
            lines,
            closed,
            writer,
        })
    }

    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// Whether the other end closed (the QEMU exited).
    pub fn closed(&self) -> bool {
        *lock(&self.closed)
    }

    /// Waits (at most `secs`) until `done` holds for the lines read so far; the error
    /// shows the last lines.
    pub async fn wait(
        &self,
        secs: u64,
        what: &str,
        done: impl Fn(&[String]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if done(&lock(&self.lines)) {
                return Ok(());
            }
            if Instant::now() >= deadline || self.closed() {
                let lines = self.lines();
                bail!(
                    "guest console: no {what} within {secs} s (closed: {}); last lines:\n{}",
                    self.closed(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a line equal to `line`.
    pub async fn wait_line(&self, secs: u64, line: &str) -> anyhow::Result<()> {
        self.wait(secs, line, |l| l.iter().any(|x| x == line)).await
    }

    /// Sends one command line to the guest's init.
    #[allow(dead_code)] // the tests' (`tests/guest.rs`); the bench only listens
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .context("writing to the guest's serial port")
    }

    /// The heartbeats read so far: (counter, guest uptime in seconds).
    #[allow(dead_code)] // the tests'
    pub fn heartbeats(&self) -> Vec<(u64, f64)> {
        heartbeats(&self.lines())
    }

    /// The lines of the guest's kernel log at levels emerg..err, of any facility (asked
    /// with `errors`).
    #[allow(dead_code)] // the tests'
    pub async fn kernel_errors(&mut self) -> anyhow::Result<Vec<String>> {
        let seen = self.lines().len();
        self.send("errors").await?;
        self.wait(30, "errors-end", |l| {
            l[seen..].iter().any(|x| x == "errors-end")
        })
        .await?;
        let lines = self.lines();
        Ok(lines[seen..]
            .iter()
            .skip_while(|l| *l != "errors-begin")
            .skip(1)
            .take_while(|l| *l != "errors-end")
            .filter(|l| log_level(l).is_some_and(|level| level <= 3))
            .cloned()
            .collect())
    }
}

/// The lock of a console's state; a reader that panicked left plain data behind.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The level (0 emerg .. 7 debug) of a raw kernel log line `<PRIORITY>[time] text`, where
/// PRIORITY is facility × 8 + level; `None` for other lines (heartbeats, console echo).
#[allow(dead_code)] // the tests'
fn log_level(line: &str) -> Option<u32> {
    let (prio, _) = line.strip_prefix('<')?.split_once('>')?;
    prio.parse::<u32>().ok().map(|p| p % 8)
}

/// The `hb COUNTER UPTIME` lines among `lines`.
pub fn heartbeats(lines: &[String]) -> Vec<(u64, f64)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.strip_prefix("hb ")?.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}

/// The rates the memory writer reported (`dirty: N MB/s`, every 5 s) among `lines`.
pub fn dirty_rates(lines: &[String]) -> Vec<f64> {
    lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("dirty: ")?
                .strip_suffix(" MB/s")?
                .parse()
                .ok()
        })
        .collect()
}
