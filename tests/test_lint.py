"""The linters read every file they are meant to: ruff every Python file, `snakemake --lint` the workflow."""
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, env

PYTHON_FOLDERS = ("spot", "tests", "benchmarks", "scripts")


def test_ruff_reads_every_python_file():
    """No exclude pattern of pyproject.toml hides a file (a bare folder name matches at any depth)."""
    listed = subprocess.run(["ruff", "check", "--show-files", "."], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.splitlines()
    python = {p for f in PYTHON_FOLDERS for p in (REPO / f).rglob("*.py")}
    hidden = sorted(str(p.relative_to(REPO)) for p in python - {Path(p) for p in listed})
    assert not hidden, hidden


@pytest.mark.stage
def test_snakemake_lint_finds_nothing():
    """Helpers live in workflow/rules/common.smk, rules in the other files (the lint flags a file mixing them)."""
    done = subprocess.run(["snakemake", "--lint"], cwd=REPO, capture_output=True, text=True, env=env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
