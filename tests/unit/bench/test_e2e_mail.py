"""The end-to-end bench's mail and scoring: the recipients it calls right are the ones ROUTING.md gives."""

from __future__ import annotations

from pathlib import Path

from bench.e2e_contenders import Box, popbridge_config
from bench.e2e_mail import generate, message_index, score
from services.router.rules import resolve
from services.runtime.settings import load_config


class _Sink:
    port = 2525


def _config(tmp_path: Path, boxes: list[Box]) -> Path:
    path = tmp_path / "popbridge.toml"
    path.write_text(popbridge_config(boxes, _Sink(), connections=4))  # type: ignore[arg-type]  # only .port is read
    return path


def test_the_same_seed_gives_the_same_mailbox_and_another_seed_another() -> None:
    assert generate(30, 7, catch_all=True) == generate(30, 7, catch_all=True)
    assert generate(30, 7, catch_all=True).messages != generate(30, 8, catch_all=True).messages


def test_sizes_follow_the_mix() -> None:
    sizes = [len(m) for m in generate(400, 3, catch_all=False).messages]
    small = sum(s < 11_000 for s in sizes)
    large = sum(s > 900_000 for s in sizes)
    assert 0.6 < small / len(sizes) < 0.8
    assert 0 < large / len(sizes) < 0.1
    assert max(sizes) < 5_100_000


def test_every_catch_all_message_routes_to_exactly_its_true_recipients(tmp_path: Path) -> None:
    mail = generate(300, 42, catch_all=True)
    config = load_config(_config(tmp_path, [Box(user="u1", port=110, catch_all=True)]))
    rules = config.mailboxes[0].routing
    assert rules is not None
    for raw, true in zip(mail.messages, mail.recipients, strict=True):
        assert resolve(raw, rules).recipients == tuple(sorted(true))
    assert len(mail.pairs) > len(mail.messages)  # some messages have several recipients


def test_the_config_for_many_single_drop_mailboxes_loads(tmp_path: Path) -> None:
    boxes = [Box(user=f"u{i}", port=110, catch_all=False) for i in range(3)]
    config = load_config(_config(tmp_path, boxes))
    assert [m.recipients for m in config.mailboxes] == [("alice@example.com",)] * 3
    assert config.delivery.connections == 4


def test_message_ids_name_the_mailbox_and_the_message() -> None:
    mail = generate(3, 5, catch_all=False, tag=7)
    assert [message_index(m[:2000]) for m in mail.messages] == [7_000_000, 7_000_001, 7_000_002]
    assert {index for index, _ in mail.pairs} == {7_000_000, 7_000_001, 7_000_002}


def test_score_counts_right_missing_duplicate_and_wrong_copies() -> None:
    expected = {(1, "a@example.com"), (2, "b@example.com"), (3, "c@example.com")}
    received = [(1, "A@example.com"), (1, "a@example.com"), (2, "b@example.com"), (4, "x@example.com")]
    result = score(received, expected)
    assert (result.right, result.expected, result.duplicates, result.wrong) == (2, 3, 1, 1)
