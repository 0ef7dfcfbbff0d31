# Sourced by the image scripts: one container store for buildah and podman, and a helpful exit when a tool
# is missing. The vfs driver and chroot isolation need no kernel overlay support and no user namespaces,
# which is what a build inside an unprivileged container (CI, a dev sandbox) has.
POPBRIDGE_IMAGE_CACHE="${POPBRIDGE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/popbridge-image}"
export POPBRIDGE_IMAGE_CACHE
if [[ -z "${CONTAINERS_STORAGE_CONF:-}" ]]; then
    mkdir -p "$POPBRIDGE_IMAGE_CACHE"
    CONTAINERS_STORAGE_CONF="$POPBRIDGE_IMAGE_CACHE/storage.conf"
    printf '[storage]\ndriver = "vfs"\n' > "$CONTAINERS_STORAGE_CONF"
    export CONTAINERS_STORAGE_CONF
fi
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

need() {  # need COMMAND DEBIAN_PACKAGE
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "error: $1 is not installed (Debian: apt-get install $2)" >&2
        exit 3
    fi
}
need buildah buildah
