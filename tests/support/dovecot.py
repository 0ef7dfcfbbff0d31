"""A real Dovecot (POP3, POP3S, STLS, APOP, LMTP) on loopback ports, as pytest fixtures.

`dovecot_server` starts one Dovecot per test session: the project's one Dovecot helper and configuration
template (services.demo.dovecot, which `popbridge demo` runs too), here with a throwaway test CA for
POP3S/STLS and with LMTP; `dovecot` gives each test its own users, so tests never see each other's mail.
Who runs what (root or not) is explained there.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import re
import secrets
import shutil
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.demo.dovecot import Dovecot, dovecot_binary, new_root, write_private
from services.demo.dovecot_config import TlsFiles
from tests.support.parts import missing_part

TLS_HOSTNAME = "localhost"
INSTALL_HINT = "apt-get install dovecot-pop3d dovecot-lmtpd"


# --- TLS: a throwaway CA and a server certificate for localhost / 127.0.0.1 / ::1 -------------------


@dataclass(frozen=True, kw_only=True)
class ServerCertificates:
    """PEM files: the test CA (for clients to trust) and the server's certificate chain and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_server_certificates(directory: Path, hostname: str = TLS_HOSTNAME) -> ServerCertificates:
    """Write a fresh CA and a server certificate for `hostname`, 127.0.0.1 and ::1 into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key)
    server = _server_certificate(server_key, ca, ca_key, hostname)
    files = ServerCertificates(
        ca_file=directory / "ca.pem", cert_file=directory / "server.pem", key_file=directory / "server.key"
    )
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(files.key_file, key_pem)
    return files


def _certificate_builder(subject: str, issuer: x509.Name | None = None) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    public = key.public_key()
    return (
        _certificate_builder("popbridge test CA")
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hostname: str
) -> x509.Certificate:
    names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    return (
        _certificate_builder(hostname, issuer=ca.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --- The server -----------------------------------------------------------------------------------


class DovecotServer(Dovecot):
    """The tests' Dovecot under `root`: POP3, POP3S and STLS with a certificate from a throwaway CA, LMTP."""

    def __init__(self, root: Path, *, binary: str = "dovecot") -> None:
        self._certificates = make_server_certificates(root / "tls")
        tls = TlsFiles(cert_file=self._certificates.cert_file, key_file=self._certificates.key_file)
        super().__init__(root, binary=binary, tls=tls, lmtp=True, instance="popbridge-test")

    @property
    def ca_file(self) -> Path:
        """The test CA (PEM) that signed the server certificate for `localhost` and 127.0.0.1."""
        return self._certificates.ca_file

    def client_tls_context(self) -> ssl.SSLContext:
        """A default client context that trusts only the test CA (hostname `localhost`)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


# --- Fixtures -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MailUser:
    """A POP3 login on the test Dovecot."""

    login: str
    password: str


class DovecotMailboxes:
    """One test's users on the session's Dovecot: each `new_user()` is a login no other test has."""

    def __init__(self, server: DovecotServer, prefix: str) -> None:
        self.server = server
        self._prefix = prefix
        self._count = itertools.count(1)

    def new_user(self, name: str = "user", password: str | None = None) -> MailUser:
        user = MailUser(
            login=f"{self._prefix}-{name}{next(self._count)}", password=password or secrets.token_urlsafe(12)
        )
        self.server.add_user(user.login, user.password)
        return user

    def deliver(self, user: MailUser, raw: bytes) -> None:
        self.server.deliver(user.login, raw)

    def deliver_many(self, user: MailUser, messages: Iterable[bytes]) -> None:
        self.server.deliver_many(user.login, messages)

    def message_count(self, user: MailUser) -> int:
        return self.server.message_count(user.login)

    def maildir(self, user: MailUser) -> Path:
        return self.server.maildir(user.login)


def _dovecot_binary() -> str:
    found = dovecot_binary()
    if found is None:
        _dovecot_missing()
    return found


def _dovecot_missing() -> NoReturn:
    missing_part(f"the dovecot binary is not installed; run: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[DovecotServer]:
    """One real Dovecot for the whole session, stopped (with all its processes) at the end."""
    binary = _dovecot_binary()
    root = new_root("popbridge-dovecot-")  # 0755: the mail user (not us, when we are root) must reach it
    try:
        with DovecotServer(root, binary=binary) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


_test_counter = itertools.count(1)


@pytest.fixture
def dovecot(dovecot_server: DovecotServer, request: pytest.FixtureRequest) -> DovecotMailboxes:
    """The session's Dovecot, seen through users that belong to this test only."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24].strip("-") or "test"
    return DovecotMailboxes(dovecot_server, f"t{next(_test_counter)}-{slug}")
