"""A real OAuth2/OIDC authorization server on loopback and a Dovecot that checks XOAUTH2 tokens with it.

The server is NAV's `no.nav.security:mock-oauth2-server` (Maven Central), fetched with the project's
pom below by Maven (cached in ~/.m2, so a second fetch is offline) and run with the installed Java 17.
It signs real JWTs and answers RFC 7662 introspection; Dovecot's own `oauth2` passdb asks that endpoint
about every XOAUTH2 token, so a login is checked by Dovecot, not by us.

It issues refresh tokens through the authorization code grant (`refresh_token_for`, with its login
page switched off), refuses a refresh token it did not issue or that was revoked (RFC 7009, `revoke`)
with `invalid_grant`, as Microsoft and Google do. What it does not do (checked against 6.0.2): the device
authorization grant (RFC 8628) and refresh token rotation; those are tested against authlib with
httpx.MockTransport in tests/unit/runtime/test_oauth2_tokens.py, not here.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Self

import pytest

from services.demo.dovecot import new_root
from tests.support.dovecot import DovecotServer, _dovecot_binary
from tests.support.smtp import SmtpSink

VERSION = "6.0.2"
MAIN = "no.nav.security.mock.oauth2.StandaloneMockOAuth2ServerKt"
ISSUER = "default"
START_TIMEOUT = 60.0
MAVEN_CACHE = Path.home() / ".cache" / "popbridge" / "mock-oauth2-server" / "maven"  # shared by sessions
# Each test's client: its tokens carry `sub` = client_id, the Dovecot login of that test's mailbox.
CLIENTS = tuple(f"cloud-{number}" for number in range(1, 9))
REDIRECT_URI = "http://127.0.0.1/callback"
_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>popbridge.test</groupId><artifactId>oauth2-server</artifactId><version>1</version>
<dependencies><dependency><groupId>no.nav.security</groupId><artifactId>mock-oauth2-server</artifactId>
<version>{VERSION}</version></dependency></dependencies></project>
"""


