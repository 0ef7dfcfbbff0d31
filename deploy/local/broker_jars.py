"""The Kafka jar cache of deploy/local/kafka_broker.py: Maven Central jars fetched once by mvn (pom.xml).

The jars live in $POPBRIDGE_KAFKA_LIBS or ~/.cache/popbridge/kafka-<version>/libs. mvn copies them there
once; the marker file .popbridge-complete (the pom's sha256 and the jar names) then means "complete", and
later starts neither download nor run mvn. Editing pom.xml invalidates the marker. A file lock keeps
concurrent starts from fetching twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from broker_base import BrokerError, log

POM = Path(__file__).resolve().with_name("pom.xml")
MARKER = ".popbridge-complete"
COPY_DEPENDENCIES = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"


def kafka_version(pom: Path = POM) -> str:
    match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if match is None:
        raise BrokerError(f"{pom} declares no <kafka.version> property")
    return match.group(1)


def libs_dir() -> Path:
    override = os.environ.get("POPBRIDGE_KAFKA_LIBS")
    if override:
        return Path(override).expanduser().resolve()
    return Path.home() / ".cache" / "popbridge" / f"kafka-{kafka_version()}" / "libs"


def cached_jars(libs: Path) -> list[str] | None:
    """The jar names of a complete cache for the current pom.xml, or None when mvn must fetch them."""
    marker = _read_marker(libs)
    if marker.get("pom_sha256") != hashlib.sha256(POM.read_bytes()).hexdigest():
        return None
    jars = _listed_jars(marker)
    return jars if jars and all((libs / name).is_file() for name in jars) else None


def ensure_jars(libs: Path) -> Path:
    """Fill `libs` unless it is complete; a lock keeps concurrent starts from fetching twice."""
    with _locked(libs.with_name(f"{libs.name}.lock")):
        jars = cached_jars(libs)
        if jars is None:
            _fetch(libs)
        else:
            log(f"jars cached in {libs} ({len(jars)} jars); mvn not run")
    return libs


def _listed_jars(marker: dict[str, object]) -> list[str]:
    jars = marker.get("jars")
    return [str(name) for name in jars] if isinstance(jars, list) else []


def _read_marker(libs: Path) -> dict[str, object]:
    try:
        marker = json.loads((libs / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _fetch(libs: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"mvn not found on PATH (needed once, to fetch the Kafka jars into {libs})")
    partial = libs.with_name(f"{libs.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"fetching Kafka {kafka_version()} jars with mvn into {libs}")
    started = time.monotonic()
    command = [mvn, "-q", "-B", "-f", str(POM), COPY_DEPENDENCIES, "-DincludeScope=runtime",
               f"-DoutputDirectory={partial}"]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    jars = sorted(path.name for path in partial.glob("*.jar"))
    if result.returncode != 0 or not jars:
        raise BrokerError(f"mvn could not fetch the Kafka jars (exit {result.returncode}): "
                          f"{_first_error(result.stdout + result.stderr)}")
    _install_jars(libs, partial, jars)
    log(f"fetched {len(jars)} jars in {time.monotonic() - started:.1f} s")


def _install_jars(libs: Path, partial: Path, jars: list[str]) -> None:
    """Swap the fetched jars in for the ones an older marker listed, then mark the cache complete."""
    libs.mkdir(parents=True, exist_ok=True)
    for stale in _listed_jars(_read_marker(libs)):
        (libs / stale).unlink(missing_ok=True)
    (libs / MARKER).unlink(missing_ok=True)
    for name in jars:
        os.replace(partial / name, libs / name)
    shutil.rmtree(partial, ignore_errors=True)
    marker = {"kafka_version": kafka_version(), "pom_sha256": hashlib.sha256(POM.read_bytes()).hexdigest(),
              "jars": jars}
    (libs / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("[ERROR]")]
    return (errors or lines or ["no output"])[0]
