"""services/demo/smtp.py: the demo's SMTP receiver, fed by popbridge's own SMTP transport."""

from __future__ import annotations

from services.deliverer.smtp import SmtpTransport
from services.demo.smtp import DemoSmtpServer
from services.runtime.settings import SmtpTarget

MESSAGE = b"Subject: hi\r\n\r\n.a line with a leading dot\r\nbye\r\n"


async def test_every_transaction_is_recorded_byte_for_byte() -> None:
    async with DemoSmtpServer() as server:
        target = SmtpTarget(host=server.host, port=server.port, tls="none")
        async with SmtpTransport(target) as transport:
            first = await transport.deliver("s@x.example", ["a@example.com", "b@example.com"], MESSAGE)
            second = await transport.deliver("", ["c@example.com"], MESSAGE)

    assert {v.outcome for v in (*first.values(), *second.values())} == {"delivered"}
    assert [(m.mail_from, m.rcpt_tos, m.content) for m in server.received] == [
        ("s@x.example", ("a@example.com", "b@example.com"), MESSAGE),
        ("", ("c@example.com",), MESSAGE),
    ]
