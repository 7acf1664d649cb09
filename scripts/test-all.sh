#!/usr/bin/env bash
# Runs every test of mtunnel on a fresh machine: installs what the tests need (QEMU for the
# live-migration tests; btrfs-progs for the btrfs storage tests; promtool for the metrics
# test; busybox-static, libc6-dev and gcc for the real-guest tests, whose kernel comes from
# Debian's linux-image-amd64; iproute2 for the WAN bench test; etcd-server for the cluster
# tests; chromium for the status page test; cargo-deb and man-db for the package test; a
# Python venv with proxmoxer for the client-compatibility test), builds, runs the Rust test
# suites, the Lua handler specs and the cookbook's recipes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f .ci/install-qemu.sh ]; then
  bash .ci/install-qemu.sh
fi

# btrfs-progs for the btrfs storage tests (tests/btrfs.rs: a loop-mounted mkfs.btrfs image).
if ! command -v mkfs.btrfs >/dev/null 2>&1; then
  echo "== installing btrfs-progs"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q btrfs-progs >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q btrfs-progs >/dev/null; }
fi

# promtool (Debian package prometheus) for tests/metrics.rs, which validates the exposition
# with `promtool check metrics`. Only the tool is wanted: where no policy-rc.d exists, a
# temporary one keeps the package from starting a Prometheus server.
if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (Debian package prometheus)"
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
  fi
  install_prometheus() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
  }
  status=0
  install_prometheus || { apt-get update -q >/dev/null && install_prometheus; } || status=$?
  if [ -n "$policy" ]; then rm -f "$policy"; fi
  [ "$status" = 0 ] || { echo "installing prometheus (promtool) failed" >&2; exit "$status"; }
fi

# busybox-static, gcc's static libc and apt-get for the real-guest tests (tests/guest.rs): the
# guest's initramfs is busybox plus a memory writer built with `gcc -static`; its kernel
# comes from `apt-get download linux-image-amd64` (needs package lists), cached in target/guest.
if [ ! -x /bin/busybox ] || ! dpkg -s busybox-static >/dev/null 2>&1 \
  || [ ! -e /usr/lib/x86_64-linux-gnu/libc.a ]; then
  echo "== installing busybox-static, libc6-dev and gcc"
  install_guest_tools() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends busybox-static libc6-dev gcc >/dev/null
  }
  install_guest_tools || { apt-get update -q >/dev/null && install_guest_tools; }
fi
if [ ! -e target/guest/kernel.ok ] && ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  apt-get update -q >/dev/null
fi

# The WAN smoke test (tests/bench_smoke.rs) builds network namespaces with iproute2's `ip`;
# the base image has it, a bare machine may not.
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing iproute2"
  apt-get update -qq && apt-get install -y --no-install-recommends iproute2
fi

# etcd for the cluster tests (tests/cluster.rs starts its own three members on free loopback
# ports). Debian's package may start its own etcd service on 2379/2380 where systemd runs:
# stop and disable that one when we installed it here; the tests never use it.
if [ ! -x /usr/bin/etcd ]; then
  echo "== installing etcd-server"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server >/dev/null; }
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl disable --now etcd || true
  fi
fi

# Debian's chromium for the status page test (tests/status_page.rs: headless, --dump-dom and
# --screenshot against a live node).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium"
  install_chromium() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  }
  install_chromium || { apt-get update -q >/dev/null && install_chromium; }
fi

# cargo-deb and man-db for the package test (tests/packaging.rs builds the .deb with
# scripts/build-deb.sh and renders its man pages with `man -l`). Compiling cargo-deb takes
# minutes, once per machine.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install cargo-deb --locked --version '^3.8' --quiet
fi
if ! command -v man >/dev/null 2>&1; then
  echo "== installing man-db"
  install_man() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends man-db >/dev/null
  }
  install_man || { apt-get update -q >/dev/null && install_man; }
fi

if ! .venv/bin/python -c 'import proxmoxer, requests' 2>/dev/null; then
  echo "== creating .venv with proxmoxer"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check proxmoxer requests
fi

echo "== build"
cargo build --bins --tests

echo "== rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast --test-threads 4
else
  cargo test --no-fail-fast
fi

echo "== handler specs"
./target/debug/mtunnel handlers test
./target/debug/mtunnel handlers check handlers
echo "== handler cookbook (examples/handlers: each recipe against its own overrides)"
./target/debug/mtunnel handlers test examples/handlers
./target/debug/mtunnel handlers check examples/handlers
echo "== all tests passed"
