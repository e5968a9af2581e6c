#!/bin/sh
# Installs from Debian the packages whose command is missing, for the
# scripts that ready the tests' real components. Each argument is
# PACKAGE:COMMAND; a package is installed when its command is not in PATH.
# Needs root (and apt-get) only when something is missing. apt starts no
# service here (policy-rc.d); the tests start their own.
#
#   scripts/install-debian.sh debootstrap:debootstrap systemd-container:systemd-nspawn
set -eu

die() {
	echo "install-debian.sh: $*" >&2
	exit 1
}

missing=""
for pair in "$@"; do
	pkg=${pair%%:*}
	cmd=${pair#*:}
	if ! command -v "$cmd" >/dev/null 2>&1; then
		case " $missing " in
		*" $pkg "*) ;;
		*) missing="$missing $pkg" ;;
		esac
	fi
done
[ -z "$missing" ] && exit 0
[ "$(id -u)" = 0 ] || die "missing$missing: install as root (apt-get install --no-install-recommends$missing)"
command -v apt-get >/dev/null 2>&1 || die "missing$missing and no apt-get to install them"
echo "install-debian.sh: installing$missing from Debian" >&2
DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2 ||
	die "apt-get install$missing failed"
