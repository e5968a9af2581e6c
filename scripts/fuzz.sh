#!/usr/bin/env bash
# Runs every Go fuzz target in the module for a short budget ($1, default
# 50000x executions per target; a duration such as 30s works too).
#
# The default is a count, not a duration: with a duration, Go 1.26's fuzz
# coordinator can fail a target with a bare "context deadline exceeded" when
# the -fuzztime deadline fires while a starved worker is mid-exec
# (go.dev/issue/75804, fixed in Go 1.27). A count has no deadline to race;
# -timeout still bounds each target.
# `go test -fuzz` takes one target at a time, so list them first.
set -euo pipefail
budget=${1:-50000x}
cd "$(dirname "$0")/.."
found=0
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
    found=$((found + 1))
    echo "fuzz: $pkg $target for $budget"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$budget" -timeout 5m "$pkg"
  done
done
echo "fuzz: ran $found targets"
