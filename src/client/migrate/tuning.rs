//! How the RAM of a live migration is made to converge while the guest keeps dirtying it,
//! as Proxmox's own source (`QemuMigrate::phase2`) does by default: auto-converge (QEMU
//! throttles the vCPUs while they dirty memory faster than the link sends it), XBZRLE
//! (re-dirtied pages go as deltas against a cache of 10 % of the VM's RAM, rounded up to a
//! power of two), a downtime limit of 100 ms doubled whenever the remaining RAM grew in 6
//! samples, and, beyond PVE, a bound on the RAM phase after which the migration gives up
//! and the VM keeps running on the source. Each can be switched off (`mtunnel migrate
//! --no-auto-converge`, `--no-xbzrle`, `--no-downtime-escalation`, `--max-ram-time`), and
//! the escalation bounded (`--max-downtime`). Unlike PVE, which leaves QEMU's 10 %,
//! auto-converge steps the throttle by [`DEFAULT_THROTTLE_INCREMENT`] (`--throttle-increment`).
//!
//! Two more ways, each for a case the above does not serve: multifd channels may compress
//! pages with zstd (`--compress`, worth its CPU only when the link is the limit), and on
//! request (`--postcopy`) the migration switches to postcopy when precopy does not
//! converge ([`PostcopySwitch`]): the guest then runs on the target at once and fetches
//! the pages it still lacks from the source.

use std::time::Duration;

use crate::client::progress::human;

/// The initial downtime limit (PVE's `migrate_downtime` default, 0.1 s).
pub const INITIAL_DOWNTIME_MS: u64 = 100;

/// The percent auto-converge adds to the vCPU throttle each time the guest still dirtied
/// faster than the link sent (QEMU's `cpu-throttle-increment`; QEMU's default and PVE's
/// 10). The throttle starts at 20 % and steps at most once per pass over the RAM, so on a
/// slow link its climb to 99 % makes most of a busy guest's RAM phase: measured with a 1
/// GiB guest rewriting 256 MiB at 40 MB/s over 20 ms / 200 Mbit/s, 20 took the migration
/// to 86 / 89 s (median / slowest), against 127 / 134 s with PVE's 10 in the same run
/// (docs/performance.md). A guest that converges without the throttle never feels it.
pub const DEFAULT_THROTTLE_INCREMENT: u8 = 20;

/// Default bound of the RAM phase.
pub const DEFAULT_MAX_RAM_TIME: Duration = Duration::from_secs(30 * 60);

/// Samples with growing remaining RAM that double the downtime limit (PVE: more than 5).
const GROWING_SAMPLES: u32 = 6;

/// The RAM limit (KiB/s) at or below which `--compress auto` compresses with zstd: 128
/// MiB/s. Measured here (2 cores, QEMU 10.0, 2 multifd channels, 64 MiB of RAM a third
/// of it compressible): zstd moved it in 0.83 s against 1.32 s uncompressed at 40 MiB/s,
/// 0.37 against 0.54 s at 100 MiB/s, 0.22 against 0.32 s at 200 MiB/s, and no faster at
/// 400 MiB/s; unlimited on loopback it took twice as long (0.10 against 0.05 s). The
/// guest's vCPUs (TCG) take one of the two cores, so the bound sits below the crossover.
pub const ZSTD_AUTO_MAX_KIB: u64 = 128 * 1024;

/// How the multifd channels compress pages (`mtunnel migrate --compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compression {
    /// zstd when multifd is used and `--bwlimit` is at most 128 MiB/s, else none.
    #[default]
    Auto,
    /// zstd (needs `--streams` 2 or more).
    Zstd,
    /// Uncompressed pages.
    None,
}

/// What the user left switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamTuning {
    pub auto_converge: bool,
    /// Percent added to the throttle per step (`--throttle-increment`).
    pub throttle_increment: u8,
    pub xbzrle: bool,
    pub escalate_downtime: bool,
    /// The escalation never raises the downtime limit past this (ms); `None`: no bound, as
    /// PVE.
    pub max_downtime_ms: Option<u64>,
    /// Give up (cancel, the VM keeps running on the source) when the RAM phase takes longer
    /// (before a switch to postcopy: after it, the migration runs to its end).
    pub max_ram_time: Duration,
    /// The multifd channels' compression.
    pub compress: Compression,
    /// Switch to postcopy when precopy does not converge (`--postcopy`).
    pub postcopy: bool,
    /// The most (MiB) the queue behind QEMU may hold once a single RAM stream struggles
    /// and the switch is paced (`--ram-queue-mib`; until then the kernel's ~200 KiB); 0:
    /// never sized or paced, QEMU connects to the forward's socket itself.
    pub ram_queue_mib: u32,
}

