#!/usr/bin/env bash
# Builds the Debian package target/debian/mtunnel_<version>_<arch>.deb (and the
# mtunnel-dbgsym .ddeb with the binary's debug symbols): builds the binary, has it write its
# man pages and shell completions (`mtunnel generate-docs`, from its own command-line
# definition and packaging/mtunnel.toml) into target/deb-assets, then runs `cargo deb`,
# which packs them with the stripped binary. Needs cargo-deb (`cargo install cargo-deb`).
#
#   scripts/build-deb.sh [--profile P] [--no-build] [cargo-deb options, e.g. --output DIR]
#
# --profile dev --no-build packages the debug build as it is (tests/packaging.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: cargo-deb is missing: cargo install cargo-deb --locked" >&2
  exit 1
fi
if [ "$build" = 1 ]; then
  cargo build --locked --profile "$profile" --bin mtunnel
fi
case "$profile" in
  dev | test) dir=debug ;;
  bench) dir=release ;;
  *) dir="$profile" ;;
esac
bin="${CARGO_TARGET_DIR:-target}/$dir/mtunnel"
rm -rf target/deb-assets
"$bin" generate-docs target/deb-assets
exec cargo deb --no-build --profile "$profile" "${args[@]}"
