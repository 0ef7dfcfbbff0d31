#!/usr/bin/env bash
# Makes the Python base image locally, for machines that reach Debian's package mirror but no container
# registry: mmdebstrap lays a minimal Debian (the Essential set, no apt) with python3 into a tarball, and
# buildah imports it as a one-layer image. The Dockerfile takes it as PYTHON_IMAGE; with a registry the
# default python:3.12-slim is used instead and this script is not needed.
#   deploy/image/base.sh            -> prints the image name (localhost/popbridge-python:bookworm)
# Cached: an image already in the store is kept; REBUILD_BASE=1 makes it anew (e.g. for security updates).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=deploy/image/common.sh
. "$here/common.sh"

SUITE="${POPBRIDGE_BASE_SUITE:-bookworm}"
MIRROR="${POPBRIDGE_DEBIAN_MIRROR:-http://deb.debian.org}"
BASE_IMAGE="localhost/popbridge-python:$SUITE"
# python3-venv: the build stage makes the virtualenv (it brings pip's wheel); passwd: groupadd/useradd;
# ca-certificates: TLS to Kafka, POP3 and SMTP servers verifies against the system store.
PACKAGES="python3,python3-venv,passwd,ca-certificates"

if [[ -z "${REBUILD_BASE:-}" ]] && buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE"
    exit 0
fi
need mmdebstrap mmdebstrap

tarball="$POPBRIDGE_IMAGE_CACHE/base-$SUITE.tar"
mkdir -p "$POPBRIDGE_IMAGE_CACHE"
# Documentation, manual pages and translations are never read in a container: dpkg skips them (copyright
# files stay, as the licences ask).
debs="$POPBRIDGE_IMAGE_CACHE/debs-$SUITE"
mkdir -p "$debs"
# merged-usr: the /usr merge is laid by the hook, not by the usrmerge package, which would pull perl
# (46 MB) into the image. The downloaded .deb files are kept (the sync-in/sync-out hooks are mmdebstrap's documented cache
# recipe): a rebuild downloads only what changed.
mmdebstrap --variant=essential --include="$PACKAGES" --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $debs /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $debs" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$tarball.tmp" \
    "deb $MIRROR/debian $SUITE main" \
    "deb $MIRROR/debian $SUITE-updates main" \
    "deb $MIRROR/debian-security $SUITE-security main" >&2
mv "$tarball.tmp" "$tarball"

ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add "$ctr" "$tarball" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 \
    --label "org.opencontainers.image.description=Debian $SUITE (Essential set) with python3, made by mmdebstrap" \
    "$ctr"
buildah commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null
rm -f "$tarball"
echo "$BASE_IMAGE"
