"""A real Kubernetes API server on loopback for the admission test: etcd (Debian's etcd-server) and
kube-apiserver (deploy/tools/build_kube_apiserver.sh builds it from the Go module proxy into the tools cache).

No kubelet, no controllers: objects are stored and admitted, nothing runs. Requests are plain HTTPS with the
standard library; the server's anonymous user is allowed everything (--authorization-mode=AlwaysAllow), as
this tests admission (schemas, CRD validation, Pod Security), not RBAC.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.deploy.kube import tools_dir

K8S_VERSION = "v1.37.2"
START_DEADLINE = 180.0  # seconds for etcd and kube-apiserver to answer, on a busy 2-core machine
REQUEST_TIMEOUT = 60.0
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def apiserver_binary() -> Path:
    return tools_dir() / f"kube-apiserver-{K8S_VERSION}" / "kube-apiserver"


def missing() -> str | None:
    if shutil.which("etcd") is None:
        return "etcd is not installed (Debian: apt-get install etcd-server)"
    if not apiserver_binary().is_file():
        return (f"no kube-apiserver at {apiserver_binary()}: build it once with "
                "deploy/tools/build_kube_apiserver.sh (~20-60 min on 2 cores, then cached)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:2000]}")
        self.status = status


@dataclass
class ApiServer:
    url: str
    context: ssl.SSLContext
    # kind -> (path prefix of its group/version, plural, namespaced), from discovery
    _kinds: dict[tuple[str, str], tuple[str, bool]] = field(default_factory=dict)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[Any, list[str]]:
        """The decoded JSON answer and the Warning headers (Pod Security warns through them)."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=REQUEST_TIMEOUT) as answer:
                return json.loads(answer.read() or b"null"), answer.headers.get_all("Warning") or []
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode(errors="replace")) from None

    def ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/readyz", context=self.context, timeout=5) as answer:
            return bool(answer.status == 200)

    def resource_path(self, resource: Mapping[str, Any], namespace: str | None) -> str:
        api_version = str(resource["apiVersion"])
        key = (api_version, str(resource["kind"]))
        if key not in self._kinds:
            prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            listing, _ = self.request("GET", prefix)
            for entry in listing["resources"]:
                if "/" not in entry["name"]:
                    self._kinds[(api_version, entry["kind"])] = (f"{prefix}/{entry['name']}",
                                                                 bool(entry["namespaced"]))
        if key not in self._kinds:
            raise ApiError(404, f"{key[1]} ({key[0]}) is not served: no CRD installed for it")
        collection, namespaced = self._kinds[key]
        if namespaced:
            ns = resource["metadata"].get("namespace") or namespace
            base, plural = collection.rsplit("/", 1)
            collection = f"{base}/namespaces/{ns}/{plural}"
        return f"{collection}/{resource['metadata']['name']}"

    def apply(self, resource: Mapping[str, Any], namespace: str | None = None,
              dry_run: bool = False) -> tuple[Any, list[str]]:
        """Server-side apply (as `kubectl apply --server-side --force-conflicts`)."""
        query = "?fieldManager=popbridge-test&force=true" + ("&dryRun=All" if dry_run else "")
        return self.request("PATCH", self.resource_path(resource, namespace) + query,
                            json.dumps(resource).encode(), "application/apply-patch+yaml")

    def wait_established(self, crd_name: str, deadline: float) -> None:
        while True:
            crd, _ = self.request("GET", f"{CRDS}/{crd_name}")
            conditions = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
            if conditions.get("Established") == "True":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {crd_name} not Established: {conditions}")
            time.sleep(0.2)  # polling the server's own status: there is no event to await without a watch


def _wait_for(check: Any, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if check():
                return
        except (OSError, ApiError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready in {START_DEADLINE} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)  # a server coming up: nothing to await but its port answering


@contextmanager
def running_apiserver(directory: Path) -> Iterator[ApiServer]:
    etcd_client, etcd_peer, port = free_port(), free_port(), free_port()
    (directory / "certs").mkdir()
    subprocess.run(["openssl", "genrsa", "-out", str(directory / "sa.key"), "2048"], check=True,
                   capture_output=True)
    # The server refuses anonymous users with AlwaysAllow: the test authenticates with a client certificate.
    d = str(directory)
    for command in (
        f"openssl req -x509 -newkey rsa:2048 -nodes -keyout {d}/ca.key -out {d}/ca.crt -days 1 "
        "-subj /CN=test-ca",
        f"openssl req -newkey rsa:2048 -nodes -keyout {d}/client.key -out {d}/client.csr "
        "-subj /O=system:masters/CN=popbridge-test",
        f"openssl x509 -req -in {d}/client.csr -CA {d}/ca.crt -CAkey {d}/ca.key -CAcreateserial "
        f"-out {d}/client.crt -days 1",
    ):
        subprocess.run(command.split(), check=True, capture_output=True)
    etcd_log, api_log = directory / "etcd.log", directory / "apiserver.log"
    with etcd_log.open("wb") as elog, api_log.open("wb") as alog:
        etcd = subprocess.Popen(
            ["etcd", "--data-dir", str(directory / "etcd"), "--name", "popbridge-test",
             "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
             "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
             "--initial-cluster", f"popbridge-test=http://127.0.0.1:{etcd_peer}"],
            stdout=elog, stderr=subprocess.STDOUT)
        api: subprocess.Popen[bytes] | None = None
        try:
            _wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{etcd_client}/health", timeout=5)
                      .status == 200, "etcd", etcd, etcd_log)
            api = subprocess.Popen(
                [str(apiserver_binary()), f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                 "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
                 f"--cert-dir={directory / 'certs'}", "--authorization-mode=AlwaysAllow",
                 f"--client-ca-file={directory / 'ca.crt'}",
                 "--service-cluster-ip-range=10.96.0.0/16",
                 "--service-account-issuer=https://kubernetes.default.svc",
                 f"--service-account-key-file={directory / 'sa.key'}",
                 f"--service-account-signing-key-file={directory / 'sa.key'}",
                 # No endpoints to reconcile: nothing runs, and the advertised address is loopback.
                 "--endpoint-reconciler-type=none", "--enable-priority-and-fairness=false",
                 # Debian's etcd 3.4 lacks the progress notifications the watch cache needs for
                 # consistent reads ("Too large resource version"): reads go to etcd instead.
                 "--watch-cache=false"],
                stdout=alog, stderr=subprocess.STDOUT)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # its own self-signed serving certificate, on loopback
            context.load_cert_chain(directory / "client.crt", directory / "client.key")
            server = ApiServer(f"https://127.0.0.1:{port}", context)
            _wait_for(server.ready, "kube-apiserver", api, api_log)
            yield server
        finally:
            for process in (api, etcd):
                if process is not None:
                    process.terminate()
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
