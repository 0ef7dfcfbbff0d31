"""The fetcher's durable memory: which UIDL of which mailbox was published, rebuilt from the compacted
fetch-state topic at start and kept current as the fetcher writes to it."""

from __future__ import annotations

from collections.abc import Iterable

from schemas import codec
from schemas.events import FetchRecorded


class FetchMemory:
    """Per mailbox, UIDL -> the latest FetchRecorded. Pure state; the service feeds it."""

    def __init__(self) -> None:
        self._by_mailbox: dict[str, dict[str, FetchRecorded]] = {}

    def remember(self, record: FetchRecorded) -> None:
        self._by_mailbox.setdefault(record.mailbox_id, {})[record.uidl] = record

    def known(self, mailbox_id: str) -> dict[str, FetchRecorded]:
        return self._by_mailbox.get(mailbox_id, {})

    def load(self, values: Iterable[bytes]) -> int:
        """Replay fetch-state records in log order; returns how many were read."""
        count = 0
        for value in values:
            self.remember(codec.decode(value, FetchRecorded))
            count += 1
        return count
