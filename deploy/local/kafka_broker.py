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
address; progress goes to stderr. A second `start` on a running DIR only prints its address again. Ports
are picked free and bound by the JVM seconds later; if one was taken in between (the JVM exits with "Address
already in use"), `start` picks again, up to 3 times.
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

The jars live in $POPBRIDGE_KAFKA_LIBS or ~/.cache/popbridge/kafka-<version>/libs, fetched by mvn once and
then reused until pom.xml changes (broker_jars.py). This file holds the commands and the broker process;
beside it, broker_config.py writes server.properties and picks the ports, broker_probe.py asks the broker
whether it serves clients, broker_base.py holds BrokerError and the progress log.

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
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from broker_base import BrokerError, log
from broker_config import (
    BIND_TRIES,
    HOST,
    SCRAM_MECHANISM,
    Ports,
    lost_port_race,
    pick_ports,
    previous_ports,
    scram_credentials,
    secure_ports,
    server_properties,
)
from broker_jars import ensure_jars, libs_dir
from broker_probe import probe

BROKER_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"  # still Scala, in the kafka_2.13 jar, in 4.3.1
STOP_GRACE_SECONDS = 20.0
NOT_RUNNING = 3  # the LSB exit status of `status` for "program is not running"
LOG_FLAGS = (
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
    "-Dorg.slf4j.simpleLogger.log.kafka.server.KafkaRaftServer=info",  # keeps "Kafka Server started"
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
)


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
    names = [] if scram is None else ["SASL_PLAINTEXT"] + (["SASL_SSL"] if keystore is not None else [])
    super_user = scram[0] if acls and scram is not None else None
    for attempt in range(1, BIND_TRIES + 1):
        port, controller_port = pick_ports(ports, previous_ports(properties))
        secure = secure_ports(properties, names, [port, controller_port])
        properties.write_text(server_properties(data_dir, port, controller_port, secure, keystore,
                                                super_user=super_user))
        format_storage(java, libs, properties, data_dir, scram, more_users=more_users)
        process = launch(java_command(java, libs, heap, BROKER_MAIN, str(properties)), directory)
        (directory / "broker.pid").write_text(f"{process.pid}\n")
        bootstrap = f"{HOST}:{port}"
        (directory / "bootstrap").write_text(f"{bootstrap}\n")
        for name in ("SASL_PLAINTEXT", "SASL_SSL"):
            (directory / _secure_file(name)).unlink(missing_ok=True)
        try:
            _wait_for_child(process, directory, port, timeout)
        except BrokerError as exc:
            if attempt < BIND_TRIES and lost_port_race(exc.details):
                log(f"a port picked for the broker was taken before it bound it; picking again ({attempt})")
                continue
            raise
        break
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
