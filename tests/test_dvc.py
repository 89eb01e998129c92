"""DVC runs the stage table too: `dvc repro` on config/smoke.yaml gives Snakemake's results; the
report's metrics and plots are versioned, so `dvc exp show`, `dvc exp diff`, `dvc metrics diff` and
`dvc plots diff` compare an experiment and two commits; after a Snakemake run (its `onsuccess` runs
`dvc commit`) DVC has nothing to do, and both engines then rerun the same jobs when a parameter
changes; an edited source file reruns the stages that import it. Real dvc, real git, a local remote."""
import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from spot.workflow.stage_table import STAGE
from tests.conftest import copy_repo, env, snakemake

pytestmark = pytest.mark.end_to_end
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


def git_commit(cwd, message):
    run(cwd, "git", "add", "-A")
    run(cwd, "git", "commit", "-qm", message)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """A repository copy after `dvc repro` of the smoke config, dvc.lock committed (as a user would)."""
    cwd = as_dvc_repo(copy_repo(tmp_path_factory.mktemp("dvc")))
    dvc(cwd, "repro")
    git_commit(cwd, "dvc repro")
    return cwd


REPORT = "out/report"
SPOT_ON = f"{REPORT}/metrics/spot-a/s0/spot-on.json"       # the oracle's row: changes with oracle.steps


def test_repro_gives_the_results_of_snakemake(repro, smoke_run):
    snake, _ = smoke_run
    pd.testing.assert_frame_equal(pd.read_csv(repro / "out/report/results.csv"),
                                  pd.read_csv(snake / "out/report/results.csv"))
    assert (repro / "out/report/tables.md").read_text() == (snake / "out/report/tables.md").read_text()


def test_repro_status_is_clean_and_a_second_repro_runs_nothing(repro):
    assert "up to date" in dvc(repro, "status")
    assert "Running stage" not in dvc(repro, "repro")


def test_metrics_show_is_the_paper_table_a_row_per_backbone_and_prior(repro):
    files = sorted((repro / REPORT / "metrics").rglob("*.json"))
    shown = next(iter(json.loads(dvc(repro, "metrics", "show", "--json")).values()))["data"]
    assert {str(f.relative_to(repro)) for f in files} == set(shown) and len(files) > 8
    for f in files:
        assert shown[str(f.relative_to(repro))]["data"] == json.loads(f.read_text())
    results = pd.read_csv(repro / REPORT / "results.csv")
    row = results[(results.backbone == "grid-b") & (results.prior == "uniform") & (results.budget == 16)]
    assert shown[f"{REPORT}/metrics/grid-b/uniform.json"]["data"]["16"]["top1"] == round(100 * row.top1.item(), 1)
    table = dvc(repro, "metrics", "show").splitlines()
    assert table[0].split() == ["Path", "04.knn", "04.top1", "16.knn", "16.top1"] and max(map(len, table)) <= 160
    assert len(table) == 1 + len(files)
    paths = [line.split()[0] for line in table[1:]]                 # the backbone (seed 0) before its replicate
    assert max(i for i, p in enumerate(paths) if "/spot-a/s0/" in p) < min(i for i, p in enumerate(paths)
                                                                            if "/spot-a/s1/" in p)


def test_plots_show_renders_the_report_plots_and_results_csv(repro):
    """The PNGs need no network; results.csv is an interactive data plot, a mark per row (its Vega
    comes from a CDN: the page's only addresses)."""
    dvc(repro, "plots", "show", "-o", str(repro / "plots-html"))
    page = (repro / "plots-html" / "index.html").read_text()
    assert page.count("<img") == len(STAGE["report"].plots)                # every PNG plot of the report
    assert {u for u in re.findall(r"https?://[^/\"]+", page)} <= {"https://cdn.jsdelivr.net", "https://vega.github.io"}
    shown = json.loads(dvc(repro, "plots", "show", "--json"))
    rows = pd.read_csv(repro / REPORT / "results.csv")
    for column in ("top1", "knn"):
        (plot,) = shown["data"][f"{column}-vs-budget"]
        points = plot["content"]["data"]["values"]
        assert len(points) == len(rows) and sorted(float(p[column]) for p in points) == sorted(rows[column])
    for name in ("accuracy_vs_budget", "oracle_steps", "frontier"):
        assert any(p.name.endswith(f"{name}.png") and p.stat().st_size > 10_000
                   for p in (repro / "plots-html" / "static").iterdir()), name


