"""The layout's rules, kept by walking imports (click's import-guard test is the model).

- `schemas` imports only msgspec and the standard library;
- no service imports another service: what two share lives in `schemas` or `services.runtime`;
- the composition roots are imported by nobody: `services.single` (`popbridge run`) only by the demo
  built on it, `services.demo` not at all (services.cli loads both commands lazily, by name);
- `services.ops` (the operator commands) imports `schemas` and `services.runtime` only, and nothing
  but the composition root (`services.cli`) imports it;
- the pure "decide" modules load no I/O or framework library, not even transitively.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("fetcher", "router", "deliverer")
COMPOSITION_ROOTS = ("services.single", "services.demo")  # besides services.cli

PURE_MODULES = [
    "services.router.headers",
    "services.router.addresses",
    "services.router.received",
    "services.router.rules",
    "services.router.stage",
    "services.fetcher.plan",
    "services.fetcher.pop3_protocol",
    "services.fetcher.memory",
    "services.deliverer.outcome",
    "services.deliverer.trace",
    "services.runtime.lag",
    "services.ops.lag",
    "services.ops.replay",
    "services.ops.trace",
    "services.ops.locate",
    "services.ops.dead_letters",
    "services.runtime.stages",
]
# Never loaded by a decide module, not even through another module.
FRAMEWORKS = {
    "asyncio",
    "aiokafka",
    "faust",
    "mode",
    "aiosmtplib",
    "aiosmtpd",
    "click",
    "prometheus_client",
    "aiohttp",
}
# Never imported by a decide module itself. (The stdlib's email.utils loads socket for make_msgid, so
# socket is checked on the module's own imports only.)
STDLIB_IO = {
    "socket",
    "ssl",
    "selectors",
    "subprocess",
    "sqlite3",
    "http",
    "urllib",
    "smtplib",
    "poplib",
    "shutil",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def test_schemas_import_only_msgspec_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"msgspec", "schemas", "__future__"}
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in python_files("schemas")
        for name in imported_modules(path)
        if name.split(".")[0] not in allowed
    }
    assert not offenders


def imports_of(paths: list[Path], forbidden: tuple[str, ...]) -> set[str]:
    """`path: module` for every import in `paths` of a module in or under a `forbidden` package."""
    return {
        f"{path.relative_to(ROOT)}: {name}"
        for path in paths
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_another_service(service: str) -> None:
    others = tuple(f"services.{other}" for other in SERVICES if other != service)
    forbidden = (*others, "services.cli", *COMPOSITION_ROOTS, "services.ops")
    assert not imports_of(python_files(f"services.{service}"), forbidden)


def test_runtime_imports_no_service() -> None:
    forbidden = (*(f"services.{s}" for s in SERVICES), *COMPOSITION_ROOTS,
                 "services.ops", "services.cli")
    assert not imports_of(python_files("services.runtime"), forbidden)


def test_ops_imports_only_schemas_and_the_runtime() -> None:
    forbidden = (*(f"services.{s}" for s in SERVICES), *COMPOSITION_ROOTS, "services.cli")
    assert not imports_of(python_files("services.ops"), forbidden)


def test_only_the_composition_root_imports_ops() -> None:
    outside = [path for path in python_files("services")
               if not path.is_relative_to(ROOT / "services" / "ops") and path != ROOT / "services" / "cli.py"]
    assert not imports_of(outside, ("services.ops",))


def _outside(*packages: str) -> list[Path]:
    return [path for path in python_files("services")
            if not any(path.is_relative_to(ROOT / p.replace(".", "/")) for p in packages)]


def test_the_runner_is_imported_only_by_the_demo_built_on_it() -> None:
    assert not imports_of(_outside("services.single", "services.demo"), ("services.single",))


def test_the_demo_is_imported_by_nobody() -> None:
    assert not imports_of(_outside("services.demo"), ("services.demo",))


def test_pure_modules_load_no_io_or_framework_library() -> None:
    existing = [m for m in PURE_MODULES if (ROOT / (m.replace(".", "/") + ".py")).exists()]
    assert existing == PURE_MODULES, "a decide module listed here moved or vanished: update PURE_MODULES"
    probe = (
        "import json, sys\n"
        f"before = set(sys.modules)\nfor m in {existing!r}: __import__(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in set(sys.modules) - before})))"
    )
    loaded = set(
        json.loads(
            subprocess.run(
                [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        )
    )
    assert not loaded & FRAMEWORKS


def test_pure_modules_import_no_io_module_themselves() -> None:
    offenders = {
        f"{module}: {name}"
        for module in PURE_MODULES
        for name in imported_modules(ROOT / (module.replace(".", "/") + ".py"))
        if name.split(".")[0] in STDLIB_IO
    }
    assert not offenders
