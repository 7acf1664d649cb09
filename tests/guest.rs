//! Migrations of a real guest (a Debian kernel with a busybox init, `common::guest`) between
//! two `mtunnel serve` nodes on loopback, under TCG: the guest keeps running on the target
//! (its heartbeat on the serial port goes on), what it wrote to its disk before the switch
//! is on the target's disk, and its kernel log shows no errors.
//!
//! Needs QEMU (`.ci/install-qemu.sh`), `busybox-static`, `gcc` with a static libc and
//! `apt-get download` access to Debian's kernel package; `scripts/test-all.sh` sets that up.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::guest::heartbeats;
use common::guest::{Console, guest_image};
use common::tcg_node as node;
use common::{
    TestServer, bounded, eventually, migrate_online_ok, mt, mt_ok, pid_of, qmp, target_arg,
};

fn image(node: &TestServer, vmid: u32, name: &str) -> PathBuf {
    node.data
        .parent()
        .unwrap()
        .join(format!("s/local/images/{vmid}/{name}"))
}

/// Creates VM `vmid` (`memory` MiB, one raw `disk` unless it is "", a serial port) and boots the real
/// guest on it with `append` on the kernel command line; returns its console once it is up.
async fn boot_guest(
    src: &TestServer,
    vmid: u32,
    (memory, disk): (u32, &str),
    append: &str,
) -> Console {
    let guest = guest_image();
    let id = vmid.to_string();
    let mem = memory.to_string();
    let mut create = vec!["vm", "create", &id, "--memory", &mem];
    if !disk.is_empty() {
        create.extend(["--disk", disk]);
    }
    mt_ok(src, &create).await;
    let conf = src.vm_config(vmid);
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{text}serial0: socket\n")).unwrap();
    let mut args = vec!["vm".to_string(), "start".into(), id];
    args.extend(guest.start_args(append));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    mt_ok(src, &args).await;
    let console = Console::connect(&src.run.join(format!("{vmid}.serial0"))).await;
    console.wait_line(120, "guest: ready").await;
    console
}

/// Waits (at most 10 s) until process `pid` is gone.
async fn wait_exit(pid: i32) {
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {pid} still runs after 10 s");
}

/// The real guest moves live with its disk: the heartbeat goes on on the target, counting
/// on from where the source stopped; the marker the guest wrote to its disk before the
/// migration is on the target's disk; the guest's kernel log has no errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_guest_keeps_running_after_online_migration() {
    bounded(300, async {
        let src = node("gsrc");
        let dst = node("gdst");
        let mut console = boot_guest(&src, 310, (256, "local:64M:raw"), "").await;
        let src_pid = pid_of(&src, 310).unwrap();
        let token = format!("before-switch-{}", std::process::id());
        console.send(&format!("mark {token}")).await;
        console.wait_line(30, &format!("marked {token}")).await;
        console
            .wait(30, "heartbeats", |l| heartbeats(l).len() >= 5)
            .await;

        let out = migrate_online_ok(&src, &dst, 310).await;
        assert!(out.contains("migration of VM 310 to 127.0.0.1"), "{out}");
        wait_exit(src_pid).await;
        let last_on_source = console.heartbeats().last().copied().unwrap();

        let mut target = Console::connect(&dst.run.join("310.serial0")).await;
        target
            .wait(60, "10 heartbeats on the target", |l| {
                heartbeats(l).len() >= 10
            })
            .await;
        let beats = target.heartbeats();
        assert!(
            beats[0].0 > last_on_source.0 && beats[0].1 >= last_on_source.1,
            "the target's heartbeat {:?} does not go on from the source's last {last_on_source:?}",
            beats[0]
        );
        for w in beats.windows(2) {
            assert!(
                w[1].0 == w[0].0 + 1 && w[1].1 >= w[0].1,
                "heartbeats on the target not consecutive: {w:?}"
            );
        }
        let errors = target.kernel_errors().await;
        assert!(errors.is_empty(), "guest kernel log errors: {errors:?}");

        let disk = std::fs::read(image(&dst, 310, "vm-310-disk-0.raw")).unwrap();
        let mark = format!("MTUNNEL-MARK {token}\n");
        assert_eq!(
            &disk[2048 * 512..2048 * 512 + mark.len()],
            mark.as_bytes(),
            "the marker the guest wrote before the switch is not on the target's disk"
        );
        mt_ok(&dst, &["vm", "stop", "310"]).await;
    })
    .await;
}

