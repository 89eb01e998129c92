#!/usr/bin/env bash
# Refresh requirements.lock from pyproject.toml: exact versions and sha256 hashes of every package,
# all extras included, for CPython 3.11 on Linux x86-64 (the project's machines). Needs uv (`pip install uv`).
# Keeps every locked version that still satisfies pyproject.toml; `scripts/lock.sh --upgrade` takes the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec uv pip compile pyproject.toml --all-extras --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --custom-compile-command scripts/lock.sh --output-file requirements.lock "$@"
