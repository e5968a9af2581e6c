#!/bin/sh
# Builds the real spire-server and spire-agent (pinned in tools/go.mod) into a
# cache dir outside the repo, only when missing or stale. Prints the bin dir
# on its last line.
#
#   LANYARD_SPIRE_BIN  bin dir to use (default: next to the Go build cache)
#
# Needs Go and a C compiler: SPIRE's sqlite datastore is cgo-only.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
tools="$here/tools"

command -v go >/dev/null 2>&1 || {
	echo "build.sh: go not found in PATH; install Go to build the SPIRE test peer" >&2
	exit 1
}

version=$(awk '$1 == "github.com/spiffe/spire" { print $2 } $2 == "github.com/spiffe/spire" { print $3 }' "$tools/go.mod" | head -n 1)
[ -n "$version" ] || {
	echo "build.sh: github.com/spiffe/spire not required in $tools/go.mod" >&2
	exit 1
}

if [ -z "${LANYARD_SPIRE_BIN:-}" ]; then
	gocache=$(go env GOCACHE)
	case "$gocache" in
	"" | off)
		LANYARD_SPIRE_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/lanyard-spire/$version"
		;;
	*)
		LANYARD_SPIRE_BIN="$(dirname "$gocache")/lanyard-spire/$version"
		;;
	esac
fi
bin=$LANYARD_SPIRE_BIN

# Everything that changes the output goes into the stamp: the pinned modules,
# the Go toolchain and the build recipe.
ldflags="-s -w"
recipe="go build -trimpath -ldflags=$ldflags spire-server spire-agent"
stamp=$({ cat "$tools/go.mod" "$tools/go.sum"; echo "$recipe"; } | { sha256sum 2>/dev/null || shasum -a 256; } | cut -d' ' -f1)
stamp="$stamp $(go env GOVERSION GOOS GOARCH | tr '\n' ' ')"

fresh() {
	[ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ] &&
		[ -f "$bin/.stamp" ] && [ "$(cat "$bin/.stamp")" = "$stamp" ]
}

if fresh; then
	echo "$bin"
	exit 0
fi

if [ "$(go env CGO_ENABLED)" != "1" ]; then
	echo "build.sh: cgo is disabled (no C compiler found or CGO_ENABLED=0); SPIRE's sqlite datastore needs it: install gcc (e.g. apt-get install gcc) and retry" >&2
	exit 1
fi

parent=$(dirname "$bin")
mkdir -p "$parent"
# One build at a time per cache dir; whoever waited reuses the result.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$parent/.lock"
	flock 9
	if fresh; then
		echo "$bin"
		exit 0
	fi
	# Holding the lock, any leftover build dir is from a killed run.
	rm -rf "$parent"/.build.*
fi
# Build into a fresh dir and swap it in, so a concurrent reader never sees a
# half-written binary.
tmp=$(mktemp -d "$parent/.build.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT

echo "build.sh: building SPIRE $version into $bin (cold builds take several minutes)" >&2
(
	cd "$tools"
	# go.sum is committed, so no checksum look-ups are needed; the one
	# module the checksum database does not serve is exempted in case a
	# look-up happens anyway.
	GOFLAGS="-mod=readonly -buildvcs=false" \
		GONOSUMDB="${GONOSUMDB:+$GONOSUMDB,}github.com/GoogleCloudPlatform/cloudsql-proxy" \
		go build -trimpath -ldflags="$ldflags" -o "$tmp/" \
		github.com/spiffe/spire/cmd/spire-server \
		github.com/spiffe/spire/cmd/spire-agent
) >&2
printf '%s\n' "$stamp" >"$tmp/.stamp"

rm -rf "$bin.old"
if [ -e "$bin" ]; then
	mv "$bin" "$bin.old"
fi
mv "$tmp" "$bin"
rm -rf "$bin.old"
trap - EXIT
echo "$bin"
