//! The two sides' network namespaces: creating and deleting them (and the ones a dead
//! bench left), running code or commands inside one, and each side's TUN device.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::{Context, bail};

use super::{LinkSpec, MTU, PREFIX, TUN_NAME};

/// A named network namespace (`ip netns add`), deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    fd: OwnedFd,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    fn create(name: &str) -> anyhow::Result<Netns> {
        ip(&["netns", "add", name])?;
        let path = format!("/run/netns/{name}");
        match std::fs::File::open(&path) {
            Ok(f) => Ok(Netns {
                name: name.to_string(),
                fd: f.into(),
            }),
            Err(e) => {
                let _ = ip(&["netns", "del", name]);
                Err(e).with_context(|| format!("opening {path}"))
            }
        }
    }

    /// Moves the calling thread into this namespace (sockets it creates afterwards, and
    /// processes it forks, live there).
    pub fn enter(&self) -> anyhow::Result<()> {
        nix::sched::setns(self.fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", self.name))
    }

    /// Makes `cmd` start inside this namespace (setns between fork and exec).
    pub fn apply(&self, cmd: &mut tokio::process::Command) -> anyhow::Result<()> {
        let fd = self.fd.try_clone().context("duplicating a namespace fd")?;
        // SAFETY: setns(2) is a plain system call, async-signal-safe, touching no memory of
        // the parent; it runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", self.name))?
        })
    }

    /// Runs a future on its own single-thread runtime on a thread inside this namespace:
    /// every socket it opens (an API call, a QEMU it spawns) is on this side of the link.
    /// Nothing it creates may outlive it except processes and plain data.
    pub fn block_on<T: Send, F: std::future::Future<Output = anyhow::Result<T>>>(
        &self,
        f: impl FnOnce() -> F + Send,
    ) -> anyhow::Result<T> {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a runtime inside the namespace")?
                .block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("wan: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// Deletes namespaces of this module whose creating process is gone.
pub(super) fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_suffix(['a', 'b']))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("wan: deleting stale namespace {name} (process {pid} is gone)");
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Opens a TUN device named [`TUN_NAME`] (IP packets, no extra header) in the calling
/// thread's network namespace; non-blocking.
fn open_tun() -> anyhow::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun (TUN support)")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(TUN_NAME.bytes()) {
        *d = s as nix::libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (nix::libc::IFF_TUN | nix::libc::IFF_NO_PI) as nix::libc::c_short;
    const TUNSETIFF: nix::libc::c_ulong = 0x4004_54ca; // _IOW('T', 202, int)
    // SAFETY: TUNSETIFF reads (and updates) one ifreq that lives for the call.
    let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    let fd: OwnedFd = file.into();
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(fd)
}

/// One side: its namespace, its TUN fd, its address configured.
pub(super) fn side(
    name: &str,
    addr: Ipv4Addr,
    spec: &LinkSpec,
) -> anyhow::Result<(Netns, OwnedFd)> {
    let ns = Netns::create(name)?;
    let tun = ns.run(|| {
        let tun = open_tun()?;
        if spec.host_buffers {
            return Ok(tun);
        }
        let max = spec.tcp_buffer_max();
        for (key, val) in [
            ("tcp_rmem", format!("4096 131072 {max}")),
            ("tcp_wmem", format!("4096 16384 {max}")),
        ] {
            let path = format!("/proc/sys/net/ipv4/{key}");
            std::fs::write(&path, val).with_context(|| format!("writing {path}"))?;
        }
        Ok(tun)
    })?;
    let mtu = MTU.to_string();
    let cidr = format!("{addr}/24");
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    ip(&["-n", name, "addr", "add", &cidr, "dev", TUN_NAME])?;
    // A long device queue: a forwarder that falls briefly behind must not cause drops the
    // link itself would not.
    ip(&[
        "-n",
        name,
        "link",
        "set",
        TUN_NAME,
        "mtu",
        &mtu,
        "txqueuelen",
        "10000",
        "up",
    ])?;
    Ok((ns, tun))
}
