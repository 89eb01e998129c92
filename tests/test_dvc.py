"""dvc.yaml: the same stages, commands and outputs as the Snakefile; `dvc repro` on the smoke config
in a repository copy, then a clean `dvc status`, metrics, plots and a push to a local remote."""
import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO
from tests.test_pipeline import SMOKE, copy_repo, env

pytestmark = pytest.mark.slow
GIT_IDENTITY = dict(GIT_AUTHOR_NAME="spot tests", GIT_AUTHOR_EMAIL="tests@spot.invalid",
                    GIT_COMMITTER_NAME="spot tests", GIT_COMMITTER_EMAIL="tests@spot.invalid")


def git_copy(dest, params: dict | None = None):
    """A repository copy as its own git repository (DVC needs one), with `params` as params.yaml."""
    cwd = copy_repo(dest)
    if params is not None:
        (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=env(**GIT_IDENTITY))
    return cwd


def dvc_commands(cwd) -> dict[str, str]:
    """Expanded stage name -> command, as DVC resolves dvc.yaml (foreach/matrix) against params.yaml."""
    from dvc.repo import Repo
    with Repo(str(cwd)) as repo:
        return {s.addressing: s.cmd for s in repo.index.stages}


def dvc_outs(cwd) -> set[str]:
    from dvc.repo import Repo
    with Repo(str(cwd)) as repo:
        return {str(o.def_path) for s in repo.index.stages for o in s.outs}


def snakemake_commands(cwd, config) -> list[str]:
    """The `spot ...` command of every job of a dry run, log redirection stripped."""
    r = subprocess.run(["snakemake", "-n", "-p", "--config", f"params={config}"], cwd=cwd, capture_output=True,
                       text=True, env=env(), check=True)
    return [m.split(" 2> ")[0].strip() for m in re.findall(r"Shell command: (spot .*)$", r.stdout + r.stderr, re.M)]


def test_dvc_yaml_and_snakefile_run_the_same_jobs(tmp_path):
    cwd = git_copy(tmp_path)
    snake = snakemake_commands(cwd, "params.yaml")
    # Snakemake fans the oracle out per shard and gathers; DVC runs all shards and gathers in one command.
    snake = [c.replace("spot oracle-gather", "spot oracle") for c in snake if "--shard" not in c]
    dvc = list(dvc_commands(cwd).values())
    assert sorted(snake) == sorted(dvc)
    outs = dvc_outs(cwd)
    r = subprocess.run(["snakemake", "-n", "--summary", "--config", "params=params.yaml"], cwd=cwd,
                       capture_output=True, text=True, env=env(), check=True)
    snake_outs = {line.split("\t")[0] for line in r.stdout.splitlines() if line.startswith("out/")}
    missing = [f for f in snake_outs if f not in outs and f.rsplit("/", 1)[0] not in outs]
    unmade = [o for o in outs if not any(f.startswith(o + "/") or o.startswith(f.rsplit("/", 1)[0] + "/")
                                         for f in snake_outs)]
    assert snake_outs and not missing and not unmade, (missing, unmade)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """A git + DVC repository copy whose params.yaml is a trimmed smoke config, after `dvc repro`."""
    cfg = dict(SMOKE, eval=dict(SMOKE["eval"], priors=["grid", "isotropic"]))
    cwd = git_copy(tmp_path_factory.mktemp("dvc"), cfg)
    r = subprocess.run(["dvc", "repro"], cwd=cwd, capture_output=True, text=True, env=env(**GIT_IDENTITY))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cwd, cfg


def dvc(cwd, *args):
    r = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=env(**GIT_IDENTITY))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_repro_completes_and_status_is_clean(repro):
    cwd, cfg = repro
    assert (cwd / "dvc.lock").is_file() and (cwd / "out" / "report" / "tables.md").is_file()
    assert "up to date" in dvc(cwd, "status")
    assert "Running stage" not in dvc(cwd, "repro")                       # nothing to redo


def test_metrics_and_plots_show(repro):
    cwd, cfg = repro
    shown = json.loads(dvc(cwd, "metrics", "show", "--json"))
    metrics = next(iter(shown.values()))["data"]["out/report/metrics.json"]["data"]
    report = json.loads((cwd / "out" / "report" / "metrics.json").read_text())
    assert metrics == report and any(k.endswith("top1") for k in metrics)
    dvc(cwd, "plots", "show", "-o", str(cwd / "plots-html"))
    assert (cwd / "plots-html" / "index.html").stat().st_size > 0


def test_push_to_a_local_remote_and_pull_back(repro, tmp_path):
    cwd, _ = repro
    dvc(cwd, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(cwd, "push")
    assert any((tmp_path / "remote").rglob("*"))
    subprocess.run(["rm", "-rf", str(cwd / "out" / "eval"), str(cwd / ".dvc" / "cache")], check=True)
    assert "deleted" in dvc(cwd, "status")
    dvc(cwd, "pull")
    assert "up to date" in dvc(cwd, "status")


def test_exp_run_with_a_changed_parameter_reruns_only_what_depends_on_it(repro):
    cwd, cfg = repro
    ev = cwd / "out" / "eval" / "spot-a" / "grid" / "4" / "metrics.json"
    before = ev.stat().st_mtime_ns
    dvc(cwd, "exp", "run", "-S", "oracle.steps=3")
    out = cwd / "out" / "oracle" / "spot-a" / cfg["oracle"]["prior"] / str(cfg["oracle"]["budgets"][0])
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert ev.stat().st_mtime_ns == before                              # evaluation did not rerun
    assert "oracle.steps" in dvc(cwd, "params", "diff")
