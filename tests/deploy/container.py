"""The popbridge image, built by deploy/image/build.sh and run with podman, for tests/deploy/test_image.py.

buildah and podman share one store (deploy/image/common.sh writes its storage.conf: the vfs driver, which
needs no kernel overlay support). Missing tools skip the tests, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.deploy.kube import tool_missing

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "image" / "build.sh"
# Cold: the mmdebstrap base and every wheel; warm: the cached layers. Bounds, not expectations.
BUILD_TIMEOUT = 1800
RUN_TIMEOUT = 180
UID = 10001
# The two writable mounts the Deployments give the container (deploy/k8s/base/*.yaml): emptyDirs.
WRITABLE = ("/tmp", "/var/lib/popbridge")
CONFIG_DIR = "/etc/popbridge"
# runc with cgroupfs: crun (podman's default) refuses the hybrid cgroup v1 + v2 hierarchy of sandboxed
# machines such as CI's, and runc cannot run with --cgroups=disabled. The ulimits stay below the host's:
# rootful podman otherwise raises them to 1048576, which a machine without CAP_SYS_RESOURCE refuses.
PODMAN_GLOBAL = ("--runtime=runc", "--cgroup-manager=cgroupfs") if shutil.which("runc") else ()
LIMITS = ("--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096")


def image_cache() -> Path:
    """Where the build scripts keep their cache and storage.conf (same rule as deploy/image/common.sh)."""
    explicit = os.environ.get("POPBRIDGE_IMAGE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "popbridge-image"


def container_environ() -> dict[str, str]:
    environ = dict(os.environ)
    environ.setdefault("CONTAINERS_STORAGE_CONF", str(image_cache() / "storage.conf"))
    return environ


def missing_tools() -> str | None:
    absent = [tool for tool in ("buildah", "podman", "mmdebstrap", "runc") if shutil.which(tool) is None]
    if not absent:
        return None
    return f"{', '.join(absent)} not installed (Debian: apt-get install buildah podman mmdebstrap runc)"


@dataclass(frozen=True)
class Image:
    id: str

    def inspect(self) -> dict[str, object]:
        out = subprocess.run(["podman", *PODMAN_GLOBAL, "image", "inspect", self.id], env=container_environ(),
                             capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT).stdout
        inspected: list[dict[str, object]] = json.loads(out)
        return inspected[0]

    def run(
        self,
        *args: str,
        entrypoint: str | None = None,
        environ: Mapping[str, str] | None = None,
        mounts: Sequence[tuple[Path, str]] = (),
        read_only: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory(prefix="popbridge-emptydir-") as data_dir:
            os.chmod(data_dir, 0o777)
            return self._run(args, entrypoint, environ, mounts, read_only, Path(data_dir))

    def _run(
        self, args: Sequence[str], entrypoint: str | None, environ: Mapping[str, str] | None,
        mounts: Sequence[tuple[Path, str]], read_only: bool, data_dir: Path,
    ) -> subprocess.CompletedProcess[str]:
        """`podman run` as the Deployments run it: host network (the test servers are on loopback), the
        image's own user, a read-only root with emptyDir-like tmpfs on the writable paths, `mounts`
        (host path, container path) bound read-only. Never raises for the command's exit code."""
        command = ["podman", *PODMAN_GLOBAL, "run", "--rm", "--network=host", *LIMITS]
        if read_only:
            command.append("--read-only")
        # A Kubernetes emptyDir is a world-writable (0777) directory. /tmp is a tmpfs; the data directory is
        # a host directory, since podman 4.3 gives a tmpfs over an image directory that directory's mode
        # and root as owner whatever `mode=` says.
        command += ["--tmpfs=/tmp:rw,mode=1777", f"--volume={data_dir}:/var/lib/popbridge:rw"]
        command += [f"--volume={host}:{inside}:ro" for host, inside in mounts]
        command += [f"--env={key}={value}" for key, value in (environ or {}).items()]
        if entrypoint is not None:
            command.append(f"--entrypoint={entrypoint}")
        command += [self.id, *args]
        return subprocess.run(command, env=container_environ(), capture_output=True, text=True,
                              check=False, timeout=RUN_TIMEOUT)


def build_image() -> Image:
    """Build (or find cached) the image with the project's one build command; fail with its log's tail."""
    reason = missing_tools()
    if reason is not None:
        tool_missing(reason)
    result = subprocess.run(["bash", str(BUILD)], env=container_environ(), capture_output=True, text=True,
                            check=False, timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        raise AssertionError(f"deploy/image/build.sh exited {result.returncode}:\n{result.stderr[-4000:]}")
    return Image(result.stdout.split()[-1])
