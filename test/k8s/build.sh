#!/bin/sh
# Readies the real single-node Kubernetes the k8s tests run against:
#   - containerd, runc and etcd from Debian (installed when missing; root only);
#   - kubelet and kube-apiserver, then kube-controller-manager and
#     kube-scheduler (pinned in tools/go.mod), and the image writer
#     (tools/mkimage at the repo's root, its own module), built from the
#     Go module proxy into a cache dir outside the repo, only when missing
#     or stale.
# Prints the bin dir on its last line.
#
#   LANYARD_K8S_BIN  bin dir to use (default: next to the Go build cache)
#
# Without root the k8s tests skip (outside CI), so nothing is installed or
# built; with CI=true a missing piece is an error.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
tools="$here/tools"
mkimage="$here/../../tools/mkimage"

die() {
	echo "build.sh: $*" >&2
	exit 1
}

command -v go >/dev/null 2>&1 || die "go not found in PATH; install Go to build the Kubernetes test node"

version=$(awk '$1 == "k8s.io/kubernetes" { print $2 } $2 == "k8s.io/kubernetes" { print $3 }' "$tools/go.mod" | head -n 1)
[ -n "$version" ] || die "k8s.io/kubernetes not required in $tools/go.mod"
minor=$(echo "$version" | cut -d. -f2)

if [ -z "${LANYARD_K8S_BIN:-}" ]; then
	gocache=$(go env GOCACHE)
	case "$gocache" in
	"" | off)
		LANYARD_K8S_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/lanyard-k8s/$version"
		;;
	*)
		LANYARD_K8S_BIN="$(dirname "$gocache")/lanyard-k8s/$version"
		;;
	esac
fi
bin=$LANYARD_K8S_BIN

if [ "$(id -u)" != 0 ]; then
	[ "${CI:-}" = true ] && die "CI=true but not root: the Kubernetes test node needs root (kubelet, containerd)"
	echo "build.sh: not root, so the k8s tests will skip; nothing installed or built" >&2
	echo "$bin"
	exit 0
fi

# Debian packages: the binary each one provides.
missing=""
for pair in containerd:containerd containerd:ctr containerd:containerd-shim-runc-v2 runc:runc etcd-server:etcd; do
	pkg=${pair%%:*}
	cmd=${pair#*:}
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
	# apt never starts services here (policy-rc.d); the tests start their own.
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
		die "apt-get update failed"
	# shellcheck disable=SC2086 # one word per package
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2 ||
		die "apt-get install$missing failed"
fi

sha() {
	{ sha256sum 2>/dev/null || shasum -a 256; } | cut -d' ' -f1
}

# Everything that changes the output goes into a stamp: the pinned modules,
# the Go toolchain and the build recipe.
goid=$(go env GOVERSION GOOS GOARCH | tr '\n' ' ')
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
kube_recipe="CGO_ENABLED=0 go build -trimpath -ldflags=$kube_ldflags kubelet kube-apiserver"
kube_stamp="$({ cat "$tools/go.mod" "$tools/go.sum"; echo "$kube_recipe"; } | sha) $goid"
control_recipe="CGO_ENABLED=0 go build -trimpath -ldflags=$kube_ldflags kube-controller-manager kube-scheduler"
control_stamp="$({ cat "$tools/go.mod" "$tools/go.sum"; echo "$control_recipe"; } | sha) $goid"
images_recipe="CGO_ENABLED=0 go build -trimpath -ldflags=-s -w mkimage"
images_stamp="$({ cat "$mkimage/go.mod" "$mkimage/go.sum" "$mkimage"/*.go; echo "$images_recipe"; } | sha) $goid"

fresh() { # name stamp binaries...
	name=$1
	want=$2
	shift 2
	for b in "$@"; do
		[ -x "$bin/$b" ] || return 1
	done
	[ -f "$bin/.stamp-$name" ] && [ "$(cat "$bin/.stamp-$name")" = "$want" ]
}

all_fresh() {
	fresh kube "$kube_stamp" kubelet kube-apiserver &&
		fresh control "$control_stamp" kube-controller-manager kube-scheduler &&
		fresh images "$images_stamp" mkimage
}

if all_fresh; then
	echo "$bin"
	exit 0
fi

mkdir -p "$bin"
# One build at a time per cache dir; whoever waited reuses the result.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$bin/.lock"
	flock 9
	if all_fresh; then
		echo "$bin"
		exit 0
	fi
	# Holding the lock, any leftover build dir is from a killed run.
	rm -rf "$bin"/.build.*
fi

# Builds into a fresh dir, then renames each binary into place, so a reader
# never sees a half-written one.
tmp=$(mktemp -d "$bin/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

if ! fresh kube "$kube_stamp" kubelet kube-apiserver; then
	echo "build.sh: building kubelet and kube-apiserver $version into $bin (about 12 minutes the first time)..." >&2
	start=$(date +%s)
	(
		cd "$tools"
		# go.sum is committed, so no checksum look-ups are needed.
		CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
			go build -p=2 -trimpath -ldflags="$kube_ldflags" -o "$tmp/" \
			k8s.io/kubernetes/cmd/kubelet \
			k8s.io/kubernetes/cmd/kube-apiserver
	) >&2
	mv "$tmp/kubelet" "$bin/kubelet"
	mv "$tmp/kube-apiserver" "$bin/kube-apiserver"
	printf '%s\n' "$kube_stamp" >"$bin/.stamp-kube"
	echo "build.sh: built kubelet and kube-apiserver in $(($(date +%s) - start)) s" >&2
fi

# A step and stamp of their own: they share most packages with the two
# above, so this takes a minute or two once those are built.
if ! fresh control "$control_stamp" kube-controller-manager kube-scheduler; then
	echo "build.sh: building kube-controller-manager and kube-scheduler $version into $bin (about 2 minutes after the kubelet, 12 cold)..." >&2
	start=$(date +%s)
	(
		cd "$tools"
		CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
			go build -p=2 -trimpath -ldflags="$kube_ldflags" -o "$tmp/" \
			k8s.io/kubernetes/cmd/kube-controller-manager \
			k8s.io/kubernetes/cmd/kube-scheduler
	) >&2
	mv "$tmp/kube-controller-manager" "$bin/kube-controller-manager"
	mv "$tmp/kube-scheduler" "$bin/kube-scheduler"
	printf '%s\n' "$control_stamp" >"$bin/.stamp-control"
	echo "build.sh: built kube-controller-manager and kube-scheduler in $(($(date +%s) - start)) s" >&2
fi

if ! fresh images "$images_stamp" mkimage; then
	(
		cd "$mkimage"
		CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
			go build -trimpath -ldflags="-s -w" -o "$tmp/mkimage" .
	) >&2
	mv "$tmp/mkimage" "$bin/mkimage"
	printf '%s\n' "$images_stamp" >"$bin/.stamp-images"
fi

echo "$bin"