def classpath(work: Path) -> str:
    """The server's classpath, resolved by Maven from Central (cached in ~/.m2 after the first time).

    `work` is shared by every test session on the machine (pytest-xdist workers, other checkouts): one at a
    time writes the pom and reads the classpath back, under an exclusive lock on `work/lock`."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        (work / "pom.xml").write_text(_POM)
        output = work / "classpath.txt"
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(work / "pom.xml"), "dependency:build-classpath",
             f"-Dmdep.outputFile={output}"],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"mvn could not fetch mock-oauth2-server {VERSION}:\n{result.stdout[-2000:]}")
        return output.read_text().strip()


class AuthorizationServer:
    """mock-oauth2-server on a free loopback port; a token for one of CLIENTS has `sub` = client_id (the
    request's `client_id` form field, so clients authenticate with client_secret_post)."""

    def __init__(self, work: Path, maven: Path) -> None:
        """`work` holds this server's log (one per session); `maven` is the shared classpath cache."""
        self._work = work
        self._maven = maven
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ISSUER}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    def __enter__(self) -> Self:
        # The port is picked free and bound by the JVM seconds later; if something took it in between (another
        # session's pick, an outgoing connection's ephemeral port), pick again, as Dovecot and the broker do.
        path = classpath(self._maven)  # resolved once: mvn takes seconds, a second pick needs none of it
        for _ in range(3):
            if self._launch(path):
                return self
            if "Address already in use" not in self._log_tail():
                break
        tail = self._log_tail()
        raise RuntimeError(f"mock-oauth2-server did not answer:\n{tail}")

    def _log_tail(self) -> str:
        return (self._work / "server.log").read_text(errors="replace")[-2000:]

    def _pick_port(self) -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        return port

    def _launch(self, path: str) -> bool:
        self.port = self._pick_port()
        config = {"interactiveLogin": False, "tokenCallbacks": [{
            "issuerId": ISSUER, "tokenExpiry": 3600,
            # Dovecot's introspection check wants token_type Bearer, which this server copies from the claims.
            "requestMappings": [
                {"requestParam": "client_id", "match": client,
                 "claims": {"sub": client, "scope": "pop", "token_type": "Bearer"}} for client in CLIENTS
            ],
        }]}  # fmt: skip
        env = {**os.environ, "SERVER_PORT": str(self.port), "SERVER_HOSTNAME": "127.0.0.1",
               "JSON_CONFIG": json.dumps(config)}
        log = (self._work / "server.log").open("ab")
        self._process = subprocess.Popen(
            ["java", "-Xmx256m", "-cp", path, MAIN],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        return self._answering()

    def refresh_token_for(self, client_id: str, secret: str) -> str:
        """A refresh token the server issued, through the authorization code grant (what a person's
        sign-in leaves behind; this server has no device grant)."""
        query = urllib.parse.urlencode({"client_id": client_id, "response_type": "code", "state": "s",
                                        "redirect_uri": REDIRECT_URI, "scope": "openid offline_access pop"})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", f"/{ISSUER}/authorize?{query}")
            location = connection.getresponse().getheader("Location") or ""
        finally:
            connection.close()
        code = urllib.parse.parse_qs(urllib.parse.urlparse(location).query)["code"][0]
        token = self._post("token", {"grant_type": "authorization_code", "code": code,
                                     "redirect_uri": REDIRECT_URI, "client_id": client_id,
                                     "client_secret": secret})
        return str(token["refresh_token"])

    def revoke(self, token: str, client_id: str, secret: str) -> None:
        """Revoke a refresh token (RFC 7009), as a password reset or an admin would."""
        self._post("revoke", {"token": token, "token_type_hint": "refresh_token", "client_id": client_id,
                              "client_secret": secret})

    def _post(self, endpoint: str, form: dict[str, str]) -> dict[str, object]:
        data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(f"{self.issuer}/{endpoint}", data=data)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        document = json.loads(body) if body.strip() else {}
        return document if isinstance(document, dict) else {}

    def _answering(self) -> bool:
        """True once the server answers; False (and the process stopped) if it exited or never answered."""
        deadline = time.monotonic() + START_TIMEOUT
        url = f"{self.issuer}/.well-known/openid-configuration"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        return False

    def __exit__(self, *_: object) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


_OAUTH2_PASSDB = """\
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = ${oauth2_conf}
}
passdb {
  driver = passwd-file"""


_SUBMISSION = """
submission_relay_host = 127.0.0.1
submission_relay_port = ${relay_port}
submission_relay_trusted = yes
service submission-login {
  inet_listener submission {
    address = 127.0.0.1
    port = ${submission_port}
  }
}
"""


class OAuth2Dovecot(DovecotServer):
    """The tests' Dovecot with an `oauth2` passdb (XOAUTH2, OAUTHBEARER) that introspects every token at
    the authorization server (RFC 7662, `introspection_mode = post`) and accepts it only when the server
    says `active` and its `sub` is the login name. POP3 and SMTP submission (RFC 6409) both log in
    through it; submission relays what it accepts to `relay` (an aiosmtpd sink)."""

    def __init__(self, root: Path, *, binary: str, introspection_url: str, relay: SmtpSink) -> None:
        super().__init__(root, binary=binary)
        self.relay = relay
        self.submission_port = 0
        conf = root / "dovecot-oauth2.conf.ext"
        conf.write_text(f"introspection_mode = post\nintrospection_url = {introspection_url}\n"
                        "username_attribute = sub\nactive_attribute = active\nactive_value = true\n")
        self._oauth2_conf = conf

    def _launch(self, config: Path) -> bool:
        text = config.read_text()
        if "driver = oauth2" not in text:
            anchor = "passdb {\n  driver = passwd-file"
            if anchor not in text or "auth_mechanisms = plain login apop\n" not in text:
                raise RuntimeError("the Dovecot template changed: update OAuth2Dovecot")
            text = text.replace(anchor, _OAUTH2_PASSDB.replace("${oauth2_conf}", str(self._oauth2_conf)))
            text = text.replace("auth_mechanisms = plain login apop\n",
                                "auth_mechanisms = plain login apop xoauth2 oauthbearer\n")
            text = text.replace("protocols = pop3 lmtp\n", "protocols = pop3 lmtp submission\n")
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.submission_port = probe.getsockname()[1]
            text += Template(_SUBMISSION).substitute(relay_port=self.relay.port,
                                                     submission_port=self.submission_port)
            config.write_text(text)
        return super()._launch(config)


@pytest.fixture(scope="session")
def authorization_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthorizationServer]:
    if shutil.which("java") is None or shutil.which("mvn") is None:
        message = "java and mvn are needed for mock-oauth2-server (apt-get install openjdk-17-jre maven)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with AuthorizationServer(tmp_path_factory.mktemp("oauth2-server"), MAVEN_CACHE) as server:
        yield server


@pytest.fixture(scope="session")
def oauth2_dovecot(authorization_server: AuthorizationServer) -> Iterator[OAuth2Dovecot]:
    root = new_root("popbridge-dovecot-oauth2-")
    relay = SmtpSink()
    relay.start()
    # Dovecot authenticates itself to the introspection endpoint as the client "dovecot".
    url = authorization_server.issuer.replace("http://", "http://dovecot:dovecot-secret@") + "/introspect"
    try:
        with OAuth2Dovecot(root, binary=_dovecot_binary(), introspection_url=url, relay=relay) as server:
            yield server
    finally:
        relay.stop()
        shutil.rmtree(root, ignore_errors=True)