/// `--ram-queue-mib`'s default: the depth a direct TCP socket of QEMU's autotunes to under
/// the packaged sysctl (`tcp_wmem` max 32 MiB); reached only by downtime limits of ~3 s
/// and more at 20 MiB/s (the queue holds half the limit's worth); see
/// [`RamTuning::ram_queue_mib`] and docs/performance.md.
pub const DEFAULT_RAM_QUEUE_MIB: u32 = 32;

impl Default for RamTuning {
    fn default() -> Self {
        RamTuning {
            auto_converge: true,
            throttle_increment: DEFAULT_THROTTLE_INCREMENT,
            xbzrle: true,
            escalate_downtime: true,
            max_downtime_ms: None,
            max_ram_time: DEFAULT_MAX_RAM_TIME,
            compress: Compression::Auto,
            postcopy: false,
            ram_queue_mib: DEFAULT_RAM_QUEUE_MIB,
        }
    }
}

/// What the multifd channels of one migration do: `Some("zstd")` or `None`, and the line
/// that says why. `streams` are the RAM streams used, `limit_kib` the user's `--bwlimit`,
/// `offered` whether the target accepts zstd (`mtunnel-features`).
pub fn choose_compression(
    asked: Compression,
    streams: u32,
    limit_kib: Option<u64>,
    offered: bool,
) -> (Option<&'static str>, String) {
    let limit = limit_kib.filter(|&k| k > 0);
    match asked {
        Compression::None => (None, "compression off (--compress none)".into()),
        _ if streams < 2 => (
            None,
            "no compression: QEMU compresses only multifd channels (--streams 2 or more)".into(),
        ),
        _ if !offered => (
            None,
            "no compression: the target does not offer zstd (mtunnel-features)".into(),
        ),
        Compression::Zstd => (
            Some("zstd"),
            "zstd compression on the multifd channels (--compress zstd)".into(),
        ),
        Compression::Auto => match limit {
            Some(k) if k <= ZSTD_AUTO_MAX_KIB => (
                Some("zstd"),
                format!(
                    "zstd compression on the multifd channels: the link is limited to {}/s (--bwlimit), where fewer bytes beat zstd's CPU cost",
                    human(k * 1024)
                ),
            ),
            _ => (
                None,
                format!(
                    "no compression: zstd pays only on a link limited to {}/s or less (--bwlimit), else its CPU cost outweighs it (--compress zstd forces it)",
                    human(ZSTD_AUTO_MAX_KIB * 1024)
                ),
            ),
        },
    }
}

/// One-second samples in which the remaining RAM must not have shrunk, after the first
/// full pass, before [`PostcopySwitch`] switches.
pub const POSTCOPY_FLAT_SAMPLES: usize = 3;

/// When `--postcopy` switches: once the first full pass over the RAM is done (QEMU's
/// second dirty sync; every page then went once, so postcopy has to fetch only what was
/// dirtied since) and the remaining RAM is not below what it was
/// [`POSTCOPY_FLAT_SAMPLES`] samples before: precopy is not converging. A guest whose
/// remaining RAM keeps shrinking completes in precopy, without postcopy's risk.
#[derive(Debug, Clone, Default)]
pub struct PostcopySwitch {
    /// The remaining RAM of the last samples after the first pass, oldest first.
    recent: std::collections::VecDeque<u64>,
}

impl PostcopySwitch {
    /// One `query-migrate` sample of an active precopy; true: switch now.
    pub fn sample(&mut self, dirty_sync_count: u64, remaining: u64) -> bool {
        if dirty_sync_count < 2 {
            return false;
        }
        self.recent.push_back(remaining);
        if self.recent.len() <= POSTCOPY_FLAT_SAMPLES {
            return false;
        }
        let before = self.recent.pop_front().unwrap_or(u64::MAX);
        remaining >= before
    }
}

/// The XBZRLE cache for a VM with `memory` bytes of RAM: a tenth, rounded up to a power
/// of two (PVE's `round_powerof2`), at least one page.
pub fn xbzrle_cache_size(memory: u64) -> u64 {
    (memory / 10).max(4096).next_power_of_two()
}