/// The heartbeat counter of the newest beat `console` has read.
fn last_beat(console: &Console) -> u64 {
    console.heartbeats().last().map_or(0, |b| b.0)
}

/// A busy guest: it rewrites an 8 MiB working set at 32 MB/s while the migration may send
/// 16 MiB/s (`--bwlimit`, the slow link), so what is left (the working set) never fits
/// QEMU's 100 ms downtime by itself. With auto-converge, XBZRLE and the downtime escalation
/// switched off and a give-up bound of 10 s, `migrate --online` gives up with a message
/// saying so, the guest keeps running on the source (its heartbeat goes on) and the target
/// keeps no config or QEMU. Then, with the tuning at its defaults, the same migration
/// converges (the tuning is printed, the progress shows the dirty rate and the throttle)
/// and the heartbeat goes on on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_guest_gives_up_without_tuning_and_converges_with_defaults() {
    bounded(400, async {
        let src = node("bsrc");
        let dst = node("bdst");
        let console = boot_guest(&src, 320, (128, "local:16M:raw"), "mt.dirty=32,8").await;
        console
            .wait(30, "the memory writer's first rate report", |l| {
                l.iter().any(|x| x.starts_with("dirty: "))
            })
            .await;
        let conf_before = std::fs::read_to_string(src.vm_config(320)).unwrap();
        let target = target_arg(&dst, dst.port);
        let args = vec![
            "migrate",
            "320",
            "--target",
            &target,
            "--target-storage",
            "local",
            "--online",
            "--bwlimit",
            "16384",
        ];
        let untuned = [
            "--no-auto-converge",
            "--no-xbzrle",
            "--no-downtime-escalation",
            "--max-ram-time",
            "10",
        ];
        let out = mt(&src, &[args.as_slice(), &untuned].concat()).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "an untuned migration converged:\n{err}"
        );
        assert!(
            err.contains("the RAM did not converge within 10 s (--max-ram-time)")
                && err.contains("migration cancelled, the VM keeps running on the source"),
            "{err}"
        );
        assert!(
            err.contains("auto-converge off (--no-auto-converge)"),
            "{err}"
        );
        assert!(
            err.contains(
                "is off: leave out --no-auto-converge --no-xbzrle --no-downtime-escalation"
            ),
            "{err}"
        );
        // The source guest runs on: new heartbeats, QEMU running, config as before.
        let n = last_beat(&console);
        console
            .wait(30, "heartbeats after the give-up", |l| {
                heartbeats(l).last().is_some_and(|b| b.0 >= n + 10)
            })
            .await;
        let st = qmp(&src.run, 320, "query-status", serde_json::Value::Null).await;
        assert_eq!(st["status"], "running", "{st}");
        assert!(
            eventually(Duration::from_secs(30), || {
                std::fs::read_to_string(src.vm_config(320)).ok().as_deref()
                    == Some(conf_before.as_str())
                    && !dst.vm_config(320).exists()
                    && pid_of(&dst, 320).is_none()
            })
            .await,
            "source config changed or the target kept the VM:\n{}",
            dst.log()
        );

        let src_pid = pid_of(&src, 320).unwrap();
        let out = mt(&src, &args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the busy guest did not converge:\n{err}"
        );
        for text in [
            "RAM: auto-converge on",
            "RAM: XBZRLE on, cache 16.0 MiB",
            "guest dirties",
            "CPU throttle",
        ] {
            assert!(err.contains(text), "no '{text}' in:\n{err}");
        }
        // Auto-converge stepped by --throttle-increment's 20 (QEMU's own 10 would show
        // 30, 50, ... once past the first step).
        assert!(
            err.contains("from 20 % up by 20 % per step (--throttle-increment)"),
            "{err}"
        );
        let steps: std::collections::BTreeSet<u64> = err
            .split("CPU throttle ")
            .skip(1)
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect();
        assert!(
            steps.iter().all(|t| [0, 20, 40, 60, 80, 99].contains(t)),
            "throttle values {steps:?} are not 20 % steps:\n{err}"
        );
        // It struggled (the vCPUs throttled), so the switch was paced; an idle guest's
        // migration keeps the kernel's queue (tests/migration.rs).
        assert!(!err.contains("CPU throttle at most 0 %"), "{err}");
        assert!(
            err.contains(
                "RAM: the guest keeps dirtying: the queue behind QEMU holds half the downtime \
                 limit at the link's rate ("
            ) && err.contains(
                "at most --ram-queue-mib 32) and QEMU switches over only when the rest fits \
                 the other half, so the guest's pause stays within the limit"
            ),
            "{err}"
        );
        wait_exit(src_pid).await;
        let n = last_beat(&console);
        let target = Console::connect(&dst.run.join("320.serial0")).await;
        target
            .wait(60, "heartbeats on the target", |l| heartbeats(l).len() >= 5)
            .await;
        assert!(target.heartbeats()[0].0 > n, "{:?}", target.heartbeats());
        mt_ok(&dst, &["vm", "stop", "320"]).await;
    })
    .await;
}

