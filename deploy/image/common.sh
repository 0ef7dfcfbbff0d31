# Sourced by the image scripts: one container store for buildah and podman, and a helpful exit when a tool
# is missing. The vfs driver and chroot isolation need no kernel overlay support and no user namespaces,
# which is what a build inside an unprivileged container (CI, a dev sandbox) has.
POPBRIDGE_IMAGE_CACHE="${POPBRIDGE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/popbridge-image}"
export POPBRIDGE_IMAGE_CACHE
if [[ -z "${CONTAINERS_STORAGE_CONF:-}" ]]; then
    mkdir -p "$POPBRIDGE_IMAGE_CACHE"
    CONTAINERS_STORAGE_CONF="$POPBRIDGE_IMAGE_CACHE/storage.conf"
    if [[ "$(id -u)" = 0 ]]; then
        graphroot=/var/lib/containers/storage runroot=/run/containers/storage
    else
        graphroot="${XDG_DATA_HOME:-$HOME/.local/share}/containers/storage"
        runroot="${XDG_RUNTIME_DIR:-/tmp/containers-$(id -u)}/containers"
    fi
    printf '[storage]\ndriver = "vfs"\ngraphroot = "%s"\nrunroot = "%s"\n' "$graphroot" "$runroot" \
        > "$CONTAINERS_STORAGE_CONF"
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
