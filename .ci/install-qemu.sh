#!/usr/bin/env bash
# install-qemu.sh: installs qemu-system-x86 (qemu-system-x86_64) in the version that matches the
# installed qemu-utils, without editing /etc/apt. Idempotent; run as root.
#
# Why: on Debian 12 machines whose qemu-utils comes from bookworm-backports, a plain
# `apt-get install qemu-system-x86` resolves to bookworm's 7.2, which *Breaks* qemu-utils 10 and
# removes it. So we detect where qemu-utils came from:
#   * qemu-utils from backports (~bpoNN in the version): add `<codename>-backports` on the same
#     mirror as the machine's own Debian entry, through a PRIVATE apt state dir (sources, lists,
#     archives, caches under $MTUNNEL_APT_DIR), and install with `-t <codename>-backports`;
#   * otherwise (no qemu-utils, or a regular build, or Debian 13): plain install, pinned to the
#     qemu-utils version when one is installed.
# Exit codes: 0 installed or already fine, 1 failure (the message says what to do).
set -euo pipefail

PRIVATE_DIR="${MTUNNEL_APT_DIR:-/var/cache/mtunnel-apt}"

say() { printf 'install-qemu: %s\n' "$*"; }
die() { printf 'install-qemu: ERROR: %s\n' "$*" >&2; exit 1; }

pkg_version() { # prints the installed version of package $1, or nothing
    dpkg-query -W -f='${db:Status-Abbrev}|${Version}\n' "$1" 2>/dev/null \
        | awk -F'|' '$1 ~ /^ii/ { print $2 }' || true
}

command -v dpkg-query >/dev/null && command -v apt-get >/dev/null \
    || die "this script needs a Debian-like system (dpkg/apt-get); install qemu-system-x86_64 by hand"

utils_ver="$(pkg_version qemu-utils)"
sys_ver="$(pkg_version qemu-system-x86)"

# ---- nothing to do? --------------------------------------------------------------------------
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [[ -z "$utils_ver" || "$sys_ver" == "$utils_ver" ]]; then
        say "nothing to do: $(command -v qemu-system-x86_64) present" \
            "(qemu-system-x86 ${sys_ver:-not from a package}, qemu-utils ${utils_ver:-not installed})"
        exit 0
    fi
    say "qemu-system-x86 ${sys_ver:-?} does not match qemu-utils $utils_ver: reinstalling to match"
fi

[[ $EUID -eq 0 ]] || die "must run as root (apt-get install); try: sudo $0"

export DEBIAN_FRONTEND=noninteractive
. /etc/os-release 2>/dev/null || true
codename="${VERSION_CODENAME:-}"

# ---- plain install ---------------------------------------------------------------------------
if [[ "$utils_ver" != *bpo* ]]; then
    # qemu-img/qemu-io (qemu-utils) are needed too; when present, pin both to its version.
    pkgs=(qemu-system-x86 qemu-utils)
    [[ -n "$utils_ver" ]] && pkgs=("qemu-system-x86=$utils_ver" "qemu-utils=$utils_ver")
    say "qemu-utils ${utils_ver:-not installed} is not a backports build: plain install of ${pkgs[*]}"
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}"; then
        say "install failed; refreshing the package lists once and retrying"
        apt-get update
        if ! apt-get install -y --no-install-recommends "${pkgs[@]}"; then
            say "version $utils_ver is not offered any more: installing the current build of both packages (they stay matched)"
            apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils
        fi
    fi
    say "installed qemu-system-x86 $(pkg_version qemu-system-x86): $(qemu-system-x86_64 --version | head -n1)"
    exit 0
fi

# ---- backports install through a private apt state dir ---------------------------------------
[[ -n "$codename" ]] || die "qemu-utils $utils_ver is a backports build but /etc/os-release has no VERSION_CODENAME"
bpo="${codename}-backports"
say "qemu-utils $utils_ver comes from backports: installing the matching qemu-system-x86 from $bpo"

