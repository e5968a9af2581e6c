# Lanyard's container image: the static lanyard binary and CA certificates,
# nothing else (no shell, no libc, no users).
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t ghcr.io/lanyard-dev/lanyard:dev .
#   podman build --build-arg VERSION=... -t ghcr.io/lanyard-dev/lanyard:dev .
#
# The Kubernetes manifests (deploy/kubernetes) run it as a DaemonSet; what
# the container needs and why is in docs/deploy-kubernetes.md.

# The Go of go.mod's `go` line, exactly: the official images build with
# GOTOOLCHAIN=local, so an older 1.26.x would refuse the module.
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# Modules first, so that a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# What `lanyard version` prints (main.version); "dev" when not given.
ARG VERSION=dev
# Set by BuildKit (and recent buildah) for the platform being built;
# empty means the builder's own.
ARG TARGETOS
ARG TARGETARCH
# Static (no cgo), and the same bytes for the same source and VERSION:
# no build paths, no VCS stamp (.git is not in the context).
RUN CGO_ENABLED=0 GOOS=${TARGETOS:-linux} GOARCH=${TARGETARCH} \
    go build -trimpath -buildvcs=false \
      -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/lanyard ./cmd/lanyard

FROM scratch
ARG VERSION=dev
LABEL org.opencontainers.image.title="lanyard" \
      org.opencontainers.image.description="SPIFFE Workload API node agent, a drop-in for spire-agent" \
      org.opencontainers.image.source="https://github.com/lanyard-dev/lanyard" \
      org.opencontainers.image.version="${VERSION}"
# For TLS to servers verified against the system's roots (the agent's own
# connections use the SPIRE trust bundle and the kubelet CA instead).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/lanyard /lanyard
# Root, on purpose: the agent creates its socket and data_dir in
# root-owned host directories and refuses directories another user owns.
# The DaemonSet drops every capability (docs/deploy-kubernetes.md).
USER 0:0
ENTRYPOINT ["/lanyard", "run"]
CMD ["-config", "/etc/lanyard/agent.conf"]
