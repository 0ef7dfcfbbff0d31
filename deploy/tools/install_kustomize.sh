#!/usr/bin/env bash
# Install kustomize (pinned) into a per-user cache, from the Go module proxy; idempotent.
#
# Usage: deploy/tools/install_kustomize.sh        -> prints the path of the binary on stdout
# Needs: Go >= 1.26 on PATH (kustomize v5.8.2's go.mod says `go 1.26.0`) and access to the Go module proxy.
# Override: KUSTOMIZE_VERSION, POPBRIDGE_TOOLS_DIR (default ~/.cache/popbridge). The manifest tests find the
# binary through POPBRIDGE_KUSTOMIZE or at $POPBRIDGE_TOOLS_DIR/bin/kustomize.
set -euo pipefail

version="${KUSTOMIZE_VERSION:-v5.8.2}"
tools_dir="${POPBRIDGE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/popbridge}"
bin_dir="$tools_dir/bin"
binary="$bin_dir/kustomize"

installed_version() {
    # `kustomize version` prints e.g. "v5.8.2"; an empty result means "not installed or broken".
    "$binary" version 2>/dev/null | head -n 1 || true
}

if [[ -x "$binary" && "$(installed_version)" == "$version" ]]; then
    echo "$binary"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "install_kustomize.sh: Go is not on PATH; install Go >= 1.26 (https://go.dev/dl/ or apt golang-go)" >&2
    exit 1
fi

mkdir -p "$bin_dir"
echo "install_kustomize.sh: building kustomize $version with $(go version)" >&2
# Module downloads stay under the tools dir (GOMODCACHE); -modcacherw keeps them deletable with rm -rf.
GOBIN="$bin_dir" \
GOPATH="$tools_dir/go" \
GOMODCACHE="$tools_dir/go/pkg/mod" \
GOFLAGS="-modcacherw" \
CGO_ENABLED=0 \
    go install "sigs.k8s.io/kustomize/kustomize/v5@$version" >&2

if [[ "$(installed_version)" != "$version" ]]; then
    echo "install_kustomize.sh: $binary reports '$(installed_version)', expected $version" >&2
    exit 1
fi
echo "$binary"
