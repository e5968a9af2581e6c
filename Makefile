# Lanyard: a SPIFFE Workload API node agent.
#   make run    the agent on its embedded CA, giving the current user an identity
#   make test   everything CI runs: lint, unit, end-to-end and interop tests, brief fuzzing
#   make image  the container image, no daemon needed: bin/lanyard-image.tar (docker load, ctr import)

GO          ?= go
BIN         := bin/lanyard
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME    ?= 50000x
# Go test packages of the main module.
PKGS        := ./...
# What `lanyard version` prints.
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# `make image`: the image the overlays in deploy/kubernetes deploy.
IMAGE       ?= ghcr.io/lanyard-dev/lanyard:dev
IMAGE_TAR   ?= bin/lanyard-image.tar
CA_CERTS    ?= /etc/ssl/certs/ca-certificates.crt

.PHONY: all build run test lint spire kube unit fuzz interop bench clean image

all: build

# Static and reproducible, as the Dockerfile builds it: the same commit
# gives the same bytes.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=false -ldflags "-s -w -X main.version=$(VERSION)" -o $(BIN) ./cmd/lanyard

# The Dockerfile's image without a daemon or a registry (tools/mkimage): the
# binary and the CA certificates, no shell, as a tarball for `docker load`
# or `ctr -n k8s.io images import`. Same commit, same digest.
image: build
	$(GO) build -C tools/mkimage -trimpath -o $(abspath bin/mkimage) .
	./bin/mkimage -o $(IMAGE_TAR) -tag $(IMAGE) \
	  -file /lanyard=$(BIN):0755 \
	  -file /etc/ssl/certs/ca-certificates.crt=$(CA_CERTS):0644 \
	  -user 0:0 -entrypoint '["/lanyard","run"]' -cmd '["-config","/etc/lanyard/agent.conf"]' \
	  -label org.opencontainers.image.title=lanyard \
	  -label 'org.opencontainers.image.description=SPIFFE Workload API node agent, a drop-in for spire-agent' \
	  -label org.opencontainers.image.source=https://github.com/lanyard-dev/lanyard \
	  -label org.opencontainers.image.version=$(VERSION)

# The example config grants spiffe://example.org/user/<uid> to the user
# running it; the socket is /tmp/lanyard/public/api.sock.
run: build
	LANYARD_UID=$$(id -u) ./$(BIN) run -config conf/examples/local.conf -expandEnv

test: lint spire kube unit fuzz

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)

# The real SPIRE server and agent, built once from the Go module proxy into
# a cache outside the repo (about 7 minutes cold on 2 cores, seconds warm).
spire:
	./test/spire/build.sh

# The real single-node Kubernetes of the k8s tests: containerd, runc and etcd
# from Debian; kubelet, kube-apiserver, kube-controller-manager and
# kube-scheduler built once from the Go module proxy into a cache outside the
# repo (about 15 minutes cold on 2 cores, a second warm). Needs root; without it the k8s tests skip (outside CI).
kube:
	./test/k8s/build.sh

unit:
	$(GO) test -race -timeout 15m $(PKGS)

# Each fuzz target runs briefly (FUZZTIME executions) from its committed seed corpus.
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

# Interop with a real SPIRE server and agent built from the Go module proxy.
interop: spire
	$(GO) test -race -count=1 -timeout 15m ./test/spire/... ./test/interop/...

# Lanyard against spire-agent and a floor server, side by side on this
# machine (test/bench; docs/performance.md), with a SPIRE-HA section on two
# spire-servers over PostgreSQL: about 13 minutes on 2 cores, bench-quick
# under 4. Table on stdout; JSON, table and SVG chart in results/.
.PHONY: bench-quick bench-micro
bench: build spire postgres
	$(GO) run ./test/bench/cmd/lanyard-bench -lanyard $(BIN) -out results

bench-quick: build spire postgres
	$(GO) run ./test/bench/cmd/lanyard-bench -quick -lanyard $(BIN) -out results

# Micro-benchmarks of the fetch path; compare runs with
# go run golang.org/x/perf/cmd/benchstat@latest old.txt new.txt
bench-micro:
	$(GO) test -run '^$$' -bench . -benchmem -count 6 ./attestor/ ./plugins/workloadattestor/unix/ ./agent/ ./workloadapi/ ./test/bench/

clean:
	rm -rf bin .data

# The generated Go code of Lanyard's own protos (proto/), committed: only
# a change to a .proto needs this. protoc from Debian's protobuf-compiler.
.PHONY: proto
proto:
	@echo "Regenerating proto/ (protoc, protoc-gen-go, protoc-gen-go-grpc)"
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1
	PATH="$$($(GO) env GOPATH)/bin:$$PATH" protoc -I proto --go_out=. --go_opt=module=github.com/lanyard-dev/lanyard \
		--go-grpc_out=. --go-grpc_opt=module=github.com/lanyard-dev/lanyard proto/lanyard/admin/v1/*.proto

# The Debian package bin/lanyard_<version>_<arch>.deb (deploy/packaging):
# the static binary stamped with VERSION (git describe), the unit, the
# sysusers.d and tmpfiles.d files and /etc/lanyard/agent.conf as a conffile.
# Built with nFPM as a Go library; the same commit gives the same bytes.
.PHONY: deb nspawn-root
deb:
	./deploy/packaging/build.sh

# The Debian root the systemd tests boot with systemd-nspawn (test/systemd),
# built once with debootstrap into a cache outside the repo (under a minute
# cold, instant warm); installs debootstrap and systemd-container from
# Debian when missing. Needs root; without it those tests skip (outside CI).
# Before the unit tests, which include test/systemd.
nspawn-root:
	./test/systemd/build.sh
unit: nspawn-root

# Docker Engine and Podman from Debian and the test images of the docker
# attestor's tests (test/docker): installed once, before the unit tests
# rather than inside their timeout.
.PHONY: engines
engines:
	./test/docker/build.sh
unit: engines

# deploy/packaging is a Go module of its own (nFPM stays out of go.mod), so
# ./... reaches neither its lint nor its tests.
lint: packaging-module
.PHONY: packaging-module
packaging-module:
	cd deploy/packaging && $(GO) vet . && $(GO) run $(STATICCHECK) . && $(GO) test -count=1 .

# deploy/monitoring/check is a Go module of its own too (Prometheus's PromQL
# parser stays out of go.mod): the alert rules and the dashboard parse and
# name only metrics Lanyard exposes.
lint: monitoring-module
.PHONY: monitoring-module
monitoring-module:
	cd deploy/monitoring/check && $(GO) vet . && $(GO) run $(STATICCHECK) . && $(GO) test -count=1 .

# nginx and HAProxy from Debian for the tests of apps that read their
# certificates from files (test/files), installed once before the unit
# tests. Needs root when missing; without it those tests skip (outside CI).
.PHONY: file-apps
file-apps:
	./scripts/install-debian.sh nginx-light:nginx haproxy:haproxy
unit: file-apps

# PostgreSQL from Debian for the test of several SPIRE Servers on one
# database (test/ha), installed once before the unit tests; the test starts
# its own private cluster. Needs root when missing; without it that test
# skips (outside CI). Debian keeps initdb off PATH: the package's
# pg_ctlcluster says whether it is there.
.PHONY: postgres
postgres:
	./scripts/install-debian.sh postgresql:pg_ctlcluster
unit: postgres