/// What one migration uses: the switches after what QEMU allows, and the lines that say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub auto_converge: bool,
    /// QEMU's `cpu-throttle-increment` when auto-converge is on.
    pub throttle_increment: Option<u8>,
    /// The cache size when XBZRLE is on.
    pub xbzrle_cache: Option<u64>,
    pub escalate_downtime: bool,
    /// The bound on the escalated downtime limit (ms).
    pub max_downtime_ms: Option<u64>,
    /// One line per choice, with its reason.
    pub notes: Vec<String>,
}

impl RamTuning {
    /// The plan for a VM with `memory` bytes of RAM moving in `streams` streams.
    pub fn plan(&self, memory: u64, streams: u32) -> Plan {
        let mut notes = Vec::new();
        notes.push(if self.auto_converge {
            format!(
                "auto-converge on: QEMU throttles the guest's vCPUs while it dirties memory faster than the link sends it, from 20 % up by {} % per step (--throttle-increment)",
                self.throttle_increment
            )
        } else {
            "auto-converge off (--no-auto-converge)".to_string()
        });
        let xbzrle_cache = match (self.xbzrle, streams > 1) {
            (false, _) => {
                notes.push("XBZRLE off (--no-xbzrle)".into());
                None
            }
            (true, true) => {
                notes.push(format!(
                    "XBZRLE off: QEMU does not combine it with multifd (--streams {streams})"
                ));
                None
            }
            (true, false) => {
                let size = xbzrle_cache_size(memory);
                notes.push(format!(
                    "XBZRLE on, cache {} (a tenth of the VM's RAM): re-dirtied pages go as deltas",
                    human(size)
                ));
                Some(size)
            }
        };
        notes.push(if self.escalate_downtime {
            let bound = match self.max_downtime_ms {
                Some(ms) => format!(", up to {ms} ms (--max-downtime)"),
                None => String::new(),
            };
            format!(
                "downtime limit {INITIAL_DOWNTIME_MS} ms, doubled whenever the remaining RAM grew in {GROWING_SAMPLES} samples{bound}"
            )
        } else {
            format!("downtime limit {INITIAL_DOWNTIME_MS} ms, fixed (--no-downtime-escalation)")
        });
        notes.push(format!(
            "gives up after {} s of RAM transfer (--max-ram-time), the VM then keeps running here",
            self.max_ram_time.as_secs()
        ));
        Plan {
            auto_converge: self.auto_converge,
            throttle_increment: self.auto_converge.then_some(self.throttle_increment),
            xbzrle_cache,
            escalate_downtime: self.escalate_downtime,
            max_downtime_ms: self.max_downtime_ms,
            notes,
        }
    }
}

/// PVE's downtime escalation: count the samples in which `remaining` grew; after
/// `GROWING_SAMPLES` (6) of them, double the limit (at most to `max_ms`) and count again.
#[derive(Debug, Clone)]
pub struct DowntimeEscalation {
    pub limit_ms: u64,
    max_ms: u64,
    last_remaining: Option<u64>,
    growing: u32,
}

impl Default for DowntimeEscalation {
    fn default() -> Self {
        Self::up_to(None)
    }
}

impl DowntimeEscalation {
    /// An escalation that never raises the limit past `max_ms` (`None`: no bound).
    pub fn up_to(max_ms: Option<u64>) -> Self {
        DowntimeEscalation {
            limit_ms: INITIAL_DOWNTIME_MS,
            max_ms: max_ms.unwrap_or(u64::MAX),
            last_remaining: None,
            growing: 0,
        }
    }

