"""Does deploy/image/requirements.lock still answer pyproject.toml? Pure functions over the two texts.

The lock is written by deploy/image/lock.sh (uv pip compile --universal --generate-hashes). Editing the
dependencies in pyproject.toml without running it leaves the image on the old set: these checks name each
difference and the command that fixes it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

FIX = "run deploy/image/lock.sh"
# uv's line annotation: `name==1.2.3 ; marker \` then `    # via a, b, popbridge (pyproject.toml)`.
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")
_HASH = re.compile(r"^\s+--hash=sha256:[0-9a-f]{64}")
_DIRECT = "popbridge (pyproject.toml)"


@dataclass(frozen=True)
class Pin:
    version: Version
    hashes: int
    direct: bool  # the lock says pyproject.toml asked for it


def parse_lock(text: str) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    name: str | None = None
    version = Version("0")
    hashes = 0
    direct = False
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            if name is not None:
                pins[name] = Pin(version, hashes, direct)
            name, version = canonicalize_name(match["name"]), Version(match["version"])
            hashes, direct = 0, False
        elif _HASH.match(line):
            hashes += 1
        elif line.strip().startswith("# via") and _DIRECT in line:
            direct = True
    if name is not None:
        pins[name] = Pin(version, hashes, direct)
    return pins


def dependencies(pyproject: str) -> list[Requirement]:
    return [Requirement(spec) for spec in tomllib.loads(pyproject)["project"]["dependencies"]]


def lock_mismatches(pyproject: str, lock: str) -> list[str]:
    """Each way the lock fails pyproject.toml's runtime dependencies, one sentence each; [] when it holds."""
    pins = parse_lock(lock)
    wanted = dependencies(pyproject)
    problems: list[str] = []
    for requirement in wanted:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name} is in pyproject.toml but not in the lock")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement.name}: the lock pins {pin.version}, pyproject.toml wants "
                            f"{requirement.specifier}")
    wanted_names = {canonicalize_name(r.name) for r in wanted}
    problems += [f"{name} is locked as a direct dependency but pyproject.toml no longer names it"
                 for name, pin in sorted(pins.items()) if pin.direct and name not in wanted_names]
    problems += [f"{name}=={pin.version} has no --hash in the lock"
                 for name, pin in sorted(pins.items()) if pin.hashes == 0]
    return problems
