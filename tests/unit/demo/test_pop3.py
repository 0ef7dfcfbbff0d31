"""services/demo/pop3.py: the demo's POP3 server, driven by popbridge's own POP3 client."""

from __future__ import annotations

import pytest

from services.demo.pop3 import DemoPop3Server, stored_form
from services.fetcher.pop3 import Pop3AuthError, Pop3Client

MESSAGES = [b"Subject: one\n\n.leading dot\nend\n", b"Subject: two\r\n\r\nbody"]


async def connect(server: DemoPop3Server) -> Pop3Client:
    return await Pop3Client.connect(server.host, server.port, tls="none", timeout=5)


async def test_messages_come_back_with_crlf_line_ends_and_dots_unstuffed() -> None:
    async with DemoPop3Server("box", "secret", MESSAGES) as server, await connect(server) as client:
        await client.login("box", "secret")
        uidls = await client.uidl()
        sizes = await client.list()
        bodies = [raw async for _, raw in client.retr_many(sorted(uidls))]
        await client.quit()

    assert bodies == [b"Subject: one\r\n\r\n.leading dot\r\nend\r\n", b"Subject: two\r\n\r\nbody\r\n"]
    assert sizes == {1: len(stored_form(MESSAGES[0])), 2: len(stored_form(MESSAGES[1]))}
    assert len(set(uidls.values())) == 2


async def test_deleted_messages_go_at_quit_and_stay_when_the_session_drops() -> None:
    async with DemoPop3Server("box", "secret", MESSAGES) as server:
        async with await connect(server) as client:
            await client.login("box", "secret")
            await client.dele_many([1, 2])
        assert server.remaining == 2  # dropped without QUIT: nothing deleted
        async with await connect(server) as client:
            await client.login("box", "secret")
            await client.dele(1)
            await client.quit()
        assert server.remaining == 1


async def test_a_wrong_password_is_refused() -> None:
    async with DemoPop3Server("box", "secret", MESSAGES) as server, await connect(server) as client:
        with pytest.raises(Pop3AuthError):
            await client.login("box", "wrong")
