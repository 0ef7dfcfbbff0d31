#!/usr/bin/env python3
"""Run a throw-away single-node Apache Kafka broker from Maven Central jars, with the stdlib only.

    kafka_broker.py start  --dir DIR [--port P] [--controller-port C] [--heap 1g] [--timeout 90]
                           [--sasl-scram USER:PASSWORD [--tls-keystore PEM] [--scram-user USER:PASSWORD]...
                            [--acls]]
    kafka_broker.py stop   --dir DIR
    kafka_broker.py status --dir DIR
    kafka_broker.py fetch

`start` fetches the jars once, writes DIR/server.properties (combined broker+controller, static quorum,
127.0.0.1 only, limits sized for 50 MB mails), formats DIR/data, starts `kafka.Kafka` in its own session
(output in DIR/broker.log, PID in DIR/broker.pid, address in DIR/bootstrap) and returns once the broker
answers ApiVersions and lists itself in Metadata on its listener. The last line on stdout is the bootstrap
address; progress goes to stderr. A second `start` on a running DIR only prints its address again.
`fetch` only fills the jar cache (CI can warm it before the tests). Linux only: liveness is read in /proc.

`--sasl-scram USER:PASSWORD` adds a SASL_PLAINTEXT listener with SCRAM-SHA-512 on another free port of
127.0.0.1 (address in DIR/bootstrap_sasl); the user is created when DIR/data is formatted (a restart keeps
the users DIR was formatted with). With `--tls-keystore PEM` (a file holding the unencrypted PKCS#8 private
key and the certificate chain, e.g. for IP:127.0.0.1) a SASL_SSL listener with the same users is added too
(address in DIR/bootstrap_sasl_ssl). Inter-broker and controller traffic stay on PLAINTEXT. stdout then
lists `SASL_PLAINTEXT=host:port` (and `SASL_SSL=host:port`) before the last line, the PLAINTEXT address.
This is for tests: the password is on the StorageTool command line. `--scram-user` (repeatable) creates
more SCRAM users at format time. `--acls` enforces ACLs (StandardAuthorizer, no ACL means denied) with the
`--sasl-scram` user as the super user who creates them; the PLAINTEXT listeners (controller and
inter-broker traffic, and the plain client listener) stay unrestricted, as super user ANONYMOUS.

The jars live in $POPBRIDGE_KAFKA_LIBS or ~/.cache/popbridge/kafka-<version>/libs. mvn copies them there
once; the marker file .popbridge-complete (the pom's sha256 and the jar names) then means "complete", and
later starts neither download nor run mvn. Editing pom.xml invalidates the marker.

Errors are one line on stderr (plus the tail of broker.log when java failed) and exit 1; usage errors
exit 2; `status` exits 3 when no broker runs in DIR. Every expected failure is a BrokerError:

    BrokerError
     |-- a tool is missing        mvn (only when the cache is incomplete) or java not on PATH
     |-- the fetch failed         mvn's first [ERROR] line
     |-- a port is busy           a --port / --controller-port already bound on 127.0.0.1
     |-- java failed              storage format failed, or the broker exited before it was ready
     `-- the start timed out      not ready within --timeout seconds; the broker is killed
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

Ports: TypeAlias = tuple[int | None, int | None]  # (client port, controller port); None: not chosen
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
_SCRAM_PART = re.compile(r"[A-Za-z0-9._-]+")  # StorageTool's --add-scram syntax has no escapes
HOST = "127.0.0.1"
POM = Path(__file__).resolve().with_name("pom.xml")
MARKER = ".popbridge-complete"
COPY_DEPENDENCIES = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
BROKER_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"  # still Scala, in the kafka_2.13 jar, in 4.3.1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 50 MB mail plus headers and batch overhead
STOP_GRACE_SECONDS = 20.0
NOT_RUNNING = 3  # the LSB exit status of `status` for "program is not running"
LOG_FLAGS = (
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
    "-Dorg.slf4j.simpleLogger.log.kafka.server.KafkaRaftServer=info",  # keeps "Kafka Server started"
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
)


class BrokerError(Exception):
    """An expected failure: `message` is the one line for stderr, `details` optional context below it."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def log(message: str) -> None:
    print(f"kafka_broker: {message}", file=sys.stderr, flush=True)


# --- the jar cache ------------------------------------------------------------------------------------


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


# --- configuration ------------------------------------------------------------------------------------


