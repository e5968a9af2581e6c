#!/bin/sh
# Readies the Debian root filesystem the systemd tests boot with
# systemd-nspawn, systemd as its PID 1:
#   - debootstrap and systemd-container (systemd-nspawn) from Debian,
#     installed when missing (root only);
#   - a minimal bookworm root with systemd, dbus and procps, built once with
#     debootstrap into a cache dir outside the repo (about a minute), from
#     the Debian mirror the machine's apt uses.
# The tests boot it with --volatile=overlay, so it is never written to.
# Prints the root's path on its last line.
#
#   LANYARD_SYSTEMD_CACHE  cache dir to use (default: next to the Go build cache)
#   LANYARD_DEBIAN_MIRROR  mirror to debootstrap from (default: apt's)
#
# Without root the systemd tests skip (outside CI), so nothing is installed
# or built; with CI=true a missing piece is an error.
set -eu

suite=bookworm
include=systemd,systemd-sysv,dbus,procps

die() {
	echo "build.sh: $*" >&2
	exit 1
}

if [ -z "${LANYARD_SYSTEMD_CACHE:-}" ]; then
	gocache=$(go env GOCACHE 2>/dev/null || true)
	case "$gocache" in
	"" | off)
		LANYARD_SYSTEMD_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/lanyard-systemd"
		;;
	*)
		LANYARD_SYSTEMD_CACHE="$(dirname "$gocache")/lanyard-systemd"
		;;
	esac
fi
cache=$LANYARD_SYSTEMD_CACHE

# The mirror of the first Debian archive apt knows (an http(s) URL with
# "debian" in it, not the security one): one-line sources.list entries or
# deb822 .sources files. Third-party repos (other URLs) are skipped.
apt_mirror() {
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '
			function debian(u) { return u ~ /^https?:\/\// && u ~ /debian/ && u !~ /security/ }
			$1 == "deb" {
				for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { if (debian($i)) { print $i; exit } break }
			}
			$1 == "URIs:" && debian($2) { print $2; exit }
		' "$f"
	done | head -n 1
}
mirror=${LANYARD_DEBIAN_MIRROR:-$(apt_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

# The root's name says what went into it, so a change of recipe builds anew.
stamp=$(printf '%s %s %s\n' "$suite" "$include" "minbase" | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-12)
root="$cache/$suite-$stamp"

if [ "$(id -u)" != 0 ]; then
	[ "${CI:-}" = true ] && die "CI=true but not root: booting systemd in a container needs root"
	echo "build.sh: not root, so the systemd tests will skip; nothing installed or built" >&2
	echo "$root/fs"
	exit 0
fi

sh "$(dirname "$0")/../../scripts/install-debian.sh" \
	debootstrap:debootstrap systemd-container:systemd-nspawn util-linux:nsenter

# A root is complete once its .done marker exists (written last).
if [ -f "$root/.done" ]; then
	echo "$root/fs"
	exit 0
fi

mkdir -p "$cache"
# One build at a time per cache dir; whoever waited reuses the result.
exec 9>"$cache/.lock"
flock 9
if [ -f "$root/.done" ]; then
	echo "$root/fs"
	exit 0
fi
# Holding the lock, a leftover is from a killed run.
rm -rf "$root"
mkdir -p "$root"

echo "build.sh: building a Debian $suite root with systemd into $root from $mirror (about a minute the first time)..." >&2
start=$(date +%s)
debootstrap --variant=minbase --include="$include" "$suite" "$root/fs" "$mirror" >"$root/debootstrap.log" 2>&1 ||
	die "debootstrap failed; last lines of $root/debootstrap.log:
$(tail -n 20 "$root/debootstrap.log")"
# Downloaded .debs are not needed to boot.
rm -rf "$root/fs/var/cache/apt/archives/"*.deb
touch "$root/.done"
echo "build.sh: built the root in $(($(date +%s) - start)) s" >&2
echo "$root/fs"
