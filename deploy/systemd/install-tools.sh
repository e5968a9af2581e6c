#!/bin/sh
# Installs from Debian what the tests of deploy/systemd and of the systemd
# attestor run, when missing: systemd-analyze, systemd-sysusers and
# systemd-tmpfiles (package systemd) and dbus-daemon. Nothing is started:
# systemd need not be PID 1, and apt starts no service here (policy-rc.d).
set -eu

die() {
	echo "install-tools.sh: $*" >&2
	exit 1
}

# need PKG CMD...: PKG is missing unless every CMD it provides is there.
missing=""
need() {
	pkg=$1
	shift
	for cmd in "$@"; do
		if ! command -v "$cmd" >/dev/null 2>&1; then
			missing="$missing $pkg"
			return
		fi
	done
}
need systemd systemd-analyze systemd-sysusers systemd-tmpfiles
need dbus-daemon dbus-daemon
[ -z "$missing" ] && exit 0
[ "$(id -u)" = 0 ] || die "missing$missing: install as root (apt-get install --no-install-recommends$missing)"
command -v apt-get >/dev/null 2>&1 || die "missing$missing and no apt-get to install them"
echo "install-tools.sh: installing$missing from Debian" >&2
DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2 ||
	die "apt-get install$missing failed"