def server_properties(data_dir: Path, port: int, controller_port: int,
                      secure: dict[str, int] | None = None, keystore: Path | None = None, *,
                      super_user: str | None = None) -> str:
    """`secure` maps extra listeners (SASL_PLAINTEXT, SASL_SSL) to their ports; SASL_SSL needs `keystore`."""
    secure = secure or {}
    client = [f"PLAINTEXT://{HOST}:{port}", *(f"{name}://{HOST}:{p}" for name, p in secure.items())]
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{controller_port}",  # static quorum: format needs no flag
        "listeners": ",".join([*client, f"CONTROLLER://{HOST}:{controller_port}"]),
        "advertised.listeners": ",".join(client),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(
            ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT", *(f"{name}:{name}" for name in secure)]
        ),
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",  # topics come from code, with their configs
        "offsets.topic.replication.factor": "1",  # the default 3 never works on one node
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.dedupe.buffer.size": "1048577",  # the default 128 MiB sits on the heap
        "num.network.threads": "2",  # two cores
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "message.max.bytes": str(MAX_MESSAGE_BYTES),
        "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
        "fetch.max.bytes": str(MAX_MESSAGE_BYTES),
    }
    if secure:
        settings["sasl.enabled.mechanisms"] = SCRAM_MECHANISM
    for name in secure:
        settings[f"listener.name.{name.lower()}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config"] = SCRAM_LOGIN
    if "SASL_SSL" in secure:
        if keystore is None:
            raise BrokerError("a SASL_SSL listener needs --tls-keystore")
        settings["listener.name.sasl_ssl.ssl.keystore.type"] = "PEM"
        settings["listener.name.sasl_ssl.ssl.keystore.location"] = str(keystore)
    if super_user is not None:
        settings["authorizer.class.name"] = AUTHORIZER
        settings["super.users"] = f"User:{super_user};User:ANONYMOUS"
        settings["allow.everyone.if.no.acl.found"] = "false"
    lines = [f"{key}={value}" for key, value in settings.items()]
    return "# Written by deploy/local/kafka_broker.py; rewritten on every start.\n" + "\n".join(lines) + "\n"


def scram_credentials(value: str) -> tuple[str, str]:
    """USER:PASSWORD for --sasl-scram; both made of letters, digits, '.', '_' and '-'."""
    user, _, password = value.partition(":")
    if not (_SCRAM_PART.fullmatch(user) and _SCRAM_PART.fullmatch(password)):
        raise argparse.ArgumentTypeError(
            "not USER:PASSWORD made of letters, digits, '.', '_' and '-' (the password is not shown)"
        )
    return user, password


def secure_ports(properties: Path, names: list[str], taken: list[int]) -> dict[str, int]:
    """A port for each extra listener: the previous one of DIR if still free, else any free port."""
    text = properties.read_text() if properties.is_file() else ""
    chosen: dict[str, int] = {}
    for name in names:
        match = re.search(rf"(?<![A-Z_]){name}://{re.escape(HOST)}:(\d+)", text)
        previous = int(match.group(1)) if match else None
        avoid = [*taken, *chosen.values()]
        if previous is not None and previous not in avoid and _is_free(previous):
            chosen[name] = previous
        else:
            chosen[name] = _free_port(avoid=avoid)
    return chosen


