#!/bin/sh
# Readies the real container engines the docker tests run against:
#   - Docker Engine (docker.io), Podman and containerd from Debian,
#     installed when missing (root only; apt never starts their services
#     here, and the tests start their own);
#   - the OCI image packer (tools/mkimage) and the test workload
#     (test/k8s/workload), built into a cache dir outside the repo.
# Prints the bin dir on its last line.
#
#   LANYARD_DOCKER_BIN  bin dir to use (default: next to the Go build cache)
#
# Without root the docker tests skip (outside CI), so nothing is installed;
# with CI=true a missing piece is an error.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

die() {
	echo "build.sh: $*" >&2
	exit 1
}

command -v go >/dev/null 2>&1 || die "go not found in PATH"

if [ -z "${LANYARD_DOCKER_BIN:-}" ]; then
	gocache=$(go env GOCACHE)
	case "$gocache" in
	"" | off) LANYARD_DOCKER_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/lanyard-docker" ;;
	*) LANYARD_DOCKER_BIN="$(dirname "$gocache")/lanyard-docker" ;;
	esac
fi
bin=$LANYARD_DOCKER_BIN

if [ "$(id -u)" != 0 ]; then
	[ "${CI:-}" = true ] && die "CI=true but not root: the container engines need root"
	echo "build.sh: not root, so the docker tests will skip; nothing installed or built" >&2
	echo "$bin"
	exit 0
fi

# The engines and what they run containers with, from Debian; apt does not
# start their services here (policy-rc.d), the tests start their own.
# Debian's docker CLI is /usr/bin/docker; another one earlier in PATH
# works as well against the engine.
need="dockerd docker podman containerd runc conmon"
for cmd in $need; do
	command -v "$cmd" >/dev/null 2>&1 && continue
	command -v apt-get >/dev/null 2>&1 || die "$cmd is missing, and there is no apt-get to install it"
	echo "build.sh: $cmd is missing: installing docker.io podman from Debian" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2 || die "apt-get update failed"
	apt-get install -y -qq --no-install-recommends docker.io podman containerd runc conmon >&2 ||
		die "apt-get install docker.io podman failed"
	break
done

mkdir -p "$bin"
# One build at a time per cache dir; the Go build cache makes a repeat
# build take a second or two.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$bin/.lock"
	flock 9
fi
tmp=$(mktemp -d "$bin/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(
	cd "$repo/tools/mkimage"
	CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -ldflags="-s -w" -o "$tmp/mkimage" .
) >&2
(
	cd "$repo"
	CGO_ENABLED=0 GOFLAGS="-buildvcs=false" go build -trimpath -ldflags="-s -w" -o "$tmp/workload" ./test/k8s/workload
) >&2
mv "$tmp/mkimage" "$bin/mkimage"
mv "$tmp/workload" "$bin/workload"
echo "$bin"
