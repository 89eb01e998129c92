"""The stage table: dvc.yaml, the CLI and the Snakemake rules come from it and agree with the code;
the Snakemake report shows the report stage's files with their captions."""
import ast
import base64
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from spot.cli import parser
from spot.workflow.config import load_config, written_key
from spot.workflow.declaration import named
from spot.workflow.dvc import code_deps, commit_after_snakemake, dvc_yaml, generated_for, present
from spot.workflow.layout import Layout, wildcards
from spot.workflow.stage_table import STAGE, STAGES, all_jobs
from tests.conftest import REPO, linked_root, snakemake

CONFIGS = ["params.yaml", "config/smoke.yaml"]


@pytest.mark.stage
def test_committed_dvc_yaml_is_the_generated_one(monkeypatch):
    monkeypatch.chdir(REPO)
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(load_config("params.yaml"), "params.yaml"), \
        "dvc.yaml is stale: run `spot dvc-yaml`"


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.stage
def test_dvc_stages_are_the_jobs_with_their_params_and_commands(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    stages = yaml.safe_load(dvc_yaml(cfg, path))["stages"]
    jobs = all_jobs(cfg)
    assert len(stages) == len(jobs)
    for (stage, w), (name, entry) in zip(jobs, stages.items(), strict=True):
        params = entry.get("params", [])                  # none: the stage reads no config value
        keys = params if path == "params.yaml" else [k for p in params for k in p[path]]
        written = {present(yaml.safe_load(open(path)), written_key(cfg, k)) for k in stage.params(cfg, w).values()} - {None}
        assert sorted(keys) == sorted(written), name      # a replicate: its backbone's key; unwritten: none
        assert entry["cmd"] == stage.command(path, w)
        if not (stage.metrics or stage.plots):           # one out per folder of the job, every folder once
            assert entry["outs"] == [str(Layout(cfg["root"])(stage.output, **f)) for f in stage.output_wildcards(cfg, w)]
        assert set(code_deps(stage)) <= set(entry["deps"])
    assert len({o for e in stages.values() for o in e["outs"]}) == sum(len(e["outs"]) for e in stages.values())


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.stage
def test_snakemake_runs_the_same_commands_as_dvc(path, tmp_path):
    """Every job of a dry run is a DVC stage's command (jobs with their logs redirected; the params
    file reaches Snakemake's jobs as $SPOT_PARAMS, which the shell expands to its path)."""
    from tests.conftest import copy_repo
    cwd = copy_repo(tmp_path)
    r = snakemake(cwd, "-n", "-p", config=path)
    commands = [m.split(" 2> ")[0].strip().replace('"$SPOT_PARAMS"', path)
                for m in re.findall(r"Shell command: (spot .*)$", r.stdout + r.stderr, re.M)]
    cfg = load_config(cwd / path)
    dvc = [e["cmd"] for e in yaml.safe_load(dvc_yaml(cfg, path) if path != "params.yaml" else
                                            (cwd / "dvc.yaml").read_text())["stages"].values()]
    assert sorted(commands) == sorted(dvc)


def test_code_deps_are_the_modules_a_stage_imports():
    deps = {s.name: set(code_deps(s)) for s in STAGES}
    assert {"spot/stages/evaluate.py", "spot/core/priors.py", "spot/core/model.py", "spot/core/tokenizer.py",
            "spot/core/knn.py", "spot/data/loading.py", "spot/training/backbones.py"} <= deps["evaluate"]
    assert {"spot/methods/oracle.py", "spot/core/priors.py"} <= deps["oracle"]
    assert {"spot/training/train.py", "spot/core/priors.py", "spot/training/checkpoint.py"} <= deps["backbone"]
    assert "spot/stages/report.py" in deps["report"] and "spot/methods/oracle.py" not in deps["report"]
    assert not any(p.startswith("spot/stages/report") for s, d in deps.items() if s != "report" for p in d)
    assert not any(p.startswith("spot/workflow/") or p == "spot/cli.py" for d in deps.values() for p in d)


def test_a_stage_imports_no_other_stage():
    for path in (REPO / "spot" / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
                [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.startswith(("spot.stages.", "spot.workflow", "spot.cli"))], path


def test_stage_functions_take_the_wildcards_and_options_the_table_names():
    for s in STAGES:
        args = set(inspect.signature(s.entry_point()).parameters)
        extra = {o.replace("-", "_") for o in s.options} | ({"state"} if s.state else set())
        per_folder = {"out", *s.each}               # with one_pass: the folders of every value of it at once
        per_pass = {"outs", *(set(s.each) - {s.one_pass})}
        assert args == {"p", "inputs", *(per_pass if s.one_pass else per_folder), *s.wildcards} | extra, s.name
        assert set(wildcards(s.output)) == {*s.wildcards, *s.each} and s.one_pass in (None, *s.each), s.name


def test_cli_has_one_command_per_stage_with_its_wildcards():
    ap = parser()
    sub = next(a for a in ap._actions if a.dest == "command").choices
    for s in STAGES:
        required = {a.dest for a in sub[s.name]._actions if a.required}
        assert required == set(s.wildcards), s.name


def test_a_stage_gets_its_params_by_name_and_nothing_else():
    cfg = load_config(REPO / "params.yaml")
    p = STAGE["oracle"].arguments(cfg, dict(backbone="spot", part=0))
    assert (p.steps, p.prior, p.seed) == (cfg["oracle"]["steps"], cfg["oracle"]["prior"], cfg["seed"])
    with pytest.raises(AttributeError, match="'knn'"):
        print(p.knn)
    p = STAGE["reduction"].arguments(cfg, dict(backbone="spot"))
    p.knn["k"] += 1                                            # a copy: the config is the same for the next job
    assert p.knn["k"] == cfg["eval"]["knn"]["k"] + 1 and STAGE["reduction"].arguments(cfg, dict(backbone="spot")).knn \
        == cfg["eval"]["knn"]
    with pytest.raises(ValueError, match="'batch_size'"):
        named("eval.batch_size", "oracle.batch_size")


def test_every_param_a_stage_reads_is_declared():
    """Each `p.<name>` in a stage's module is a param that its table entry declares for the jobs of the configs."""
    cfgs = [load_config(REPO / c) for c in CONFIGS]
    for stage in STAGES:
        tree = ast.parse(inspect.getsource(importlib.import_module(stage.module)))
        reads = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "p"}
        names = {n for cfg in cfgs for job in stage.jobs(cfg) for n in stage.params(cfg, job)}
        assert reads <= names, (stage.name, reads - names)


def test_dvc_tracks_the_report_metrics_and_plots_in_its_cache():
    """Metrics and plots are cached outs (dvc.lock records them: `dvc metrics diff` and `dvc exp show`
    read them at any revision); the plots are images (DVC's page then loads nothing from the web)."""
    entry = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    assert entry["metrics"] == ["out/report/metrics"]
    assert entry["plots"] and all(isinstance(p, str) and p.endswith(".png") for p in entry["plots"])
    assert not any(isinstance(o, dict) for o in entry["outs"])              # nothing is `cache: false`


@pytest.mark.stage
def test_dvc_yaml_names_its_params_file_and_a_stage_without_config_watches_none(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    text = dvc_yaml(load_config("config/smoke.yaml"), "config/smoke.yaml")
    (tmp_path / "dvc.yaml").write_text(text)
    assert generated_for(tmp_path / "dvc.yaml") == "config/smoke.yaml"
    assert generated_for(tmp_path / "missing.yaml") is None
    for entry in yaml.safe_load(text)["stages"].values():
        assert entry.get("params", ["watched"]) != [{"config/smoke.yaml": []}]   # [] would mean the whole file


def test_dvc_yaml_refuses_a_root_outside_the_repository_in_one_line(tmp_path, monkeypatch):
    """DVC 3 tracks no output outside the repository (`dvc commit` fails, `dvc status` asserts):
    `spot dvc-yaml` refuses such a root before any job, saying what to do."""
    monkeypatch.chdir(REPO)
    cfg = load_config("config/smoke.yaml")
    cfg["root"] = str(tmp_path / "scratch")
    with pytest.raises(ValueError) as e:
        dvc_yaml(cfg, "config/smoke.yaml")
    assert str(e.value) == (f"config/smoke.yaml: root {tmp_path / 'scratch'} is outside the repository, where DVC "
                            "cannot track outputs (DVC 3 has no external outputs): give a root inside it, or run "
                            "Snakemake without DVC")
    monkeypatch.chdir(tmp_path)                      # Snakemake's end-of-run `dvc commit` leaves it alone
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("# Generated by `spot dvc-yaml --params p.yaml` ...\nstages: {}\n")
    (tmp_path / "p.yaml").write_text(f"root: {tmp_path.parent / 'scratch'}\n")
    assert commit_after_snakemake("p.yaml", []) == "dvc commit skipped (its root is outside the repository)"


def test_commit_after_snakemake_only_for_the_same_params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("# Generated by `spot dvc-yaml --params params.yaml` ...\nstages: {}\n")
    assert commit_after_snakemake("config/smoke.yaml", []) == \
        "dvc commit skipped (dvc.yaml is for params.yaml, this run for config/smoke.yaml)"
    monkeypatch.setenv("SPOT_DVC_COMMIT", "0")
    assert commit_after_snakemake("params.yaml", []) == "dvc commit skipped (SPOT_DVC_COMMIT=0)"


REPORT_ITEMS = yaml.safe_load((REPO / "workflow" / "report" / "items.yaml").read_text())


def test_report_items_are_declared_outputs_with_captions():
    for stage, items in REPORT_ITEMS.items():
        declared_files = STAGE[stage].files + STAGE[stage].plots + STAGE[stage].metrics
        for name, item in items.items():
            assert any(name == f or name.startswith(f + "/") for f in declared_files), name   # DVC versions it
            assert (REPO / "workflow" / "report" / item["caption"]).is_file(), item
            assert item["category"] and item["label"], item
            assert item.get("when", stage) in STAGE, item                                 # a stage's jobs decide


def test_snakemake_report_shows_the_results_with_captions(smoke_run, tmp_path):
    cwd = tmp_path / "repo"
    shutil.copytree(smoke_run[0], cwd, symlinks=True)
    snakemake(cwd, "--report", "report.html")
    page = (cwd / "report.html").read_text()
    assert "SPoT: Subpixel Placement of Tokens" in page and "spot-smoke" in page     # the workflow description
    root = cwd / "out" / "report"
    for name, item in REPORT_ITEMS["report"].items():
        assert item["label"] in page and f'"{item["category"]}"' in page, name
        if name.endswith(".png"):                                                    # the picture itself
            assert base64.b64encode((root / name).read_bytes()).decode() in page, name
    for png in root.rglob("*.png"):                                                  # every picture the run drew
        assert base64.b64encode(png.read_bytes()).decode() in page, png
    steps = yaml.safe_load((cwd / "config" / "smoke.yaml").read_text())["oracle"]["steps"]
    assert f"after each of the {steps} steps" in page                              # captions read the config
    studies = len(re.findall(r"^## \d+\. ", (root / "findings.md").read_text(), re.M))    # the case studies
    assert studies >= 5 and f"({studies}) " in page and f"({studies + 1}) " not in page
    tables = base64.b64encode((root / "tables.html").read_bytes()).decode()
    assert tables in page and "<table>" in (root / "tables.html").read_text()


def test_report_metric_rows_are_the_paper_table_keyed_by_padded_budget():
    import pandas as pd

    from spot.report.render import html_page
    from spot.report.summary import metric_rows
    results = pd.DataFrame([
        dict(backbone="b", prior="grid", oracle=False, budget=4, top1=0.5, knn=0.25, top1_init=None, top1_snapped=None),
        dict(backbone="b", prior="grid", oracle=False, budget=16, top1=0.75, knn=0.5, top1_init=None, top1_snapped=None),
        dict(backbone="b", prior="grid", oracle=True, budget=4, top1=0.9, knn=0.6, top1_init=0.5, top1_snapped=0.7)])
    trans = pd.DataFrame([dict(src="a", dst="b", budget=4, top1_transfer=0.8, gain=0.3),
                          dict(src="b", dst="b", budget=4, top1_transfer=0.9, gain=0.4)])
    assert metric_rows(results, trans) == {                     # percent, one decimal
        "b/grid.json": {"04": {"top1": 50.0, "knn": 25.0}, "16": {"top1": 75.0, "knn": 50.0}},
        "b/spot-on-snapped.json": {"04": {"top1": 70.0}},
        "b/spot-on.json": {"04": {"top1": 90.0, "knn": 60.0}},
        "b/transfer-from-a.json": {"04": {"top1": 80.0}}}
    page = html_page("# T\n\nSome **bold** <text>.\n\n| a | b |\n|---|---|\n| x | **1.00** |\n\n- item\n", "t <t>")
    assert page.startswith("<!DOCTYPE html>") and "<title>t &lt;t&gt;</title>" in page
    assert "<h1>T</h1>" in page and "<strong>bold</strong> &lt;text&gt;" in page and "<li>item</li>" in page
    assert re.search(r"<th>a</th>\s*<th>b</th>", page) and "<td><strong>1.00</strong></td>" in page


@pytest.mark.stage
def test_jobs_that_load_no_model_plan_their_inputs_without_timm(tmp_path):
    """Planning a job's input folders needs timm's pretrained configs: the first process reads timm
    and caches them (per timm version, in XDG_CACHE_HOME), later ones import neither timm nor
    torchvision, and plan the same folders."""
    probe = ("import sys; from spot.workflow.config import load_config; from spot.workflow.layout import Layout; "
             "from spot.workflow.stage_table import STAGE; cfg = load_config('params.yaml'); "
             "print(STAGE['report'].job_inputs(cfg, Layout('out'), {})['decoded'], "
             "'timm' in sys.modules or 'torchvision' in sys.modules)")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0][1] == "True" and runs[1] == [runs[0][0], "False"]
    (cache,) = (tmp_path / "spot").glob("timm-*-pretrained.json")
    import timm
    for model, g in json.loads(cache.read_text()).items():
        pre = timm.models.get_pretrained_cfg(model)
        assert g == dict(input_size=list(pre.input_size), interpolation=pre.interpolation, crop_pct=pre.crop_pct,
                         crop_mode=pre.crop_mode)


def test_a_job_covers_its_stages_budgets_and_no_job_has_none():
    cfg = load_config(REPO / "params.yaml")
    for s, w in all_jobs(cfg):
        folders = s.output_wildcards(cfg, w)
        assert folders and {tuple(f[k] for k in s.wildcards) for f in folders} == {tuple(w.values())}, s.name
    assert len(STAGE["evaluate"].all_output_wildcards(cfg)) == len(cfg["backbones"]) * len(cfg["eval"]["priors"]) * \
        len(cfg["eval"]["budgets"])
    cfg["placement"].update(budgets=[], transfer=[])                  # methods on, no budget: no job
    assert not [s.name for s, _ in all_jobs(cfg) if s.name in ("learned", "placer", "entropy", "placer-transfer")]


def test_a_job_whose_folder_another_process_writes_stops_before_writing_any(smoke_stages, tmp_path):
    """Another process holds the lock of the last folder of an evaluation job (8 folders: prior x
    budget): the job stops at once in one line naming that folder, and writes none of the others."""
    from spot.utils.io import writing
    _, cfg, root = smoke_stages
    params = linked_root(tmp_path, root, "shards", "saliency", "decoded", "backbones")
    last = tmp_path / "out" / "eval" / "spot-a" / cfg["eval"]["priors"][-1] / str(cfg["eval"]["budgets"][-1])
    with writing(last):
        r = subprocess.run([sys.executable, "-m", "spot.cli", "evaluate", "--backbone", "spot-a", "--params",
                            str(params)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"spot evaluate: error: another spot process is writing {last} (lock {last / '.lock'})", r.stderr[-2000:]
    assert not list((tmp_path / "out" / "eval").rglob("run.json"))
