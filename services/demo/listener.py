"""A TCP server on a free loopback port that ends its sessions when it closes.

The demo's POP3 and SMTP servers are built on it, and so are the tests' misbehaving servers
(tests/support/hostile_pop3.py, faulty_proxy.py): one place for start, the port it got, and a close that
leaves no session task behind (a task left running would hold its socket past the end of a test).

    listener = Listener()
    port = await listener.open(handle_session)   # handle_session(reader, writer)
    ...
    await listener.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Listener:
    """The server and its running sessions (one task each)."""

    server: asyncio.Server | None = None
    sessions: set[asyncio.Task[Any]] = field(default_factory=set)

    async def open(self, handler: Handler, host: str = HOST, **options: Any) -> int:
        """Serve `handler` on a free port of `host` (`options` go to asyncio.start_server); the port."""

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.sessions.add(task)
            try:
                await handler(reader, writer)
            finally:
                self.sessions.discard(task)

        self.server = await asyncio.start_server(session, host, 0, **options)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, cancel every session still running and wait for them to end."""
        if self.server is None:
            return
        self.server.close()
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)
        await self.server.wait_closed()
