#!/bin/sh
# Builds Lanyard's Debian package: the static binary, stamped with its
# version as the Dockerfile does, then the .deb with mkdeb (nFPM as a
# library, in this dir's own Go module). `make deb` runs it.
# Prints the .deb's path on its last line.
#
#   VERSION            what `lanyard version` prints
#                      (default: git describe --tags --always --dirty)
#   GOARCH             the package's architecture (default: go env GOARCH)
#   SOURCE_DATE_EPOCH  every file's time in the package
#                      (default: the last commit's time, so a commit
#                      rebuilds to the same bytes)
#   DEB_OUT            dir for the .deb (default: bin/ of the repo)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
systemd="$repo/deploy/systemd"

die() {
	echo "deploy/packaging/build.sh: $*" >&2
	exit 1
}

command -v go >/dev/null 2>&1 || die "go not found in PATH"
cd "$repo"
VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
GOARCH=${GOARCH:-$(go env GOARCH)}
# The package's default agent.conf (AGENT_CONF: another, for a test).
AGENT_CONF=${AGENT_CONF:-$systemd/agent.conf}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1)}
DEB_OUT=${DEB_OUT:-$repo/bin}

# Debian's version from git describe's: v0.3.0-5-gabc1234-dirty gives
# 0.3.0+git5.gabc1234.dirty; a bare commit (no tag yet) abc1234 gives
# 0~gitabc1234, which sorts before any release.
case "$VERSION" in
v[0-9]*.* | [0-9]*.*) debversion=$(echo "$VERSION" | sed -e 's/^v//' -e 's/-/+git/' -e 's/-/./g') ;;
*) debversion="0~git$(echo "$VERSION" | tr -- - .)" ;;
esac

mkdir -p "$DEB_OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Static, reproducible: no build paths, no VCS stamp.
CGO_ENABLED=0 GOOS=linux GOARCH=$GOARCH go build -trimpath -buildvcs=false \
	-ldflags "-s -w -X main.version=$VERSION" -o "$work/lanyard" ./cmd/lanyard

cd "$here"
# go.sum is committed: no checksum look-ups. mkdeb runs for the host.
GOARCH= GOFLAGS="-mod=readonly" go run . \
	-binary "$work/lanyard" -version "$debversion" -arch "$GOARCH" \
	-unit "$systemd/lanyard.service" -config "$AGENT_CONF" \
	-sysusers "$systemd/sysusers.d/lanyard.conf" -tmpfiles "$systemd/tmpfiles.d/lanyard.conf" \
	-scripts "$here/scripts" -mtime "$SOURCE_DATE_EPOCH" -o "$DEB_OUT"