def wait_listening(port: int, timeout: float) -> None:
    """The extra listeners open with the broker; wait until one accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                message = f"listener {HOST}:{port} not accepting after {timeout:g} s: {exc}"
                raise BrokerError(message) from None
            time.sleep(0.2)


def previous_ports(properties: Path) -> Ports:
    """The ports of an earlier start in the same DIR, so a restart keeps its address when it can."""
    text = properties.read_text() if properties.is_file() else ""
    found = [re.search(rf"{name}://{re.escape(HOST)}:(\d+)", text) for name in ("PLAINTEXT", "CONTROLLER")]
    broker, controller = (int(match.group(1)) if match else None for match in found)
    return broker, controller


def pick_ports(wanted: Ports, before: Ports) -> tuple[int, int]:
    """A requested port must be free; otherwise the previous port if still free, else any free port."""
    if wanted[0] is not None and wanted[0] == wanted[1]:
        raise BrokerError(f"--port and --controller-port are both {wanted[0]}")
    chosen: list[int] = []
    for want, previous in zip(wanted, before, strict=True):
        if want is not None:
            if not _is_free(want):
                raise BrokerError(f"port {want} on {HOST} is busy")
            chosen.append(want)
        elif previous is not None and previous not in [*chosen, *wanted] and _is_free(previous):
            chosen.append(previous)
        else:
            chosen.append(_free_port(avoid=[*chosen, *(port for port in wanted if port is not None)]))
    return chosen[0], chosen[1]


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM does; TIME_WAIT is free
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(avoid: list[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            return port


# --- the Kafka protocol, just enough to know the broker serves clients ---------------------------------

_CLIENT_ID = b"popbridge-kafka-broker"
_API_METADATA = 3
_API_VERSIONS = 18


def probe(host: str, port: int, timeout: float = 2.0) -> str | None:
    """None when the broker answers ApiVersions and lists itself in Metadata; otherwise why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            versions = _api_versions(sock)
            low, high = versions.get(_API_METADATA, (1, 0))
            if not low <= 1 <= high:
                return f"broker serves no Metadata v1 (only v{low}-v{high})"
            brokers = _metadata_brokers(sock)
    except (OSError, ValueError, struct.error) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None if (host, port) in brokers else f"Metadata lists {sorted(brokers)}, not {host}:{port}"


def _exchange(sock: socket.socket, api_key: int, version: int, correlation: int, body: bytes) -> bytes:
    """Send one request with header v1 (non-flexible versions) and return the response body."""
    header = struct.pack(">hhih", api_key, version, correlation, len(_CLIENT_ID)) + _CLIENT_ID
    sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
    (size,) = struct.unpack(">i", _receive(sock, 4))
    response = _receive(sock, size)
    (echoed,) = struct.unpack_from(">i", response)
    if echoed != correlation:
        raise ValueError(f"correlation id {echoed} in the reply to request {correlation}")
    return response[4:]


def _receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return bytes(data)


def _api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    """ApiVersions v0: error_code int16, then [api_key int16, min int16, max int16]."""
    body = _exchange(sock, _API_VERSIONS, 0, 1, b"")
    error, count = struct.unpack_from(">hi", body)
    if error:
        raise ValueError(f"ApiVersions answered error code {error}")
    return {key: (low, high) for key, low, high in struct.iter_unpack(">hhh", body[6 : 6 + 6 * count])}


def _metadata_brokers(sock: socket.socket) -> set[tuple[str, int]]:
    """Metadata v1 for no topics: brokers [node_id int32, host string, port int32, rack nullable string]."""
    body = _exchange(sock, _API_METADATA, 1, 2, struct.pack(">i", 0))
    (count,) = struct.unpack_from(">i", body)
    offset, brokers = 4, set[tuple[str, int]]()
    for _ in range(count):
        _node_id, host_length = struct.unpack_from(">ih", body, offset)
        host = body[offset + 6 : offset + 6 + host_length].decode()
        port, rack_length = struct.unpack_from(">ih", body, offset + 6 + host_length)
        offset += 6 + host_length + 6 + max(rack_length, 0)
        brokers.add((host, port))
    return brokers


# --- the broker process -------------------------------------------------------------------------------


def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("java not found on PATH (Kafka 4 needs Java 17 or newer)")
    return java


def java_command(java: str, libs: Path, heap: str, main: str, *args: str) -> list[str]:
    return [java, f"-Xmx{heap}", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true", *LOG_FLAGS,
            "-cp", f"{libs}/*", main, *args]


def cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes in URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def format_storage(java: str, libs: Path, properties: Path, data_dir: Path,
                   scram: tuple[str, str] | None = None, *,
                   more_users: Sequence[tuple[str, str]] = ()) -> None:
    """Format a new data dir; a restart keeps the one it has (and the cluster id in its meta.properties).

    `scram` and `more_users` (user, password) become SCRAM-SHA-512 users in the new cluster's metadata."""
    if (data_dir / "meta.properties").is_file():
        return
    users = ([] if scram is None else [scram]) + list(more_users)
    extra = [argument for name, password in users
             for argument in ("--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]")]
    command = java_command(java, libs, "256m", STORAGE_TOOL, "format", "--ignore-formatted",
                           f"--cluster-id={cluster_id()}", "-c", str(properties), *extra)
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        for _, password in users:
            output = output.replace(password, "***")
        raise BrokerError(f"{STORAGE_TOOL} format failed (exit {result.returncode})", details=output)


