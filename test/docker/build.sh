#!/bin/sh
# Readies the real container engines the docker tests run against:
#   - Docker Engine (docker.io), Podman and containerd from Debian,
#     installed when missing (root only; apt never starts their services
#     here, and the tests start their own);
#   - the OCI image packer (test/k8s/images) and the test workload
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

# Debian packages: the binary each one provides.
missing=""
for pair in docker.io:dockerd docker.io:docker podman:podman containerd:containerd runc:runc conmon:conmon; do
	pkg=${pair%%:*}
	cmd=${pair#*:}
	# Debian's docker CLI is /usr/bin/docker; another one earlier in PATH
	# works as well against the engine.
	if ! command -v "$cmd" >/dev/null 2>&1; then
		case " $missing " in
		*" $pkg "*) ;;
		*) missing="$missing $pkg" ;;
		esac
	fi
done
if [ -n "$missing" ]; then
	command -v apt-get >/dev/null 2>&1 || die "missing$missing and no apt-get to install them"
	echo "build.sh: installing$missing from Debian" >&2
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
	# shellcheck disable=SC2086 # one word per package
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2 ||
		die "apt-get install$missing failed"
fi

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
	cd "$repo/test/k8s/images"
	CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -ldflags="-s -w" -o "$tmp/ociimage" .
) >&2
(
	cd "$repo"
	CGO_ENABLED=0 GOFLAGS="-buildvcs=false" go build -trimpath -ldflags="-s -w" -o "$tmp/workload" ./test/k8s/workload
) >&2
mv "$tmp/ociimage" "$bin/ociimage"
mv "$tmp/workload" "$bin/workload"
echo "$bin"
