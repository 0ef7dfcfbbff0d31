"""The scale figures, one table: each part is a module `bench/scale_<part>.py` with `rows(args) -> list[Row]`.

    .venv/bin/python bench/scale.py --bootstrap 127.0.0.1:PORT [--only lookups,router] [--records N]

Parts that are not there (yet) are named, not silently skipped. Every part runs against the broker given
(its own topic prefix), on this machine: contended, so read the figures with the note in each row.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from scale_common import Row, table  # noqa: E402  (bench/ is not a package; the path is set above)

PARTS = ("lookups", "fetcher", "router", "deliverer")


def _load(part: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"scale_{part}")
    except ModuleNotFoundError as exc:
        if exc.name != f"scale_{part}":
            raise
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True, help="host:port of the broker to fill")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {', '.join(PARTS)}")
    parser.add_argument(
        "--records", type=int, default=200_000, help="records per topic (the figure: 1000000)")
    wanted = [p.strip() for p in parser.parse_known_args()[0].only.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r} (one of {', '.join(PARTS)})")
    modules = {part: _load(part) for part in wanted}
    for module in modules.values():
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args()
    missing = [part for part, module in modules.items() if module is None]
    if missing:
        print(f"missing parts (no bench/scale_<part>.py): {', '.join(missing)}")
    rows: list[Row] = []
    for part, module in modules.items():
        if module is not None:
            print(f"running {part} ...", flush=True)
            rows += module.rows(args)
    print(table(rows))


if __name__ == "__main__":
    main()
