"""DVC runs the stage table too: `dvc repro` on config/smoke.yaml gives Snakemake's results; after a
Snakemake run, `dvc commit` leaves nothing to do, and both engines then rerun the same jobs when a
parameter changes; an edited source file reruns the stages that import it. Real dvc, real git,
a local remote."""
import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from tests.conftest import copy_repo, env, snakemake

pytestmark = pytest.mark.slow
SMOKE = "config/smoke.yaml"
GIT_IDENTITY = dict(GIT_AUTHOR_NAME="spot tests", GIT_AUTHOR_EMAIL="tests@spot.invalid",
                    GIT_COMMITTER_NAME="spot tests", GIT_COMMITTER_EMAIL="tests@spot.invalid")


def run(cwd, *cmd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env(**GIT_IDENTITY))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def as_dvc_repo(cwd):
    """`cwd` with dvc.yaml generated for the smoke config, as a git repository of its own."""
    run(cwd, "spot", "dvc-yaml", "--params", SMOKE)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cwd, *cmd)
    return cwd


def dvc(cwd, *args):
    return run(cwd, "dvc", *args)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """A repository copy after `dvc repro` of the smoke config."""
    cwd = as_dvc_repo(copy_repo(tmp_path_factory.mktemp("dvc")))
    dvc(cwd, "repro")
    return cwd


def test_repro_gives_the_results_of_snakemake(repro, smoke_run):
    snake, _ = smoke_run
    pd.testing.assert_frame_equal(pd.read_csv(repro / "out/report/results.csv"),
                                  pd.read_csv(snake / "out/report/results.csv"))
    assert (repro / "out/report/tables.md").read_text() == (snake / "out/report/tables.md").read_text()


def test_repro_status_is_clean_and_a_second_repro_runs_nothing(repro):
    assert "up to date" in dvc(repro, "status")
    assert "Running stage" not in dvc(repro, "repro")


def test_metrics_and_plots_show(repro):
    shown = json.loads(dvc(repro, "metrics", "show", "--json"))
    metrics = next(iter(shown.values()))["data"]["out/report/metrics.json"]["data"]
    assert metrics == json.loads((repro / "out/report/metrics.json").read_text())
    dvc(repro, "plots", "show", "-o", str(repro / "plots-html"))
    assert (repro / "plots-html" / "index.html").stat().st_size > 0


def test_push_to_a_local_remote_and_pull_back(repro, tmp_path):
    dvc(repro, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(repro, "push")
    assert any((tmp_path / "remote").rglob("*"))
    shutil.rmtree(repro / "out" / "eval")
    shutil.rmtree(repro / ".dvc" / "cache")
    assert "deleted" in dvc(repro, "status")
    dvc(repro, "pull")
    assert "up to date" in dvc(repro, "status")


def test_exp_run_with_a_changed_parameter_reruns_only_what_reads_it(repro):
    ev = repro / "out/eval/spot-a/grid/4/metrics.json"
    before = ev.stat().st_mtime_ns
    dvc(repro, "exp", "run", "-S", f"{SMOKE}:oracle.steps=3")
    assert json.loads((repro / "out/oracle/spot-a/4/metrics.json").read_text())["steps"] == 3
    assert ev.stat().st_mtime_ns == before                              # evaluation did not rerun
    assert "oracle.steps" in dvc(repro, "params", "diff")


@pytest.fixture(scope="module")
def committed(smoke_run, tmp_path_factory):
    """A copy of the Snakemake smoke run (outputs and Snakemake's records) whose outputs `dvc commit`
    recorded in dvc.lock."""
    cwd = tmp_path_factory.mktemp("committed") / "repo"
    shutil.copytree(smoke_run[0], cwd, symlinks=True)
    as_dvc_repo(cwd)
    dvc(cwd, "commit", "--force")
    return cwd


def test_after_snakemake_and_dvc_commit_dvc_has_nothing_to_do(committed):
    assert "up to date" in dvc(committed, "status")


def changed_by_dvc(cwd) -> set[str]:
    """Output folders of the stages `dvc status` lists as changed."""
    stages = yaml.safe_load((cwd / "dvc.yaml").read_text())["stages"]
    changed = json.loads(dvc(cwd, "status", "--json"))
    return {stages[name]["outs"][0] if "metrics" not in stages[name] else "out/report" for name in changed}


def changed_by_snakemake(cwd) -> set[str]:
    """Output folders of the jobs a Snakemake dry run reruns for changed params."""
    r = snakemake(cwd, "-n")
    out = r.stdout + r.stderr
    jobs = re.findall(r"output: (\S+)/run\.json\n(?:.*\n)*?\s+reason: ([^\n]*)", out)
    return {folder for folder, reason in jobs if "Params have changed" in reason}


@pytest.mark.parametrize("key, value", [("eval.knn.k", 3), ("oracle.steps", 1), ("train.lr", 0.01),
                                        ("report.pictures", 2)])
def test_both_engines_rerun_the_same_jobs_when_a_parameter_changes(committed, key, value):
    path = committed / SMOKE
    original = path.read_text()
    cfg = yaml.safe_load(original)
    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        by_dvc, by_snakemake = changed_by_dvc(committed), changed_by_snakemake(committed)
    finally:
        path.write_text(original)
    assert by_dvc and by_dvc == by_snakemake, (by_dvc ^ by_snakemake)


@pytest.mark.parametrize("source, stages", [
    ("spot/priors.py", {"backbones", "eval", "oracle-parts", "transfer"}),
    ("spot/stages/report.py", {"report"}),
])
def test_an_edited_source_file_reruns_the_stages_that_import_it(committed, source, stages):
    path = committed / source
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        kinds = {folder.split("/")[1] for folder in changed_by_dvc(committed)}
    finally:
        path.write_text(original)
    assert stages <= kinds and "shards" not in kinds and "saliency" not in kinds, kinds
    if source.endswith("report.py"):
        assert kinds == {"report"}
