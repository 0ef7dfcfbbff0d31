"""services/demo/demo.py and samples.py: each sample goes where its case says, and the whole demo runs
in-process against the built-in POP3 server."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from services.demo.demo import healthy, render, run_demo
from services.demo.samples import config_toml, samples
from services.router.rules import resolve
from services.runtime.settings import load_config

EXPECTED = {
    "Bcc: dave is named only in Delivered-To": ("dave@example.com",),
    "mailing list: List-Id rule": ("lists@example.com",),
    "forged Delivered-To: carol below the ISP's Received is ignored": ("bob@example.com",),
    "plus address: alice+shop is alice": ("alice@example.com",),
    "alias: sales is alice and bob": ("alice@example.com", "bob@example.com"),
    "unknown user: zoe goes to the postmaster": ("postmaster@example.com",),
    "same message to alice and alice+party (copy 1)": ("alice@example.com",),
    "same message to alice and alice+party (copy 2)": ("alice@example.com",),
}


def test_each_sample_routes_as_its_case_says(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text(config_toml("127.0.0.1", 110, "127.0.0.1", 25))
    rules = load_config(config_file).mailboxes[0].routing
    assert rules is not None
    assert {s.case: resolve(s.raw, rules).recipients for s in samples()} == EXPECTED


def test_the_demo_delivers_every_sample_once_and_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    result = asyncio.run(run_demo("builtin"))

    assert healthy(result)
    delivered = {row.case: row.delivered_to for row in result.rows}
    copies = [delivered.pop(f"same message to alice and alice+party (copy {n})") for n in (1, 2)]
    assert sorted(copies) == [(), ("alice@example.com",)]
    assert delivered == {case: r for case, r in EXPECTED.items() if "same message" not in case}
    assert result.left_on_pop3 == 0
    assert "all inside example.com" in render(result, 1.0)
    assert list(tmp_path.iterdir()) == []
