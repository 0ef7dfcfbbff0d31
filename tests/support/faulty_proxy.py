"""A fault-injecting TCP proxy on loopback: forwards bytes to a server and cuts connections on cue.

    async with FaultyProxy("127.0.0.1", dovecot.server.pop3_port) as proxy:
        proxy.faults.append(Fault(after_server_bytes=100_000))   # the next connection is cut mid-stream
        proxy.faults.append(Fault(before_client_line=b"QUIT"))   # the one after: cut instead of QUIT
        ... connect to proxy.port ...

Each accepted connection takes the next fault from `faults` (none left: it is forwarded faithfully).
A cut aborts both sides at once (a RST, as when a line drops), so the server sees no QUIT.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from services.demo.listener import HOST, Listener


@dataclass(frozen=True)
class Fault:
    """Where to cut one connection: after this many bytes from the server, or when the client starts
    a line with these bytes (that line is not forwarded)."""

    after_server_bytes: int | None = None
    before_client_line: bytes | None = None


@dataclass
class _Connection:
    fault: Fault | None
    server_bytes: int = 0
    client_buffer: bytes = b""
    cut: bool = False


@dataclass
class FaultyProxy:
    target_host: str
    target_port: int
    listen_host: str = HOST  # any 127.x.y.z works on Linux: a loopback name the certificate lacks
    faults: deque[Fault] = field(default_factory=deque)
    connections: int = 0
    cuts: int = 0
    port: int = 0
    _listener: Listener = field(default_factory=Listener)

    async def __aenter__(self) -> Self:
        self.port = await self._listener.open(self._accept, self.listen_host)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._listener.close()  # cancels each connection's task, which stops its two directions

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        state = _Connection(self.faults.popleft() if self.faults else None)
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        writers = (client_writer, server_writer)
        upstream = asyncio.create_task(self._client_to_server(client_reader, server_writer, state, writers))
        downstream = asyncio.create_task(self._server_to_client(server_reader, client_writer, state, writers))
        try:
            await asyncio.wait((upstream, downstream), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for writer in writers:
                writer.transport.abort()
            for task in (upstream, downstream):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task

    def _cut(self, state: _Connection, writers: tuple[asyncio.StreamWriter, ...]) -> None:
        state.cut = True
        self.cuts += 1
        for writer in writers:
            writer.transport.abort()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Connection,
        writers: tuple[asyncio.StreamWriter, ...],
    ) -> None:  # fmt: skip
        trigger = state.fault.before_client_line if state.fault else None
        while data := await reader.read(65536):
            if trigger is not None:
                lines = (state.client_buffer + data).split(b"\r\n")
                if any(line.upper().startswith(trigger) for line in lines):
                    self._cut(state, writers)
                    return
                state.client_buffer = lines[-1]
            writer.write(data)
            await writer.drain()

    async def _server_to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Connection,
        writers: tuple[asyncio.StreamWriter, ...],
    ) -> None:  # fmt: skip
        limit = state.fault.after_server_bytes if state.fault else None
        while data := await reader.read(65536):
            if limit is not None and state.server_bytes + len(data) >= limit:
                writer.write(data[: limit - state.server_bytes])
                self._cut(state, writers)
                return
            state.server_bytes += len(data)
            writer.write(data)
            await writer.drain()
