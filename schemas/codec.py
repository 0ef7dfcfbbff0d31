"""The one codec for events on the wire: msgpack via msgspec, tagged so a reader can tell the type.

msgpack keeps the raw message bytes as bytes (no base64), which matters for 50 MB mails.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    Event,
    FetchRecorded,
    MailFetched,
    RecipientDelivered,
    RecipientsResolved,
    RetryScheduled,
)

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_any_event = msgspec.msgpack.Decoder(Event)
_decoders: dict[type[object], msgspec.msgpack.Decoder[object]] = {
    cls: msgspec.msgpack.Decoder(cls)
    for cls in (
        MailFetched,
        RecipientsResolved,
        DeliveryAttempted,
        FetchRecorded,
        RetryScheduled,
        RecipientDelivered,
        DeliveryDeadLettered,
    )
}


class EventDecodeError(ValueError):
    """Bytes on a topic that are not the expected event: a bug or a foreign writer, never user input."""


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, cls: type[T]) -> T:
    """Decode one event of a known type; EventDecodeError says what was wrong."""
    try:
        return _decoders[cls].decode(data)  # type: ignore[return-value]  # the dict maps cls to Decoder[cls]
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"not a {cls.__name__}: {exc}") from None


def decode_any(data: bytes) -> Event:
    """Decode an event of any type, by its tag."""
    try:
        event: Event = _any_event.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"not a popbridge event: {exc}") from None
    return event