/// `--postcopy` with a busy guest that precopy cannot converge (8 MiB rewritten at 32
/// MB/s, 16 MiB/s for the migration, no auto-converge, XBZRLE or downtime escalation):
/// after the first pass the remaining RAM stops shrinking, the target commits the VM
/// (`resume`) before the switch, the migration switches to postcopy and completes, the
/// output says each step, the target QEMU ran with `postcopy-ram`, and the heartbeat goes
/// on on the target, consecutively from where the source stopped, with no kernel errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_guest_moves_with_postcopy() {
    bounded(300, async {
        let src = node("psrc");
        let dst = node("pdst");
        // Disk-less: `--postcopy` refuses local disks (checked at the end).
        let console = boot_guest(&src, 330, (128, ""), "mt.dirty=32,8").await;
        console
            .wait(30, "the memory writer's first rate report", |l| {
                l.iter().any(|x| x.starts_with("dirty: "))
            })
            .await;
        let src_pid = pid_of(&src, 330).unwrap();
        let target = target_arg(&dst, dst.port);
        let args = [
            "migrate",
            "330",
            "--target",
            &target,
            "--target-storage",
            "local",
            "--online",
            "--bwlimit",
            "16384",
            "--no-auto-converge",
            "--no-xbzrle",
            "--no-downtime-escalation",
            "--max-ram-time",
            "90",
            "--postcopy",
        ];
        let out = mt(&src, &args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the postcopy migration failed:\n{err}"
        );
        eprintln!(
            "mtunnel migrate --postcopy said:\n{err}{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for text in [
            "RAM: postcopy on request (--postcopy)",
            "RAM: precopy does not converge (",
            "switching to postcopy; the target commits VM 330 first ('resume')",
            "RAM: switched to postcopy after ",
            "VM 330 runs on the target (resumed before the switch to postcopy)",
        ] {
            assert!(err.contains(text), "no '{text}' in:\n{err}");
        }
        assert!(!err.contains("VM 330 resumed on the target"), "{err}");
        let caps = qmp(
            &dst.run,
            330,
            "query-migrate-capabilities",
            serde_json::Value::Null,
        )
        .await;
        let postcopy = caps
            .as_array()
            .and_then(|a| a.iter().find(|c| c["capability"] == "postcopy-ram"))
            .map(|c| c["state"].clone());
        assert_eq!(postcopy, Some(serde_json::json!(true)), "{caps}");
        wait_exit(src_pid).await;
        let last_on_source = console.heartbeats().last().copied().unwrap();
        let mut target = Console::connect(&dst.run.join("330.serial0")).await;
        target
            .wait(60, "10 heartbeats on the target", |l| {
                heartbeats(l).len() >= 10
            })
            .await;
        let beats = target.heartbeats();
        assert!(
            beats[0].0 > last_on_source.0,
            "the target's heartbeat {:?} does not go on from the source's last {last_on_source:?}",
            beats[0]
        );
        for w in beats.windows(2) {
            assert!(
                w[1].0 == w[0].0 + 1 && w[1].1 >= w[0].1,
                "heartbeats on the target not consecutive: {w:?}"
            );
        }
        let errors = target.kernel_errors().await;
        assert!(errors.is_empty(), "guest kernel log errors: {errors:?}");
        mt_ok(&dst, &["vm", "stop", "330"]).await;
    })
    .await;
}

