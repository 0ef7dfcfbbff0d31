#!/usr/bin/env bash
# Builds kube-apiserver from the Go module proxy into a cache, for the admission test
# (tests/deploy/test_apiserver_admission.py). k8s.io/kubernetes is not meant to be a dependency: its go.mod
# points the staging modules (k8s.io/api, k8s.io/apiserver, ...) at ./staging, which a module download does
# not have. A throwaway module requires it and replaces each staging module with its published v0.X.Y twin,
# the same source at the same tag. Idempotent: a cached binary of the wanted version is kept.
#   deploy/tools/build_kube_apiserver.sh [CACHE_DIR]     -> prints the binary's path
# Cold: ~15-25 min on 2 cores (the compile dominates); warm: instant. Needs Go >= the version k8s names.
set -euo pipefail
K8S_VERSION="${K8S_VERSION:-v1.37.2}"
CACHE="${1:-${POPBRIDGE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/popbridge}}/kube-apiserver-$K8S_VERSION"
BIN="$CACHE/kube-apiserver"
if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE/mod"
cd "$CACHE/mod"
staging_version="v0.${K8S_VERSION#v1.}"
go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
gomod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
{
  echo "module popbridge.local/kube-apiserver-build"
  grep -m1 '^go ' "$gomod"
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo "replace ("
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$gomod"
  echo ")"
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" >&2
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags=-s -o "$BIN.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
mv "$BIN.tmp" "$BIN"
echo "$BIN"
