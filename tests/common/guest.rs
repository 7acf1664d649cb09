//! A real guest for the migration tests: the bench's guest builder and serial console
//! (`src/bench/guest.rs`, included here as it is: a Debian kernel and a busybox initramfs
//! cached in `target/guest/`, see there), with the test's way of failing: a missing
//! prerequisite or a console that does not show what a test waits for panics with the
//! reason.

use std::path::Path;

#[path = "../../src/bench/guest.rs"]
mod shared;

pub use shared::GuestImage;

/// The `hb COUNTER UPTIME` lines among `lines`: (counter, guest uptime in seconds).
pub fn heartbeats(lines: &[String]) -> Vec<(u64, f64)> {
    shared::heartbeats(lines)
}

/// The guest's kernel and initramfs, built on first use in `target/guest/` (shared with
/// `mtunnel bench` run from this tree).
pub fn guest_image() -> GuestImage {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("guest");
    shared::build(&cache).unwrap_or_else(|e| panic!("building the test guest: {e:#}"))
}

/// The guest's serial port ([`shared::Console`]), panicking where that returns an error.
pub struct Console(shared::Console);

impl Console {
    /// Connects to the serial socket (retried for 10 s).
    pub async fn connect(path: &Path) -> Console {
        Console(shared::Console::connect(path).await.unwrap_or_else(fail))
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lines()
    }

    /// Whether the other end closed (the QEMU exited).
    pub fn closed(&self) -> bool {
        self.0.closed()
    }

    /// Waits (at most `secs`) until `done` holds for the lines read so far.
    pub async fn wait(&self, secs: u64, what: &str, done: impl Fn(&[String]) -> bool) {
        self.0.wait(secs, what, done).await.unwrap_or_else(fail)
    }

    /// Waits for a line equal to `line`.
    pub async fn wait_line(&self, secs: u64, line: &str) {
        self.0.wait_line(secs, line).await.unwrap_or_else(fail)
    }

    /// Sends one command line to the guest's init.
    pub async fn send(&mut self, line: &str) {
        self.0.send(line).await.unwrap_or_else(fail)
    }

    /// The heartbeats read so far: (counter, guest uptime in seconds).
    pub fn heartbeats(&self) -> Vec<(u64, f64)> {
        self.0.heartbeats()
    }

    /// The guest's kernel log lines at levels emerg..err.
    pub async fn kernel_errors(&mut self) -> Vec<String> {
        self.0.kernel_errors().await.unwrap_or_else(fail)
    }
}

fn fail<T>(e: anyhow::Error) -> T {
    panic!("{e:#}")
}