def test_push_to_a_local_remote_and_pull_back(repro, tmp_path):
    dvc(repro, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(repro, "push")
    assert any((tmp_path / "remote").rglob("*"))
    shutil.rmtree(repro / "out" / "eval")
    shutil.rmtree(repro / ".dvc" / "cache")
    assert "deleted" in dvc(repro, "status")
    dvc(repro, "pull")
    assert "up to date" in dvc(repro, "status")


def test_where_only_dvc_ran_a_changed_parameter_reruns_its_jobs_in_both_engines(repro, tmp_path):
    """A clone where DVC ran every job and Snakemake none: `spot dvc-done` gives Snakemake a record of
    every job (its params, code and inputs), so a value changed later reruns exactly the jobs that
    read it, in Snakemake as in DVC (the report's resamples: the report job alone)."""
    cwd = tmp_path / "repo"
    shutil.copytree(repro, cwd, symlinks=True)
    assert not (cwd / ".snakemake").exists()
    assert "nothing to do" in run(cwd, "spot", "dvc-done", "--params", SMOKE)
    assert "Nothing to be done" in (r := snakemake(cwd, "-n")).stdout + r.stderr
    cfg = yaml.safe_load((cwd / SMOKE).read_text())
    cfg["report"]["resamples"] = 2000
    (cwd / SMOKE).write_text(yaml.safe_dump(cfg, sort_keys=False))
    by_snakemake, rerun = changed_by_snakemake(cwd)
    assert changed_by_dvc(cwd) == by_snakemake == rerun == {REPORT}, (by_snakemake, rerun)


@pytest.fixture(scope="module")
def experiment(repro):
    """`repro` after `dvc exp run -S oracle.steps=10` (applied to its workspace): (repo, whether an
    evaluation's metrics.json was rewritten)."""
    ev = repro / "out/eval/spot-a/grid/4/metrics.json"
    before = ev.stat().st_mtime_ns
    dvc(repro, "exp", "run", "-S", f"{SMOKE}:oracle.steps=10")
    return repro, ev.stat().st_mtime_ns != before


def test_exp_run_with_a_changed_parameter_reruns_only_what_reads_it(experiment):
    cwd, evaluation_reran = experiment
    assert json.loads((cwd / "out/oracle/spot-a/4/metrics.json").read_text())["steps"] == 10
    assert not evaluation_reran
    assert "oracle.steps" in dvc(cwd, "params", "diff")
    changed = [line for line in run(cwd, "git", "diff", "-U0", SMOKE).splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-  steps: 2", "+  steps: 10"], changed       # DVC rewrote one line of the params file


def exp_rows(shown: list) -> list[dict]:
    """Every row of `dvc exp show --json` (baselines and their experiments): rev, name, metrics."""
    rows = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and "metrics" in node["data"]:
                rows.append(dict(rev=node.get("rev"), name=node.get("name"), metrics=node["data"]["metrics"] or {}))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(shown)
    return rows


def test_exp_show_has_numbers_for_the_baseline_and_the_experiment(experiment):
    cwd, _ = experiment
    head = run(cwd, "git", "rev-parse", "HEAD").strip()
    rows = {r["rev"]: r for r in exp_rows(json.loads(dvc(cwd, "exp", "show", "--json")))}
    baseline = rows[head]
    exps = [r for rev, r in rows.items() if rev not in (head, "workspace") and r["name"]]
    assert len(exps) == 1, rows.keys()
    spot_on = {}
    for row in (baseline, exps[0]):
        metrics = row["metrics"][SPOT_ON]["data"]
        assert isinstance(metrics["04"]["top1"], float), row
        spot_on[row["rev"]] = metrics["04"]
        assert len(row["metrics"]) == len(list((cwd / REPORT / "metrics").rglob("*.json")))
    assert spot_on[head] != spot_on[exps[0]["rev"]], spot_on     # 8 more steps moved the tokens
    table = dvc(cwd, "exp", "show", "--only-changed", "--csv")
    assert exps[0]["name"] in table and "oracle.steps" in table
    view = dvc(cwd, "exp", "show", "--only-changed", "--csv", "--drop", ".*", "--keep",     # the view of docs/workflow.md
               r"Experiment|.*oracle\.steps|.*/spot-a/s0/spot-on\.json:04\.top1").splitlines()
    assert view[0].startswith(f"Experiment,{SPOT_ON}:04.top1,{SMOKE}:oracle.steps") and exps[0]["name"] in view[-1], view
    diff = json.loads(dvc(cwd, "exp", "diff", head, exps[0]["name"], "--json"))
    assert diff["params"][SMOKE]["oracle.steps"] == {"old": 2, "new": 10, "diff": 8}
    assert {k: v["new"] for k, v in diff["metrics"][SPOT_ON].items()} == {
        f"04.{k}": v for k, v in spot_on[exps[0]["rev"]].items() if v != spot_on[head][k]}


def test_metrics_and_plots_diff_two_commits(experiment, tmp_path):
    cwd, _ = experiment
    git_commit(cwd, "oracle.steps=10")
    diff = json.loads(dvc(cwd, "metrics", "diff", "HEAD~1", "HEAD", "--json"))
    changed = diff[SPOT_ON]
    assert changed and all(v["old"] != v["new"] for v in changed.values()), changed
    assert SPOT_ON in dvc(cwd, "metrics", "diff", "HEAD~1", "HEAD")
    dvc(cwd, "plots", "diff", "HEAD~1", "HEAD", "-o", str(tmp_path / "html"))
    page = (tmp_path / "html" / "index.html").read_text()
    assert page.count("<img") == 2 * len(STAGE["report"].plots)           # every PNG plot x 2 revisions, offline
    assert {u for u in re.findall(r"https?://[^/\"]+", page)} <= {"https://cdn.jsdelivr.net", "https://vega.github.io"}
    oracle_steps = sorted(p.read_bytes() for p in (tmp_path / "html" / "static").glob("*oracle_steps.png"))
    assert len(oracle_steps) == 2 and oracle_steps[0] != oracle_steps[1]


READ = ("tables.md", "findings.md", "results.csv")             # the report a person reads


def report_bytes(cwd) -> dict[str, bytes]:
    return {name: (cwd / REPORT / name).read_bytes() for name in READ}


def eval_files(cwd, backbone="spot-a") -> dict[str, bytes]:
    """Every file an evaluate job wrote but its run.json (timings) and writer's .lock (not an output:
    .dvcignore), by path under its folder."""
    folder = cwd / "out/eval" / backbone
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in ("run.json", ".lock")}


def test_a_colleague_clones_pulls_and_has_the_report_with_nothing_to_rerun(repro, tmp_path):
    """The team's round trip through a directory remote (what a cluster's shared file system gives):
    two results commits pushed (the second with 1000 more report.resamples: one job); a fresh `git clone`
    of the latest, `dvc pull`: DVC finds it current, the report is the pusher's byte for byte, and after
    `spot dvc-done` Snakemake has nothing to do. `git checkout` of the older commit and `dvc pull` give
    the older report, and back, `dvc checkout` the latest (as in the pusher, whose cache has both). Last,
    one evaluate job rerun from the pulled weights writes the pusher's files byte for byte (the same
    machine). (Runs on the module's `repro` after the other tests: it adds two commits.)"""
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    dvc(repro, "remote", "add", "--force", "--default", "shared", str(remote))
    git_commit(repro, "results; remote: shared")
    dvc(repro, "push")
    older, older_report = run(repro, "git", "rev-parse", "HEAD").strip(), report_bytes(repro)
    path = repro / SMOKE
    cfg = yaml.safe_load(path.read_text())
    cfg["report"]["resamples"] += 1000
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    dvc(repro, "repro")
    git_commit(repro, "results: report.resamples + 1000")
    dvc(repro, "push")
    latest = report_bytes(repro)
    assert latest["tables.md"] != older_report["tables.md"]              # other intervals

    run(tmp_path, "git", "clone", "-q", str(repro), str(clone))
    assert not (clone / "out").exists()
    dvc(clone, "pull")
    assert "up to date" in dvc(clone, "status")
    assert report_bytes(clone) == latest
    assert "nothing to do" in run(clone, "spot", "dvc-done", "--params", SMOKE)
    assert "Nothing to be done" in (r := snakemake(clone, "-n")).stdout + r.stderr

    run(clone, "git", "checkout", "-q", older)                      # last month's: its objects from the remote
    dvc(clone, "pull")
    assert report_bytes(clone) == older_report
    assert "up to date" in dvc(clone, "status")
    run(clone, "git", "checkout", "-q", "-")                         # and back: the cache has both now
    dvc(clone, "checkout")
    assert report_bytes(clone) == latest
    run(repro, "git", "checkout", "-q", older)                      # the pusher's cache has every commit's
    dvc(repro, "checkout")
    assert report_bytes(repro) == older_report
    run(repro, "git", "checkout", "-q", "-")
    dvc(repro, "checkout")

    pushed = eval_files(repro)
    dvc(clone, "repro", "--force", "--single-item", "evaluate_spot-a")
    rerun = eval_files(clone)
    assert rerun.keys() == pushed.keys() and len(pushed) > 8
    assert [f for f in pushed if rerun[f] != pushed[f]] == []


@pytest.fixture(scope="module")
def committed(smoke_run, tmp_path_factory):
    """A copy of the Snakemake smoke run (outputs and Snakemake's records) with dvc.yaml generated for
    its params file, where Snakemake ran again (the report job, whose run.json was removed): its
    `onsuccess` recorded the outputs in dvc.lock. (copy, Snakemake's output)"""
    cwd = tmp_path_factory.mktemp("committed") / "repo"
    shutil.copytree(smoke_run[0], cwd, symlinks=True)
    as_dvc_repo(cwd)
    assert not (cwd / "dvc.lock").exists()
    (cwd / REPORT / "run.json").unlink()
    r = snakemake(cwd)
    return cwd, r.stdout + r.stderr


def test_after_snakemake_dvc_has_nothing_to_do(committed):
    cwd, out = committed
    stages = yaml.safe_load((cwd / "dvc.yaml").read_text())["stages"]
    assert f"dvc commit: recorded {len(stages)} stages in dvc.lock" in out, out[-2000:]
    said = [line for line in out.splitlines() if line.startswith(("MLflow runs: ", "dvc commit: "))]
    assert said[-1].endswith("keep this run: git add dvc.lock && git commit -m 'results'"), said
    assert said[0].startswith("MLflow runs: `mlflow ui --backend-store-uri sqlite:///") and \
        said[0].endswith("?workflowType=machine_learning"), said
    assert "up to date" in dvc(cwd, "status")
    assert "Running stage" not in dvc(cwd, "repro", "--dry")


def test_snakemake_commits_nothing_for_another_params_file(smoke_run):
    """The smoke run's repository copy has the committed dvc.yaml (for params.yaml): its run left
    dvc.lock alone and said why."""
    cwd, r = smoke_run
    assert "dvc commit skipped (dvc.yaml is for params.yaml, this run for config/smoke.yaml)" in r.stdout + r.stderr
    assert not (cwd / "dvc.lock").exists()


def changed_by_dvc(cwd) -> set[str]:
    """Output folders of the stages `dvc status` lists as changed."""
    stages = yaml.safe_load((cwd / "dvc.yaml").read_text())["stages"]
    changed = json.loads(dvc(cwd, "status", "--json"))
    return {stages[name]["outs"][0] if "metrics" not in stages[name] else "out/report" for name in changed}


def changed_by_snakemake(cwd) -> tuple[set[str], set[str]]:
    """Output folders of the jobs a Snakemake dry run reruns for changed params, and of every job it
    reruns. (Snakemake names one reason per job: a job whose input is rerun too says only that.)"""
    r = snakemake(cwd, "-n")
    out = r.stdout + r.stderr
    jobs = re.findall(r"output: (\S+)/run\.json[^\n]*\n(?:.*\n)*?\s+reason: ([^\n]*)", out)
    return {folder for folder, reason in jobs if "Params have changed" in reason}, {folder for folder, _ in jobs}


@pytest.mark.parametrize("key, value", [("eval.knn.k", 3), ("oracle.steps", 1), ("train.lr", 0.01),
                                        ("report.pictures", 2)])
def test_both_engines_rerun_the_same_jobs_when_a_parameter_changes(committed, key, value):
    committed, _ = committed
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
        by_dvc, (by_snakemake, rerun) = changed_by_dvc(committed), changed_by_snakemake(committed)
    finally:
        path.write_text(original)
    # DVC lists the stages whose params changed; Snakemake says so of those it does not rerun anyway
    assert by_snakemake and by_snakemake <= by_dvc <= rerun, (by_dvc - rerun, by_snakemake - by_dvc)


def test_a_changed_lock_file_reruns_every_job_in_both_engines(committed):
    committed, _ = committed
    path = committed / "requirements.lock"
    original = path.read_text()
    path.write_text(original + "# another environment\n")
    try:
        by_dvc, (by_snakemake, rerun) = changed_by_dvc(committed), changed_by_snakemake(committed)
    finally:
        path.write_text(original)
    stages = yaml.safe_load((committed / "dvc.yaml").read_text())["stages"]
    every = {s["outs"][0] if "metrics" not in s else REPORT for s in stages.values()}
    # Snakemake names one reason per job: the first jobs say the params changed, the rest their inputs
    assert by_dvc == every == rerun and "out/shards" in by_snakemake, (every ^ by_dvc, every ^ rerun)


@pytest.mark.parametrize("source, stages", [
    ("spot/core/priors.py", {"backbones", "eval", "oracle-parts", "transfer"}),
    ("spot/stages/report.py", {"report"}),
])
def test_an_edited_source_file_reruns_the_stages_that_import_it(committed, source, stages):
    committed, _ = committed
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


def test_after_dvc_and_spot_dvc_done_snakemake_has_nothing_to_do(committed, tmp_path):
    """The other way round: DVC reruns a changed param's job (the report's resamples: one job);
    Snakemake, whose record still has the old value, would rerun it too until `spot dvc-done` records
    DVC's run; a later change still reruns its job in Snakemake."""
    cwd = tmp_path / "repo"
    shutil.copytree(committed[0], cwd, symlinks=True)
    path, original = cwd / SMOKE, (cwd / SMOKE).read_text()
    cfg = yaml.safe_load(original)
    cfg["report"]["resamples"] = 2000
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    dvc(cwd, "repro")
    assert changed_by_snakemake(cwd)[0]                      # Snakemake's record: the old params
    assert "nothing to do" in run(cwd, "spot", "dvc-done", "--params", SMOKE)
    assert not changed_by_snakemake(cwd)[1]
    assert "Nothing to be done" in (r := snakemake(cwd, "-n")).stdout + r.stderr
    path.write_text(original)                                 # back to the old value: both engines rerun it
    assert changed_by_snakemake(cwd)[0] and changed_by_dvc(cwd)
