"""The stage table: dvc.yaml, the CLI and the Snakemake rules come from it and agree with the code."""
import ast
import inspect
import re

import pytest
import yaml

from spot.cli import parser
from spot.config import load_config
from spot.dvc_yaml import dvc_yaml, present
from spot.layout import FOLDERS
from spot.pipeline import STAGES, all_jobs, code_deps, declared
from tests.conftest import REPO, snakemake

CONFIGS = ["params.yaml", "config/smoke.yaml"]


def test_committed_dvc_yaml_is_the_generated_one(monkeypatch):
    monkeypatch.chdir(REPO)
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(load_config("params.yaml"), "params.yaml"), \
        "dvc.yaml is stale: run `spot dvc-yaml`"


@pytest.mark.parametrize("path", CONFIGS)
def test_dvc_stages_are_the_jobs_with_their_params_and_commands(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    stages = yaml.safe_load(dvc_yaml(cfg, path))["stages"]
    jobs = all_jobs(cfg)
    assert len(stages) == len(jobs)
    for (stage, w), (name, entry) in zip(jobs, stages.items(), strict=True):
        keys = entry["params"] if path == "params.yaml" else entry["params"][0][path]
        assert sorted(keys) == sorted({present(yaml.safe_load(open(path)), k) for k in stage.params(cfg, w)}), name
        assert entry["cmd"] == stage.command(path, w)
        assert set(code_deps(stage)) <= set(entry["deps"])


@pytest.mark.parametrize("path", CONFIGS)
def test_snakemake_runs_the_same_commands_as_dvc(path, tmp_path):
    """Every job of a dry run is a DVC stage's command (jobs with their logs redirected)."""
    from tests.conftest import copy_repo
    cwd = copy_repo(tmp_path)
    r = snakemake(cwd, "-n", "-p", config=path)
    commands = [m.split(" 2> ")[0].strip() for m in re.findall(r"Shell command: (spot .*)$", r.stdout + r.stderr, re.M)]
    cfg = load_config(cwd / path)
    dvc = [e["cmd"] for e in yaml.safe_load(dvc_yaml(cfg, path) if path != "params.yaml" else
                                            (cwd / "dvc.yaml").read_text())["stages"].values()]
    assert sorted(commands) == sorted(dvc)


def test_code_deps_are_the_modules_a_stage_imports():
    deps = {s.name: set(code_deps(s)) for s in STAGES}
    assert {"spot/stages/evaluate.py", "spot/priors.py", "spot/model.py", "spot/tokenizer.py", "spot/knn.py",
            "spot/data/loading.py", "spot/backbones.py"} <= deps["evaluate"]
    assert {"spot/oracle.py", "spot/priors.py"} <= deps["oracle"]
    assert {"spot/train.py", "spot/priors.py", "spot/checkpoint.py"} <= deps["backbone"]
    assert "spot/stages/report.py" in deps["report"] and "spot/oracle.py" not in deps["report"]
    assert not any(p.startswith("spot/stages/report") for s, d in deps.items() if s != "report" for p in d)
    assert all("spot/pipeline.py" not in d and "spot/cli.py" not in d for d in deps.values())


def test_a_stage_imports_no_other_stage():
    for path in (REPO / "spot" / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
                [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.startswith("spot.stages") or n in ("spot.pipeline", "spot.cli")], path


def test_stage_functions_take_the_wildcards_and_options_the_table_names():
    for s in STAGES:
        args = set(inspect.signature(s.function()).parameters)
        extra = {o.replace("-", "_") for o in s.options} | ({"state"} if s.state else set())
        assert args == {"cfg", "inputs", "out", *s.wildcards} | extra, s.name
        assert set(re.findall(r"{(\w+)}", FOLDERS[s.output])) == set(s.wildcards), s.name


def test_cli_has_one_command_per_stage_with_its_wildcards():
    ap = parser()
    sub = next(a for a in ap._actions if a.dest == "command").choices
    for s in STAGES:
        required = {a.dest for a in sub[s.name]._actions if a.required}
        assert required == set(s.wildcards), s.name


def test_a_stage_sees_only_the_config_it_declares():
    cfg = load_config(REPO / "params.yaml")
    view = declared(cfg, ["eval.knn", "seed"])
    assert view["eval"]["knn"]["k"] == cfg["eval"]["knn"]["k"] and view["seed"] == cfg["seed"]
    with pytest.raises(KeyError, match="eval.batch_size"):
        view["eval"]["batch_size"]
    with pytest.raises(KeyError, match="'oracle'"):
        view["oracle"]
