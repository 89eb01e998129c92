"""The README's two commands install from the lock file, and CI runs its test command as written."""
import re

from tests.conftest import REPO

INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock && pip install --no-deps -e ."


def commands() -> list[str]:
    """The README's one-line commands that start from a fresh clone (they install the system packages)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("S=$(command -v sudo);")]


def test_both_commands_install_from_the_lock_into_a_new_environment():
    run, test = commands()
    assert run.endswith(f"{INSTALL} && snakemake --cores all"), run
    assert test.endswith(f"{INSTALL} && ruff check . && python -m pytest -q"), test


def test_ci_runs_the_readme_test_command_as_written():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert lines[-1] == commands()[1]
