#!/usr/bin/env bash
# Writes deploy/image/requirements.lock: popbridge's runtime dependencies (pyproject.toml's
# [project.dependencies], not the test extra) pinned to exact versions with the sha256 of every wheel, which
# the image installs with `pip install --require-hashes --only-binary=:all:`.
#   deploy/image/lock.sh                 regenerate after editing dependencies in pyproject.toml
#   deploy/image/lock.sh --upgrade       also move every pin to the newest version the ranges allow
# uv, not pip-compile: `--universal` resolves once for every Python and platform (the Debian base has 3.11,
# python:3.12-slim has 3.12) where pip-compile resolves for the interpreter that runs it; uv is one static
# binary pinned below, so the lock does not depend on the pip version in the venv.
# tests/unit/test_image_lock.py fails when pyproject.toml and the lock disagree.
set -euo pipefail
cd "$(dirname "$0")/../.."
UV_VERSION=0.13.8
py=".venv/bin/python"; [[ -x "$py" ]] || py=python3
uv=".venv/bin/uv"
if ! "$uv" --version 2>/dev/null | grep -qx "uv $UV_VERSION"; then
    "$py" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
"$uv" pip compile pyproject.toml --quiet --universal --python-version 3.11 --generate-hashes \
    --no-build --no-header --annotation-style line -o deploy/image/requirements.lock "$@"