def launch(command: list[str], directory: Path) -> subprocess.Popen[bytes]:
    """Start the broker detached: its own session, so it outlives this script and the terminal."""
    with (directory / "broker.log").open("wb") as output:
        return subprocess.Popen(command, cwd=directory, stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(port: int, exited: Callable[[], str | None], timeout: float) -> str | None:
    """None once the broker serves clients; otherwise why it never will (it exited, or time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        reason = exited()
        if reason is not None:
            return reason
        problem = probe(HOST, port)
        if problem is None:
            return None
        if time.monotonic() > deadline:
            return f"not ready after {timeout:g} s (last probe: {problem})"
        time.sleep(0.2)


def running_pid(directory: Path) -> int | None:
    """The PID in DIR/broker.pid if that process is alive and is the broker of DIR."""
    try:
        pid = int((directory / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_broker_of(pid, directory) else None


def _is_broker_of(pid: int, directory: Path) -> bool:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    properties = str(directory / "server.properties").encode()
    return state != "Z" and BROKER_MAIN.encode() in arguments and properties in arguments


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- the commands -------------------------------------------------------------------------------------


def start(directory: Path, ports: Ports, heap: str, timeout: float, *,
          scram: tuple[str, str] | None = None, keystore: Path | None = None,
          more_users: Sequence[tuple[str, str]] = (), acls: bool = False) -> str:
    """Start the broker of DIR (or find it running) and return its bootstrap address once it serves.

    With `scram`, also SASL_PLAINTEXT (and with `keystore` SASL_SSL) listeners, `more_users`, and with
    `acls` enforced ACLs: see the module doc."""
    directory.mkdir(parents=True, exist_ok=True)
    if keystore is not None and scram is None:
        raise BrokerError("--tls-keystore needs --sasl-scram (the TLS listener is SASL_SSL)")
    if (more_users or acls) and scram is None:
        raise BrokerError("--scram-user and --acls need --sasl-scram (the super user)")
    if keystore is not None and not keystore.is_file():
        raise BrokerError(f"--tls-keystore {keystore}: no such file")
    if running_pid(directory) is not None:
        return _already_running(directory, timeout)
    started = time.monotonic()
    java = find_java()
    libs = ensure_jars(libs_dir())
    properties, data_dir = directory / "server.properties", directory / "data"
    port, controller_port = pick_ports(ports, previous_ports(properties))
    names = [] if scram is None else ["SASL_PLAINTEXT"] + (["SASL_SSL"] if keystore is not None else [])
    secure = secure_ports(properties, names, [port, controller_port])
    super_user = scram[0] if acls and scram is not None else None
    properties.write_text(server_properties(data_dir, port, controller_port, secure, keystore,
                                            super_user=super_user))
    format_storage(java, libs, properties, data_dir, scram, more_users=more_users)
    process = launch(java_command(java, libs, heap, BROKER_MAIN, str(properties)), directory)
    (directory / "broker.pid").write_text(f"{process.pid}\n")
    bootstrap = f"{HOST}:{port}"
    (directory / "bootstrap").write_text(f"{bootstrap}\n")
    for name in ("SASL_PLAINTEXT", "SASL_SSL"):
        (directory / _secure_file(name)).unlink(missing_ok=True)
    _wait_for_child(process, directory, port, timeout)
    for name, secure_port in secure.items():
        wait_listening(secure_port, timeout)
        (directory / _secure_file(name)).write_text(f"{HOST}:{secure_port}\n")
        log(f"{name} listener ({SCRAM_MECHANISM}) at {HOST}:{secure_port}")
    log(f"broker ready at {bootstrap} in {time.monotonic() - started:.1f} s (pid {process.pid})")
    return bootstrap


def _secure_file(name: str) -> str:
    return {"SASL_PLAINTEXT": "bootstrap_sasl", "SASL_SSL": "bootstrap_sasl_ssl"}[name]


def secure_addresses(directory: Path) -> list[str]:
    """`NAME=host:port` of the extra listeners of DIR's broker, as `start` prints them."""
    found = []
    for name in ("SASL_PLAINTEXT", "SASL_SSL"):
        path = directory / _secure_file(name)
        if path.is_file():
            found.append(f"{name}={path.read_text().strip()}")
    return found


def _wait_for_child(process: subprocess.Popen[bytes], directory: Path, port: int, timeout: float) -> None:
    def exited() -> str | None:
        code = process.poll()
        return None if code is None else f"java exited with code {code} before the broker was ready"

    reason = wait_ready(port, exited, timeout)
    if reason is None:
        return
    if process.poll() is None:
        process.kill()
        process.wait()
    (directory / "broker.pid").unlink(missing_ok=True)
    log_file = directory / "broker.log"
    raise BrokerError(f"{reason}; last lines of {log_file}:", details=_tail(log_file))


def _already_running(directory: Path, timeout: float) -> str:
    bootstrap = (directory / "bootstrap").read_text().strip()
    log(f"already running in {directory} (pid {running_pid(directory)})")

    def exited() -> str | None:
        return None if running_pid(directory) is not None else "the broker stopped while starting"

    reason = wait_ready(int(bootstrap.rpartition(":")[2]), exited, timeout)
    if reason is not None:
        raise BrokerError(reason)
    return bootstrap


def stop(directory: Path, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM (Kafka shuts down cleanly), SIGKILL after `grace` seconds; always drops the PID file."""
    pid = running_pid(directory)
    if pid is None:
        log(f"no broker running in {directory}")
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _gone(pid, directory, grace):
            log(f"pid {pid} still running after {grace:g} s; sending SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _gone(pid, directory, 5.0)
        log(f"stopped the broker in {directory} (pid {pid})")
    (directory / "broker.pid").unlink(missing_ok=True)


def _gone(pid: int, directory: Path, within: float) -> bool:
    deadline = time.monotonic() + within
    while _is_broker_of(pid, directory):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def status(directory: Path) -> int:
    pid = running_pid(directory)
    if pid is None:
        log(f"no broker running in {directory}")
        return NOT_RUNNING
    print((directory / "bootstrap").read_text().strip())
    log(f"running in {directory} (pid {pid})")
    return 0


def _heap(value: str) -> str:
    if not re.fullmatch(r"\d+[kKmMgG]?", value):
        raise argparse.ArgumentTypeError(f"not a JVM heap size like 512m or 1g: {value!r}")
    return value


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kafka_broker.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="start the broker of DIR (no-op if running)")
    start_parser.add_argument("--port", type=int, help="client port (default: a free one)")
    start_parser.add_argument("--controller-port", type=int, help="KRaft port (default: a free one)")
    start_parser.add_argument("--heap", type=_heap, default="1g", help="JVM -Xmx (default: 1g)")
    start_parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait (default: 90)")
    start_parser.add_argument("--sasl-scram", type=scram_credentials, metavar="USER:PASSWORD",
                              help="add a SASL_PLAINTEXT listener with this SCRAM-SHA-512 user")
    start_parser.add_argument("--tls-keystore", type=Path, metavar="PEM",
                              help="with --sasl-scram: add a SASL_SSL listener with this key + cert chain")
    start_parser.add_argument("--scram-user", type=scram_credentials, metavar="USER:PASSWORD",
                              action="append", default=[],
                              help="with --sasl-scram: another SCRAM-SHA-512 user (repeatable)")
    start_parser.add_argument("--acls", action="store_true",
                              help="with --sasl-scram: enforce ACLs; the --sasl-scram user is the super user")
    stop_parser = commands.add_parser("stop", help="stop the broker of DIR")
    status_parser = commands.add_parser("status", help="exit 0 if the broker of DIR runs, 3 if not")
    for sub in (start_parser, stop_parser, status_parser):
        sub.add_argument("--dir", type=Path, required=True, help="holds the broker's config, data and log")
    commands.add_parser("fetch", help="fill the jar cache (no-op when complete) and print its path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        if arguments.command == "fetch":
            print(ensure_jars(libs_dir()))
            return 0
        directory: Path = arguments.dir.resolve()
        if arguments.command == "start":
            ports = (arguments.port, arguments.controller_port)
            keystore = arguments.tls_keystore.resolve() if arguments.tls_keystore else None
            bootstrap = start(directory, ports, arguments.heap, arguments.timeout,
                              scram=arguments.sasl_scram, keystore=keystore,
                              more_users=arguments.scram_user, acls=arguments.acls)
            for line in secure_addresses(directory):
                print(line)
            print(bootstrap)
        elif arguments.command == "stop":
            stop(directory)
        else:
            return status(directory)
    except BrokerError as error:
        log(f"error: {error}")
        if error.details:
            print(error.details.rstrip(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
