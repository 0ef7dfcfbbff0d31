"""The popbridge image, built by deploy/image/build.sh and run with podman, for tests/deploy/test_image.py.

buildah and podman share one store (deploy/image/common.sh writes its storage.conf: the vfs driver, which
needs no kernel overlay support). Missing tools skip the tests, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
    absent = [tool for tool in ("buildah", "podman", "mmdebstrap") if shutil.which(tool) is None]
    if not absent:
        return None
    return f"{', '.join(absent)} not installed (Debian: apt-get install buildah podman mmdebstrap)"


@dataclass(frozen=True)
class Image:
    id: str

    def inspect(self) -> dict[str, object]:
        out = subprocess.run(["podman", "image", "inspect", self.id], env=container_environ(),
                             capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT).stdout
        inspected: list[dict[str, object]] = json.loads(out)
        return inspected[0]

    def run(
        self,
        *args: str,
        entrypoint: str | None = None,
        environ: Mapping[str, str] = {},  # noqa: B006 - read only
        mounts: Sequence[tuple[Path, str]] = (),
        read_only: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`podman run` as the Deployments run it: host network (the test servers are on loopback), the
        image's own user, a read-only root with emptyDir-like tmpfs on the writable paths, `mounts`
        (host path, container path) bound read-only. Never raises for the command's exit code."""
        command = ["podman", "run", "--rm", "--network=host", "--cgroups=disabled"]
        if read_only:
            command.append("--read-only")
        for path in WRITABLE:
            command.append(f"--tmpfs={path}:rw,mode=1777" if path == "/tmp" else
                           f"--tmpfs={path}:rw,mode=0750,uid={UID},gid={UID}")
        command += [f"--volume={host}:{inside}:ro" for host, inside in mounts]
        command += [f"--env={key}={value}" for key, value in environ.items()]
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
