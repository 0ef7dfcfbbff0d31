"""services/runtime/secrets.py: blanking secrets out of what a server says."""

from __future__ import annotations

import base64

import pytest

from services.runtime.secrets import REDACTED, redact

SECRET = "hunter2-correct-horse"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# What a server may echo: the secret as written, alone in base64, or inside the SASL blob of every
# alignment (the login's length moves the secret's offset modulo 3), or inside an XOAUTH2 response.
ECHOES = {
    "plain": SECRET,
    "base64 alone": b64(SECRET.encode()),
    "PLAIN blob, offset 0 mod 3": b64(b"\0ab\0" + SECRET.encode()),
    "PLAIN blob, offset 1 mod 3": b64(b"\0abc\0" + SECRET.encode()),
    "PLAIN blob, offset 2 mod 3": b64(b"\0a\0" + SECRET.encode() + b"x"),
    "XOAUTH2": b64(f"user=alice\x01auth=Bearer {SECRET}\x01\x01".encode()),
}


@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES.keys())
def test_an_echoed_secret_is_blanked_plain_or_in_base64(echo: str) -> None:
    text = redact(f"-ERR [AUTH] you sent {echo} which is wrong", [SECRET])
    assert REDACTED in text
    assert SECRET not in text
    # What is left of the blob are the characters that also depend on the bytes around the secret.
    for shift in range(3):
        core = b64(b"\0" * shift + SECRET.encode())[-(-shift * 4 // 3):][:20]
        assert core not in text
    assert text.startswith("-ERR [AUTH] you sent ")
    assert text.endswith(" which is wrong")


def test_text_without_the_secret_and_short_secrets_leave_ordinary_words_alone() -> None:
    assert redact("+OK all fine", [SECRET, ""]) == "+OK all fine"
    assert redact("the word abc stays", ["x"]) == "the word abc stays"
    assert redact("pw is ab", ["ab"]) == f"pw is {REDACTED}"
