#!/usr/bin/env bash
# Builds deploy/Dockerfile with buildah: no Docker engine, no daemon, no registry needed.
#   deploy/image/build.sh [TAG]          default tag: localhost/popbridge:<version in pyproject.toml>
# Prints the image id on the last line. The Python base is the Debian image deploy/image/base.sh makes with
# mmdebstrap, unless PYTHON_IMAGE names another (PYTHON_IMAGE=python:3.12-slim where a registry is reachable).
# Cached: the base image, the dependency layer (rebuilt only when requirements.lock changes) and pip's
# download cache (a cache mount); a rebuild after a code change redoes only the popbridge layer.
# Storage: vfs driver, chroot isolation (common.sh says why); the store is buildah's and podman's default
# (/var/lib/containers/storage as root), so `podman run localhost/popbridge:0.1.0` finds the image.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=deploy/image/common.sh
. "$here/common.sh"
cd "$here/../.."

version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
tag="${1:-localhost/popbridge:$version}"
python_image="${PYTHON_IMAGE:-$(bash "$here/base.sh")}"

# The inputs' digest is a label: a build whose inputs match the tagged image's is skipped, as the vfs store
# makes even an all-cached buildah run copy every layer (minutes on a busy machine). The inputs are what
# .dockerignore sends, plus the Dockerfile and the base image's id.
base_id="$(buildah inspect --type image --format '{{.FromImageID}}' "$python_image" 2>/dev/null || echo "$python_image")"
inputs="$({ echo "$base_id"; cat deploy/Dockerfile .dockerignore;
            find pyproject.toml README.md deploy/image/requirements.lock schemas services -type f \
                 -not -path '*/__pycache__/*' -not -name '*.py[cod]' -print0 | sort -z | xargs -0 sha256sum;
          } | sha256sum | cut -d' ' -f1)"
if [[ -z "${REBUILD_IMAGE:-}" ]] && [[ "$(buildah inspect --type image \
        --format '{{index .OCIv1.Config.Labels "io.popbridge.inputs"}}' \
        "$tag" 2>/dev/null)" == "$inputs" ]]; then
    echo "build.sh: $tag is up to date with its inputs ($inputs)" >&2
    buildah inspect --type image --format '{{.FromImageID}}' "$tag"
    exit 0
fi

# pip in the build trusts what the host's pip trusts: a proxy that re-signs TLS has its CA there.
ca_bundle="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
secret=()
[[ -s "$ca_bundle" ]] && secret=(--secret "id=pip_ca,src=$ca_bundle")

buildah bud --layers "${secret[@]}" --isolation "$BUILDAH_ISOLATION" \
    --build-arg "PYTHON_IMAGE=$python_image" --build-arg "POPBRIDGE_VERSION=$version" \
    --label "io.popbridge.inputs=$inputs" \
    -f deploy/Dockerfile -t "$tag" . >&2
buildah inspect --type image --format '{{.FromImageID}}' "$tag"
