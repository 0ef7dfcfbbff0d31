"""popbridge's POP3 client (services/fetcher/pop3.py) against a real Dovecot, and XOAUTH2 on loopback.

Dovecot checks XOAUTH2 tokens only against a real OAuth2 endpoint, so the XOAUTH2 journeys run
against a small protocol-level POP3 server in this file (`Xoauth2Server`, loopback only) that insists
on the exact two-step exchange Microsoft 365 documents.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.fetcher.pop3 import (
    Pop3AuthError,
    Pop3Client,
    Pop3Error,
    Pop3RetryLater,
    Pop3TlsError,
    TlsMode,
    tls_context,
)
from tests.support.dovecot import TLS_HOSTNAME, DovecotMailboxes, MailUser
from tests.support.mail import canonical_pop3_form

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def message(number: int, body_lines: int = 3) -> bytes:
    """A small message with a dot-leading body line, so every retrieval exercises unstuffing."""
    body = b"".join(b".line %d of message %d\r\n" % (i, number) for i in range(body_lines))
    return b"From: a@example.test\r\nTo: b@example.test\r\nSubject: message %d\r\n\r\n%s" % (number, body)


def big_message(size: int) -> bytes:
    """About `size` bytes: 76-column base64 lines, some dot-leading lines, some long 8-bit lines."""
    lines = [b"From: a@example.test", b"Subject: big", b"MIME-Version: 1.0", b""]
    block = base64.encodebytes(bytes(range(256)) * 64).split(b"\n")[:-1]
    while sum(len(line) + 2 for line in lines) < size:
        lines.extend(block)
        lines.extend([b".", b"..", b". dotted", "caf\u00e9 \u2713 ".encode() * 100])
    return b"".join(line + b"\r\n" for line in lines)


@pytest.fixture
def mailbox(dovecot: DovecotMailboxes) -> MailUser:
    return dovecot.new_user()


def connect(
    dovecot: DovecotMailboxes,
    tls: TlsMode = "none",
    *,
    hostname: str = TLS_HOSTNAME,
    pipelining: bool = True,
    ca_file: Path | None = None,
) -> Awaitable[Pop3Client]:
    server = dovecot.server
    port = server.pop3s_port if tls == "implicit" else server.pop3_port
    context = tls_context(str(ca_file or server.ca_file))
    return Pop3Client.connect(
        server.host, port, tls=tls, ssl_context=context, server_hostname=hostname,
        timeout=TIMEOUT, pipelining=pipelining,
    )  # fmt: skip


# --- Logging in ------------------------------------------------------------------------------------


async def test_user_and_pass_in_clear_text_read_the_mailbox(
    dovecot: DovecotMailboxes, mailbox: MailUser
) -> None:
    dovecot.deliver_many(mailbox, [message(1), message(2)])
    async with await connect(dovecot) as client:
        await client.login(mailbox.login, mailbox.password)
        assert not client.encrypted
        assert await client.stat() == (2, len(message(1)) + len(message(2)))
        assert await client.list() == {1: len(message(1)), 2: len(message(2))}
        assert len(set((await client.uidl()).values())) == 2
        assert await client.retr(2) == message(2)
        await client.quit()


async def test_pop3s_trusts_the_test_ca_for_localhost(dovecot: DovecotMailboxes, mailbox: MailUser) -> None:
    dovecot.deliver(mailbox, message(1))
    async with await connect(dovecot, "implicit") as client:
        assert client.encrypted
        await client.login(mailbox.login, mailbox.password)
        assert await client.retr(1) == message(1)
        await client.quit()


async def test_stls_upgrades_the_plain_port_and_reads_capabilities_again(
    dovecot: DovecotMailboxes, mailbox: MailUser
) -> None:
    dovecot.deliver(mailbox, message(1))
    async with await connect(dovecot, "starttls") as client:
        assert client.encrypted
        capabilities = await client.capabilities()
        assert not capabilities.stls  # the list from after the handshake: STLS is no longer offered
        assert capabilities.user
        await client.login(mailbox.login, mailbox.password)
        assert await client.retr(1) == message(1)
        await client.quit()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_a_certificate_for_another_name_is_refused(dovecot: DovecotMailboxes, tls: TlsMode) -> None:
    with pytest.raises(Pop3TlsError, match="TLS handshake") as caught:
        await connect(dovecot, tls, hostname="wrong.example")
    assert not caught.value.retriable


async def test_the_system_trust_store_does_not_trust_the_test_ca(dovecot: DovecotMailboxes) -> None:
    server = dovecot.server
    with pytest.raises(Pop3TlsError, match="certificate verify failed"):
        await Pop3Client.connect(
            server.host, server.pop3s_port, tls="implicit", ssl_context=tls_context(),
            server_hostname=TLS_HOSTNAME, timeout=TIMEOUT,
        )  # fmt: skip


async def test_apop_logs_in_with_the_greeting_timestamp(dovecot: DovecotMailboxes, mailbox: MailUser) -> None:
    dovecot.deliver(mailbox, message(1))
    async with await connect(dovecot) as client:
        assert "<" in client.greeting
        await client.apop(mailbox.login, mailbox.password)
        assert await client.stat() == (1, len(message(1)))
        await client.quit()


async def test_sasl_plain_logs_in(dovecot: DovecotMailboxes, mailbox: MailUser) -> None:
    async with await connect(dovecot, "starttls") as client:
        assert "PLAIN" in (await client.capabilities()).sasl
        await client.auth_plain(mailbox.login, mailbox.password)
        assert await client.stat() == (0, 0)
        await client.quit()


@pytest.mark.parametrize("method", ["login", "apop", "auth_plain"])
async def test_a_wrong_password_is_an_auth_error_that_never_shows_the_password(
    dovecot: DovecotMailboxes, mailbox: MailUser, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "Wr0ng-" + mailbox.password
    caplog.set_level(logging.DEBUG)
    async with await connect(dovecot) as client:
        with pytest.raises(Pop3AuthError) as caught:
            await getattr(client, method)(mailbox.login, wrong)
    error = caught.value
    assert not error.retriable
    assert error.code == "AUTH"
    shown = [str(error), repr(error), "".join(traceback.format_exception(error)), caplog.text]
    assert all(wrong not in text for text in shown)
    assert all(base64.b64encode(f"\0{mailbox.login}\0{wrong}".encode()).decode() not in t for t in shown)


async def test_a_second_session_on_a_locked_maildrop_is_told_to_retry_later(
    dovecot: DovecotMailboxes, mailbox: MailUser
) -> None:
    lock_pop3_sessions(dovecot, mailbox)
    async with await connect(dovecot) as first:
        await first.login(mailbox.login, mailbox.password)
        async with await connect(dovecot) as second:
            with pytest.raises(Pop3RetryLater) as caught:  # Dovecot answers after ~10 s of trying
                await second.login(mailbox.login, mailbox.password)
        await first.quit()
    assert caught.value.code == "IN-USE"
    assert caught.value.retriable
    assert caught.value.retry_after > 0


def lock_pop3_sessions(dovecot: DovecotMailboxes, user: MailUser) -> None:
    """Turn on Dovecot's pop3_lock_session for this user only (a userdb extra field).

    The session fixture leaves it at Dovecot's default (off, so no [IN-USE] ever); many ISPs lock.
    The passwd-file line the fixture wrote gets one extra field appended.
    """
    passwd = dovecot.maildir(user).parents[2] / "users" / user.login
    if not passwd.is_file():
        pytest.fail(f"the Dovecot fixture no longer keeps passwd-files at {passwd}: update this helper")
    line = passwd.read_text().rstrip("\n")
    passwd.write_text(f"{line}userdb_pop3_lock_session=yes\n")


# --- Retrieving ------------------------------------------------------------------------------------


async def test_pipelined_and_one_at_a_time_retrieval_of_200_messages_agree(
    dovecot: DovecotMailboxes, mailbox: MailUser
) -> None:
    messages = [message(n, body_lines=n % 7) for n in range(1, 201)]
    dovecot.deliver_many(mailbox, messages)
    results = {}
    for pipelining in (True, False):
        async with await connect(dovecot, pipelining=pipelining) as client:
            await client.login(mailbox.login, mailbox.password)
            results[pipelining] = [item async for item in client.retr_many(range(1, 201))]
            await client.quit()
    assert results[True] == results[False] == list(enumerate(messages, start=1))


async def test_a_5_mb_message_arrives_byte_exact(dovecot: DovecotMailboxes, mailbox: MailUser) -> None:
    raw = big_message(5 * 1024 * 1024)
    dovecot.deliver(mailbox, raw)
    async with await connect(dovecot, "implicit") as client:
        await client.login(mailbox.login, mailbox.password)
        assert await client.retr(1) == canonical_pop3_form(raw) == raw
        await client.quit()


async def test_stopping_retr_many_early_leaves_the_session_usable(
    dovecot: DovecotMailboxes, mailbox: MailUser
) -> None:
    dovecot.deliver_many(mailbox, [message(n) for n in range(1, 41)])
    async with await connect(dovecot) as client:
        await client.login(mailbox.login, mailbox.password)
        async for number, _ in client.retr_many(range(1, 41)):
            if number == 3:
                break  # up to 16 RETRs are still in flight
        assert await client.retr(40) == message(40)
        await client.quit()


async def test_each_message_can_be_deleted_while_retr_many_goes_on(
    dovecot: DovecotMailboxes, mailbox: MailUser
) -> None:
    messages = [message(n) for n in range(1, 41)]
    dovecot.deliver_many(mailbox, messages)
    retrieved = []
    async with await connect(dovecot) as client:
        await client.login(mailbox.login, mailbox.password)
        async for number, raw in client.retr_many(range(1, 41)):
            retrieved.append(raw)
            await client.dele(number)  # goes out behind the RETRs already in flight
        await client.quit()
    assert retrieved == messages
    assert dovecot.message_count(mailbox) == 0


# --- Deleting --------------------------------------------------------------------------------------


async def test_dele_then_quit_removes_the_messages(dovecot: DovecotMailboxes, mailbox: MailUser) -> None:
    dovecot.deliver_many(mailbox, [message(n) for n in range(1, 31)])
    async with await connect(dovecot) as client:
        await client.login(mailbox.login, mailbox.password)
        await client.dele(1)
        await client.dele_many(range(2, 30))
        await client.quit()
    assert dovecot.message_count(mailbox) == 1


async def test_dele_without_quit_keeps_the_message(dovecot: DovecotMailboxes, mailbox: MailUser) -> None:
    dovecot.deliver(mailbox, message(1))
    async with await connect(dovecot) as client:
        await client.login(mailbox.login, mailbox.password)
        await client.dele(1)
    # The connection dropped without QUIT: the server never entered the UPDATE state.
    async with await connect(dovecot) as client:
        await client.login(mailbox.login, mailbox.password)
        assert await client.retr(1) == message(1)
        await client.quit()
    assert dovecot.message_count(mailbox) == 1


async def test_a_dele_of_a_message_already_deleted_is_refused(
    dovecot: DovecotMailboxes, mailbox: MailUser
) -> None:
    dovecot.deliver_many(mailbox, [message(1), message(2)])
    async with await connect(dovecot) as client:
        await client.login(mailbox.login, mailbox.password)
        await client.dele(1)
        with pytest.raises(Pop3Error, match="DELE refused"):
            await client.dele_many([2, 1])
        assert await client.stat() == (0, 0)  # the refusal did not desynchronise the session
        await client.quit()
    assert dovecot.message_count(mailbox) == 0


# --- XOAUTH2 against a protocol-level server ----------------------------------------------------------


TOKEN = "eyJ0eXAiOiJKV1QiLCJub25jZSI6IkFRQUJBQUFBQUFCbmZpRy1tQTZOVGFlN0NkV1ZZVGdKIn0." + "x" * 1500
FAILURE_CHALLENGE = base64.b64encode(
    b'{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/POP.AccessAsUser.All"}'
)


@dataclass
class Xoauth2Server:
    """A POP3 server with one mailbox that speaks XOAUTH2 exactly as Microsoft 365 documents it.

    After `AUTH XOAUTH2` it sends `continuation` (M365: `+`; others `+ `) and expects the base64 blob
    alone on the next line. A wrong blob gets the failure challenge (base64 JSON); only an empty line
    in answer to that gets the final -ERR. Every line the client sent is kept in `received`.
    """

    user: str
    token: str
    continuation: bytes = b"+"
    received: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"+OK The Microsoft Exchange POP3 service is ready.\r\n")
            while line := await self._read(reader):
                if line == b"AUTH XOAUTH2\r\n":
                    await self._xoauth2(reader, writer)
                else:
                    writer.write(self._answer(line))
                await writer.drain()
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        line = await reader.readline()
        if line:
            self.received.append(line)
        return line

    def _answer(self, line: bytes) -> bytes:
        answers = {
            b"CAPA\r\n": b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n",
            b"STAT\r\n": b"+OK 0 0\r\n",
            b"QUIT\r\n": b"+OK Microsoft Exchange Server POP3 server signing off.\r\n",
        }
        return answers.get(line, b"-ERR Protocol error.\r\n")

    async def _xoauth2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.continuation + b"\r\n")
        if await self._read(reader) == self.blob() + b"\r\n":
            writer.write(b"+OK User successfully authenticated.\r\n")
            return
        writer.write(b"+ " + FAILURE_CHALLENGE + b"\r\n")
        if await self._read(reader) == b"\r\n":
            writer.write(b"-ERR Authentication failure: unknown user name or bad password.\r\n")
        else:
            writer.write(b"-ERR Protocol error.\r\n")

    def blob(self) -> bytes:
        return base64.b64encode(f"user={self.user}\x01auth=Bearer {self.token}\x01\x01".encode())


@asynccontextmanager
async def xoauth2_server(server: Xoauth2Server) -> AsyncIterator[Pop3Client]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with await Pop3Client.connect("127.0.0.1", port, tls="none", timeout=TIMEOUT) as client:
            yield client
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.mark.parametrize("continuation", [b"+", b"+ "])
async def test_xoauth2_sends_the_token_on_its_own_line_after_the_continuation(continuation: bytes) -> None:
    server = Xoauth2Server("shared@contoso.example", TOKEN, continuation)
    async with xoauth2_server(server) as client:
        await client.auth_xoauth2("shared@contoso.example", TOKEN)
        assert await client.stat() == (0, 0)
        await client.quit()
    assert server.received == [b"AUTH XOAUTH2\r\n", server.blob() + b"\r\n", b"STAT\r\n", b"QUIT\r\n"]


async def test_a_rejected_token_is_an_auth_error_that_never_shows_the_token() -> None:
    server = Xoauth2Server("user@contoso.example", "the-right-token")
    async with xoauth2_server(server) as client:
        with pytest.raises(Pop3AuthError, match="bad password") as caught:
            await client.auth_xoauth2("user@contoso.example", TOKEN)
        await client.quit()
    assert server.received[2] == b"\r\n"  # the empty answer to the failure challenge
    error = caught.value
    assert '"status":"401"' in str(error)
    blob = base64.b64encode(f"user=user@contoso.example\x01auth=Bearer {TOKEN}\x01\x01".encode()).decode()
    for text in (str(error), repr(error), "".join(traceback.format_exception(error))):
        assert TOKEN[-100:] not in text
        assert blob[-100:] not in text
