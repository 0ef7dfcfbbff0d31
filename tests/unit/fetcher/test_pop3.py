"""The asyncio POP3 client (services/fetcher/pop3.py) against small scripted servers on loopback.

Dovecot journeys are in tests/integration/test_pop3_dovecot.py; these cover what a well-behaved
Dovecot never does: silence, dropped connections, garbage, missing STLS, echoed secrets.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from services.fetcher.pop3 import (
    Pop3AuthError,
    Pop3Client,
    Pop3CommandError,
    Pop3Error,
    Pop3PermanentError,
    Pop3ProtocolError,
    Pop3RetryLater,
    Pop3TemporaryError,
    Pop3TlsError,
    TlsMode,
    tls_context,
)
from services.fetcher.pop3_errors import IN_USE_RETRY_AFTER, LOGIN_DELAY_RETRY_AFTER, error_for_reply
from services.fetcher.pop3_protocol import Reply

GREETING = b"+OK ready <1.2@test>\r\n"
CAPA = b"+OK\r\nUSER\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"
Respond = Callable[[bytes], bytes | None]  # a command line -> the reply bytes, None to say nothing


@dataclass
class ScriptedServer:
    """Answers each command line with `respond(line)`; records what it received."""

    respond: Respond
    greeting: bytes = GREETING
    received: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.greeting)
            while line := await reader.readline():
                self.received.append(line)
                answer = self.respond(line)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def listening(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def client_of(
    server: ScriptedServer,
    *,
    tls: TlsMode = "none",
    timeout: float = 5.0,
    pipelining: bool = True,
) -> AsyncIterator[Pop3Client]:
    async with listening(server.handle) as port:
        client = await Pop3Client.connect(
            "127.0.0.1", port, tls=tls, timeout=timeout, pipelining=pipelining, window=4
        )
        async with client:
            yield client


def answers(table: dict[bytes, bytes]) -> Respond:
    return lambda line: table.get(line.split(b" ")[0].strip(), b"-ERR unknown command\r\n")


# --- What an -ERR means ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error_type", "retriable"),
    [
        ("[IN-USE] locked", Pop3RetryLater, True),
        ("[LOGIN-DELAY] wait", Pop3RetryLater, True),
        ("[SYS/TEMP] disk full", Pop3TemporaryError, True),
        ("[SYS/PERM] mailbox disabled", Pop3PermanentError, False),
        ("[AUTH] bad password", Pop3AuthError, False),
        ("no such message", Pop3CommandError, False),
        ("[X-VENDOR] something", Pop3CommandError, False),
    ],
)
def test_an_err_reply_becomes_the_error_for_what_to_do_next(
    text: str, error_type: type[Pop3Error], retriable: bool
) -> None:
    error = error_for_reply(Reply("RETR", False, text))
    assert type(error) is error_type
    assert error.retriable is retriable
    assert str(error) == f"pop3 RETR refused: -ERR {text}"


def test_an_err_without_code_to_a_login_command_is_an_auth_error() -> None:
    assert type(error_for_reply(Reply("PASS", False, "invalid"), unknown=Pop3AuthError)) is Pop3AuthError


def test_retry_later_suggests_a_delay() -> None:
    in_use = error_for_reply(Reply("PASS", False, "[IN-USE] locked"))
    delayed = error_for_reply(Reply("PASS", False, "[LOGIN-DELAY] wait"), login_delay=900)
    unknown_delay = error_for_reply(Reply("PASS", False, "[LOGIN-DELAY] wait"))
    assert isinstance(in_use, Pop3RetryLater)
    assert isinstance(delayed, Pop3RetryLater)
    assert isinstance(unknown_delay, Pop3RetryLater)
    assert (in_use.retry_after, delayed.retry_after) == (IN_USE_RETRY_AFTER, 900.0)
    assert unknown_delay.retry_after == LOGIN_DELAY_RETRY_AFTER


def test_a_redacted_error_keeps_its_type_and_attributes() -> None:
    reply = "[IN-USE] s3cret"
    error = Pop3RetryLater(f"pop3 PASS refused: -ERR {reply}", server_reply=reply, retry_after=5)
    clean = error.redacted(["s3cret"])
    assert (type(clean), clean.retry_after, clean.code) == (Pop3RetryLater, 5, "IN-USE")
    assert "s3cret" not in str(clean) + repr(clean) + str(clean.server_reply)


# --- TLS settings ---------------------------------------------------------------------------------


def test_the_tls_context_verifies_by_default_and_refuses_old_versions() -> None:
    context = tls_context()
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


def test_verification_is_off_only_when_asked() -> None:
    context = tls_context(verify=False)
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2


async def test_starttls_fails_closed_when_the_server_offers_no_stls() -> None:
    server = ScriptedServer(answers({b"CAPA": CAPA}))
    with pytest.raises(Pop3TlsError, match="does not offer it") as caught:
        async with client_of(server, tls="starttls"):
            pass
    assert not caught.value.retriable
    assert server.received == [b"CAPA\r\n"]  # no credentials, nothing else in clear text


async def test_starttls_fails_closed_when_stls_is_refused() -> None:
    capa = CAPA.replace(b".\r\n", b"STLS\r\n.\r\n")
    server = ScriptedServer(answers({b"CAPA": capa, b"STLS": b"-ERR TLS not available\r\n"}))
    with pytest.raises(Pop3TlsError, match="STLS refused"):
        async with client_of(server, tls="starttls"):
            pass


async def test_plaintext_injected_after_the_stls_reply_is_refused() -> None:
    capa = CAPA.replace(b".\r\n", b"STLS\r\n.\r\n")
    server = ScriptedServer(answers({b"CAPA": capa, b"STLS": b"+OK Begin TLS\r\n+OK injected\r\n"}))
    with pytest.raises(Pop3ProtocolError, match="after its STLS reply"):
        async with client_of(server, tls="starttls"):
            pass


# --- Failures of the connection -------------------------------------------------------------------


async def test_a_silent_server_times_out_as_a_temporary_error() -> None:
    server = ScriptedServer(lambda line: b"" if line == b"STAT\r\n" else b"+OK\r\n")
    async with client_of(server, timeout=0.3) as client:
        with pytest.raises(Pop3TemporaryError, match=r"no progress within 0\.3 s") as caught:
            await client.stat()
        assert caught.value.retriable
        with pytest.raises(Pop3TemporaryError):
            await client.noop()  # the session is out of step and stays failed


async def test_a_connection_dropped_in_the_middle_of_a_message_is_a_temporary_error() -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        await reader.readline()
        writer.write(b"+OK 100 octets\r\nSubject: cut\r\n")
        writer.close()

    async with listening(cut_short) as port, await Pop3Client.connect("127.0.0.1", port, tls="none") as c:
        with pytest.raises(Pop3TemporaryError, match="closed the connection") as caught:
            await c.retr(1)
    assert caught.value.retriable


async def test_a_misspelt_tls_mode_is_refused_rather_than_sent_in_clear_text() -> None:
    with pytest.raises(ValueError, match="startls"):
        await Pop3Client.connect("127.0.0.1", 9, tls="startls")  # type: ignore[arg-type] # the point


async def test_a_refused_connection_is_a_temporary_error() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with pytest.raises(Pop3TemporaryError, match="cannot connect") as caught:
        await Pop3Client.connect("127.0.0.1", port, tls="none", timeout=5)
    assert caught.value.retriable


async def test_a_server_that_is_not_pop3_is_a_protocol_error() -> None:
    server = ScriptedServer(answers({}), greeting=b"220 smtp.example ESMTP\r\n")
    with pytest.raises(Pop3ProtocolError, match="not \\+OK or -ERR"):
        async with client_of(server):
            pass


async def test_a_busy_server_greeting_with_err_is_temporary() -> None:
    server = ScriptedServer(answers({}), greeting=b"-ERR [SYS/TEMP] too many connections\r\n")
    with pytest.raises(Pop3TemporaryError, match="too many connections"):
        async with client_of(server):
            pass


# --- Secrets ----------------------------------------------------------------------------------------


async def test_a_server_echoing_the_password_does_not_put_it_in_the_error() -> None:
    def echo(line: bytes) -> bytes:
        if line.startswith(b"PASS"):
            return b"-ERR bad password " + line.strip() + b"\r\n"
        return b"+OK\r\n"

    password = "hunter2-secret"  # a variable, so the traceback's source lines do not quote it
    async with client_of(ScriptedServer(echo)) as client:
        with pytest.raises(Pop3AuthError) as caught:
            await client.login("tim", password)
    error = caught.value
    assert "<redacted>" in str(error)
    shown = [str(error), repr(error), str(error.server_reply), "".join(traceback.format_exception(error))]
    assert all(password not in text for text in shown)


async def test_login_delay_uses_the_advertised_seconds() -> None:
    capa = CAPA.replace(b".\r\n", b"LOGIN-DELAY 900\r\n.\r\n")
    table = {b"CAPA": capa, b"USER": b"+OK\r\n", b"PASS": b"-ERR [LOGIN-DELAY] wait 15 minutes\r\n"}
    async with client_of(ScriptedServer(answers(table))) as client:
        await client.capabilities()
        with pytest.raises(Pop3RetryLater) as caught:
            await client.login("tim", "pw")
    assert caught.value.retry_after == 900


# --- Pipelining -------------------------------------------------------------------------------------


FLUSH = b"FLUSH\r\n"


@dataclass
class WindowWatcher:
    """Holds RETR replies back until 4 RETRs are outstanding or none came for 0.1 s."""

    capa: bytes
    most_outstanding: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        outstanding: list[bytes] = []
        try:
            while line := await self._next_line(reader, wait=not outstanding):
                if line.startswith(b"RETR "):
                    outstanding.append(line)
                    if len(outstanding) < 4:
                        continue
                writer.write(self._flush(outstanding) + self._answer(line))
                outstanding = []
        finally:
            writer.close()

    async def _next_line(self, reader: asyncio.StreamReader, *, wait: bool) -> bytes:
        try:
            return await asyncio.wait_for(reader.readline(), None if wait else 0.1)
        except TimeoutError:
            return FLUSH

    def _flush(self, outstanding: list[bytes]) -> bytes:
        self.most_outstanding = max(self.most_outstanding, len(outstanding))
        return b"".join(b"+OK\r\n" + line[5:] + b".\r\n" for line in outstanding)

    def _answer(self, line: bytes) -> bytes:
        if line.startswith(b"RETR ") or line == FLUSH:
            return b""
        return self.capa if line == b"CAPA\r\n" else b"+OK\r\n"


@pytest.mark.parametrize(
    ("capa", "pipelining", "expected"),
    [
        (CAPA, True, 4),  # the client's window
        (CAPA, False, 1),  # switched off by the caller
        (CAPA.replace(b"PIPELINING\r\n", b""), True, 1),  # not offered
    ],
)
async def test_retr_many_keeps_a_window_of_commands_in_flight_only_when_allowed(
    capa: bytes, pipelining: bool, expected: int
) -> None:
    watcher = WindowWatcher(capa)
    async with listening(watcher.handle) as port:
        client = await Pop3Client.connect("127.0.0.1", port, tls="none", pipelining=pipelining, window=4)
        async with client:
            got = [item async for item in client.retr_many(range(1, 11))]
            await client.quit()
    assert got == [(n, b"%d\r\n" % n) for n in range(1, 11)]
    assert watcher.most_outstanding == expected


async def test_a_pipelined_batch_goes_out_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = WindowWatcher(CAPA)
    writes: list[bytes] = []
    async with listening(watcher.handle) as port:
        client = await Pop3Client.connect("127.0.0.1", port, tls="none", window=4)
        async with client:
            await client.capabilities()
            transport = client._channel.transport
            send = transport.write

            def counting_write(data: bytes) -> None:
                writes.append(bytes(data))
                send(data)

            monkeypatch.setattr(transport, "write", counting_write)
            assert len([item async for item in client.retr_many(range(1, 11))]) == 10
            await client.quit()
    assert writes[0] == b"RETR 1\r\nRETR 2\r\nRETR 3\r\nRETR 4\r\n"
    assert b"".join(writes[:-1]) == b"".join(b"RETR %d\r\n" % n for n in range(1, 11))
    assert writes[-1] == b"QUIT\r\n"


async def test_commands_go_out_without_waiting_for_nagle() -> None:
    async with client_of(ScriptedServer(answers({}))) as client:
        sock = client._channel.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
