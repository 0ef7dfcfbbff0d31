"""The one place the SMTP adapter relies on aiosmtplib's internals (services.deliverer.smtp.open_transport).

These fail loudly when an aiosmtplib upgrade changes what `open_transport` reads, before delivery does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from services.deliverer.smtp import AIOSMTPLIB_CHECKED, open_transport


def test_the_installed_aiosmtplib_is_a_release_the_handover_was_checked_against() -> None:
    release = ".".join(aiosmtplib.__version__.split(".")[:2])
    assert release in AIOSMTPLIB_CHECKED, (
        f"aiosmtplib {aiosmtplib.__version__} is installed; services/deliverer/smtp.py:open_transport "
        f"was checked against {AIOSMTPLIB_CHECKED}. Read aiosmtplib's SMTP.protocol and "
        "SMTPProtocol.transport in the new release, then add it to AIOSMTPLIB_CHECKED."
    )


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Just enough SMTP for aiosmtplib to connect and EHLO; then 250 to every line."""
    writer.write(b"220 seam.test ready\r\n")
    while line := await reader.readline():
        writer.write(b"250-seam.test\r\n250 PIPELINING\r\n" if line.startswith(b"EHLO") else b"250 ok\r\n")
    writer.close()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.heard = asyncio.Queue[bytes]()

    def data_received(self, data: bytes) -> None:
        self.heard.put_nowait(data)


async def test_the_open_connection_can_be_taken_over_from_aiosmtplib(port: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=False, start_tls=False, timeout=5)
    await client.connect()
    await client.ehlo()
    transport = open_transport(client)
    assert isinstance(transport, asyncio.Transport)
    recorder = _Recorder()
    transport.set_protocol(recorder)
    try:
        transport.write(b"NOOP\r\n")
        assert await asyncio.wait_for(recorder.heard.get(), 5) == b"250 ok\r\n"
    finally:
        transport.close()


async def test_a_closed_client_has_no_transport_to_take_over(port: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=False, start_tls=False, timeout=5)
    await client.connect()
    client.close()
    assert open_transport(client) is None