/// Fencing before the switch: a target whose `resume` refuses as a fenced node does
/// (`VM 340 was not resumed: ...`, from a `resume.lua` in its handlers directory) gets no
/// switch to postcopy. The source sends `resume` before `migrate-start-postcopy`, reads the
/// refusal as "the target runs nothing", cancels the migration and the guest runs on at
/// the source (heartbeats go on, QEMU running, config as before, unlocked); the target
/// keeps no config or QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_target_gets_no_postcopy_switch_and_the_guest_runs_on() {
    bounded(300, async {
        let src = node("fsrc");
        let dst = node("fdst");
        let handlers = dst.data.join("handlers");
        std::fs::create_dir_all(&handlers).unwrap();
        std::fs::write(
            handlers.join("resume.lua"),
            r#"return {
  description = "Resume the migrated VM (fenced, for the test).",
  params = false,
  lock = false,
  run = function(ctx, p)
    pve.fail("VM " .. ctx.vmid .. " was not resumed: VM " .. ctx.vmid .. " belongs to node 'elsewhere' now")
  end,
}
"#,
        )
        .unwrap();
        let console = boot_guest(&src, 340, (128, ""), "mt.dirty=32,8").await;
        console
            .wait(30, "the memory writer's first rate report", |l| {
                l.iter().any(|x| x.starts_with("dirty: "))
            })
            .await;
        let conf_before = std::fs::read_to_string(src.vm_config(340)).unwrap();
        let target = target_arg(&dst, dst.port);
        let args = [
            "migrate",
            "340",
            "--target",
            &target,
            "--target-storage",
            "local",
            "--online",
            "--bwlimit",
            "16384",
            "--no-auto-converge",
            "--no-xbzrle",
            "--no-downtime-escalation",
            "--max-ram-time",
            "90",
            "--postcopy",
        ];
        let out = mt(&src, &args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "migrated despite the fenced target:\n{err}");
        eprintln!("mtunnel migrate --postcopy to a fenced target said:\n{err}");
        for text in [
            "switching to postcopy; the target commits VM 340 first ('resume')",
            "the target did not commit the VM before the switch to postcopy",
            "VM 340 was not resumed: VM 340 belongs to node 'elsewhere' now",
        ] {
            assert!(err.contains(text), "no '{text}' in:\n{err}");
        }
        assert!(!err.contains("switched to postcopy"), "{err}");
        let n = last_beat(&console);
        console
            .wait(30, "heartbeats after the refused switch", |l| {
                heartbeats(l).last().is_some_and(|b| b.0 >= n + 5)
            })
            .await;
        let st = qmp(&src.run, 340, "query-status", serde_json::Value::Null).await;
        assert_eq!(st["status"], "running", "{st}");
        assert!(
            eventually(Duration::from_secs(30), || {
                std::fs::read_to_string(src.vm_config(340)).ok().as_deref()
                    == Some(conf_before.as_str())
                    && !dst.vm_config(340).exists()
                    && pid_of(&dst, 340).is_none()
            })
            .await,
            "source config changed or the target kept the VM:\n{}",
            dst.log()
        );
        mt_ok(&src, &["vm", "stop", "340"]).await;
    })
    .await;
}
