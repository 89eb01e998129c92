"""The README's two commands install from the lock file, and CI runs its test command as written."""
import re
import subprocess

from tests.conftest import REPO

INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock && pip install --no-deps -e ."


def commands() -> list[str]:
    """The README's one-line commands that start from a fresh clone (they install the system packages)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("S=$(command -v sudo")]


def test_both_commands_install_from_the_lock_into_a_new_environment():
    run, test = commands()
    assert run.endswith(f"{INSTALL} && snakemake --cores all"), run
    assert test.endswith(f"{INSTALL} && ruff check . && python -m pytest -q"), test


def test_ci_runs_the_readme_test_command_as_written():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert lines[-1] == commands()[1]


def test_commands_start_as_root_without_sudo_under_set_e(tmp_path):
    """`.ci/run` runs under `set -e` on machines where root has no sudo: the prefix must not end the script."""
    for command in commands():
        prefix = command.split(" $S ")[0]
        done = subprocess.run(["/bin/bash", "-euo", "pipefail", "-c", f'{prefix} echo "sudo=[$S]"'],
                              env={"PATH": str(tmp_path)}, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout == "sudo=[]\n", (prefix, done.stderr)


def test_the_readme_stays_short_and_its_links_resolve():
    """At most 300 lines, depth in docs/; every relative link names a file of the repository."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\(((?!https?:|#)[^)#]+)", text)
    assert links and [x for x in links if not (REPO / x).exists()] == []