    /// One `query-migrate` sample; `Some(new limit)` when the limit is to be raised.
    pub fn sample(&mut self, remaining: u64) -> Option<u64> {
        if self.last_remaining.is_some_and(|last| remaining > last) {
            self.growing += 1;
        }
        self.last_remaining = Some(remaining);
        if self.growing < GROWING_SAMPLES {
            return None;
        }
        self.growing = 0;
        let next = self.limit_ms.saturating_mul(2).min(self.max_ms);
        if next <= self.limit_ms {
            return None;
        }
        self.limit_ms = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xbzrle_cache_is_a_tenth_rounded_up_to_a_power_of_two() {
        assert_eq!(xbzrle_cache_size(1 << 30), 128 << 20);
        assert_eq!(xbzrle_cache_size(256 << 20), 32 << 20);
        assert_eq!(xbzrle_cache_size(0), 4096);
    }

    /// Auto-converge steps by `--throttle-increment` (20 unless set), and the plan says so;
    /// with auto-converge off there is no step to set.
    #[test]
    fn the_throttle_steps_by_the_increment() {
        let plan = RamTuning::default().plan(1 << 30, 1);
        assert_eq!(plan.throttle_increment, Some(20));
        assert!(plan.notes[0].ends_with("from 20 % up by 20 % per step (--throttle-increment)"));
        let pve = RamTuning {
            throttle_increment: 10,
            ..RamTuning::default()
        };
        assert_eq!(pve.plan(1 << 30, 1).throttle_increment, Some(10));
        let off = RamTuning {
            auto_converge: false,
            ..RamTuning::default()
        };
        assert_eq!(off.plan(1 << 30, 1).throttle_increment, None);
    }

    /// Six growing samples double the limit; shrinking ones do not count.
    #[test]
    fn downtime_doubles_after_six_growing_samples() {
        let mut e = DowntimeEscalation::default();
        let mut raised = Vec::new();
        for (i, rem) in [10, 20, 15, 30, 40, 50, 60, 70, 80, 90]
            .into_iter()
            .enumerate()
        {
            if let Some(l) = e.sample(rem) {
                raised.push((i, l));
            }
        }
        assert_eq!(raised, vec![(7, 200)]);
        assert_eq!(e.limit_ms, 200);
    }

    /// `--max-downtime` bounds the doubling: 100, 200, then 300 (not 400), then no more.
    #[test]
    fn the_escalation_stops_at_max_downtime() {
        let mut e = DowntimeEscalation::up_to(Some(300));
        let raised: Vec<u64> = (1..=40u64).filter_map(|rem| e.sample(rem)).collect();
        assert_eq!(raised, vec![200, 300]);
        assert_eq!(e.limit_ms, 300);
        let plan = RamTuning {
            max_downtime_ms: Some(300),
            ..RamTuning::default()
        }
        .plan(1 << 30, 1);
        assert!(
            plan.notes
                .iter()
                .any(|n| n.ends_with(", up to 300 ms (--max-downtime)")),
            "{:?}",
            plan.notes
        );
    }

    /// `auto` compresses only where measurement showed a gain: multifd, a link limited to
    /// 128 MiB/s or less, a target that offers zstd.
    #[test]
    fn compression_is_chosen_where_it_pays_and_says_why() {
        let c = |asked, streams, limit, offered| choose_compression(asked, streams, limit, offered);
        assert_eq!(
            c(Compression::Auto, 4, Some(40 * 1024), true).0,
            Some("zstd")
        );
        assert_eq!(
            c(Compression::Auto, 4, Some(128 * 1024), true).0,
            Some("zstd")
        );
        assert_eq!(c(Compression::Auto, 4, Some(128 * 1024 + 1), true).0, None);
        assert_eq!(c(Compression::Auto, 4, None, true).0, None);
        assert_eq!(c(Compression::Auto, 1, Some(1024), true).0, None);
        assert_eq!(c(Compression::Auto, 4, Some(1024), false).0, None);
        assert_eq!(c(Compression::Zstd, 2, None, true).0, Some("zstd"));
        assert_eq!(c(Compression::Zstd, 2, None, false).0, None);
        assert_eq!(c(Compression::None, 4, Some(1024), true).0, None);
        let (_, why) = c(Compression::Auto, 4, Some(40 * 1024), true);
        assert_eq!(
            why,
            "zstd compression on the multifd channels: the link is limited to 40.0 MiB/s (--bwlimit), where fewer bytes beat zstd's CPU cost"
        );
        let (_, why) = c(Compression::Zstd, 2, None, false);
        assert_eq!(
            why,
            "no compression: the target does not offer zstd (mtunnel-features)"
        );
    }

    /// No switch during the first pass, none while the remaining RAM shrinks, a switch once
    /// it stayed flat or grew over 3 samples after the first pass.
    #[test]
    fn postcopy_switches_after_the_first_pass_when_remaining_stops_shrinking() {
        let mut s = PostcopySwitch::default();
        for rem in [900, 800, 700, 600, 600, 600, 600] {
            assert!(!s.sample(1, rem), "first pass");
        }
        for rem in [500, 400, 300, 200] {
            assert!(!s.sample(2, rem), "shrinking");
        }
        assert!(!s.sample(2, 210));
        assert!(!s.sample(2, 190));
        assert!(s.sample(2, 300), "not below the sample 3 before (200)");
    }

    #[test]
    fn multifd_turns_xbzrle_off_and_says_why() {
        let plan = RamTuning::default().plan(1 << 30, 4);
        assert_eq!(plan.xbzrle_cache, None);
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("does not combine it with multifd"))
        );
        let plan = RamTuning::default().plan(1 << 30, 1);
        assert_eq!(plan.xbzrle_cache, Some(128 << 20));
    }
}