# Find the machine's own Debian entries (every suite named <codename> or <codename>-*) in the
# sources apt actually reads (*.sources in deb822 form, *.list and sources.list one-line form),
# and the mirror URI + keyring of the entry that carries the plain <codename> suite.
entries="$(mktemp)"
trap 'rm -f "$entries"' EXIT
shopt -s nullglob
for f in /etc/apt/sources.list.d/*.sources; do
    # deb822 paragraphs → "uri|suite|components|signed-by" for every suite of a `deb` paragraph
    awk -v RS= '
        {
            types = ""; uris = ""; suites = ""; comps = ""; signed = "";
            n = split($0, lines, "\n");
            for (i = 1; i <= n; i++) {
                line = lines[i];
                if (line ~ /^#/) continue;
                k = line; sub(/:.*/, "", k); v = line; sub(/^[^:]*:[ \t]*/, "", v);
                if (k == "Types") types = v; else if (k == "URIs") uris = v;
                else if (k == "Suites") suites = v; else if (k == "Components") comps = v;
                else if (k == "Signed-By") signed = v;
                else if (k == "Enabled" && v == "no") types = "";
            }
            if (types !~ /(^|[ \t])deb([ \t]|$)/) next;
            nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/);
            for (a = 1; a <= nu; a++) for (b = 1; b <= ns; b++)
                if (u[a] != "" && s[b] != "") print u[a] "|" s[b] "|" comps "|" signed;
        }' "$f" >>"$entries"
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    # one-line form: deb [opts] uri suite comp...
    awk '
        $1 != "deb" { next }
        {
            i = 2; signed = "";
            if ($2 ~ /^\[/) {
                while (i <= NF) { if ($i ~ /^signed-by=/) { signed = $i; sub(/^signed-by=/, "", signed); sub(/\]$/, "", signed) }
                                  if ($i ~ /\]$/) { i++; break } i++ }
            }
            uri = $i; suite = $(i + 1); comps = "";
            for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j;
            print uri "|" suite "|" comps "|" signed;
        }' "$f" >>"$entries"
done
mine="$(awk -F'|' -v c="$codename" '$2 == c || index($2, c "-") == 1' "$entries" | sort -u)"
base="$(printf '%s\n' "$mine" | awk -F'|' -v c="$codename" '$2 == c { print; exit }')"
[[ -n "$base" ]] || die "no apt entry for suite '$codename' found in /etc/apt; cannot tell which mirror to use for $bpo"
mirror="$(cut -d'|' -f1 <<<"$base")"
keyring="$(cut -d'|' -f4 <<<"$base")"
say "mirror of suite $codename: $mirror${keyring:+ (signed by $keyring)}"

mkdir -p "$PRIVATE_DIR/lists/partial" "$PRIVATE_DIR/archives/partial" "$PRIVATE_DIR/sources.list.d"
list="$PRIVATE_DIR/sources.list"
{
    echo "# written by .ci/install-qemu.sh: the machine's $codename entries plus $bpo (private copy)"
    printf '%s\n' "$mine" | while IFS='|' read -r uri suite comps signed; do
        [[ "$suite" == "$bpo" ]] && continue
        echo "deb${signed:+ [signed-by=$signed]} $uri $suite ${comps:-main}"
    done
    echo "deb${keyring:+ [signed-by=$keyring]} $mirror $bpo main"
} >"$list"
say "private apt sources ($list):"
sed 's/^/    /' "$list"

apt_private=(
    -o "Dir::Etc::sourcelist=$list"
    -o "Dir::Etc::sourceparts=$PRIVATE_DIR/sources.list.d"
    -o "Dir::State::lists=$PRIVATE_DIR/lists"
    -o "Dir::Cache::archives=$PRIVATE_DIR/archives"
    -o "Dir::Cache::pkgcache=$PRIVATE_DIR/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$PRIVATE_DIR/srcpkgcache.bin"
)
say "apt-get update (private lists in $PRIVATE_DIR/lists)"
apt-get "${apt_private[@]}" update -qq

if apt-get "${apt_private[@]}" install -y --no-install-recommends -t "$bpo" \
    "qemu-system-x86=$utils_ver" "qemu-utils=$utils_ver"; then
    :
else
    say "exact version $utils_ver not offered by $bpo any more: installing the current $bpo build of both packages (they stay matched)"
    apt-get "${apt_private[@]}" install -y --no-install-recommends -t "$bpo" qemu-system-x86 qemu-utils
fi
# The downloaded .debs are not needed any more; the lists stay for a faster rerun.
apt-get "${apt_private[@]}" clean

sys_ver="$(pkg_version qemu-system-x86)"
utils_ver="$(pkg_version qemu-utils)"
[[ -n "$sys_ver" && "$sys_ver" == "$utils_ver" ]] \
    || die "after install: qemu-system-x86 '${sys_ver}' vs qemu-utils '${utils_ver}' do not match"
say "installed qemu-system-x86 $sys_ver (matches qemu-utils): $(qemu-system-x86_64 --version | head -n1)"
