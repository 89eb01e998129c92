"""params.yaml validation: every shipped config passes, a bad value stops with one line naming it; the
shipped params files are in the form DVC writes them, so `dvc exp run -S` changes one line."""
import copy
import difflib
import shutil

import pytest
import yaml

from spot.cli import main
from spot.workflow.config import load_config
from tests.conftest import REPO

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("path", ["params.yaml", "config/smoke.yaml", "config/imagenet.yaml"])
def test_shipped_configs_are_valid(path):
    cfg = load_config(REPO / path)
    assert cfg["oracle"]["prior"] in cfg["eval"]["priors"]


@pytest.mark.parametrize("path", ["params.yaml", "config/smoke.yaml", "config/imagenet.yaml"])
def test_dvc_exp_run_set_param_rewrites_one_line_of_each_params_file(path, tmp_path):
    """`dvc exp run -S <path>:oracle.steps=7` rewrites the file with DVC's own code (hydra overrides, ruamel
    round trip): only that line differs, and setting a value to what it is changes no byte."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls on the file

    before = (REPO / path).read_text()
    steps = yaml.safe_load(before)["oracle"]["steps"]
    for change, lines in ((f"oracle.steps={steps}", []), ("oracle.steps=7", [f"-  steps: {steps}", "+  steps: 7"]),
                          ("seed=3", ["-seed: 0", "+seed: 3"])):
        shutil.copy(REPO / path, tmp_path / "params.yaml")
        apply_overrides(tmp_path / "params.yaml", [change])
        diff = difflib.unified_diff(before.splitlines(), (tmp_path / "params.yaml").read_text().splitlines(),
                                    lineterm="", n=0)
        assert [d for d in diff if d[:1] in "+-" and d[:3] not in ("---", "+++")] == lines, change


def put(cfg, dotted, value):
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    if value is KeyError:
        del cfg[last]
    else:
        cfg[last] = value


def validate_with(tmp_path, capsys, key: str, value) -> tuple:
    """`spot validate` of the default params with `key` set to `value`: it exits 2; (params path, its stderr)."""
    cfg = copy.deepcopy(DEFAULT)
    put(cfg, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", "--params", str(path)]) == 2
    return path, capsys.readouterr().err.strip()


@pytest.mark.parametrize("key, value, message", [
    ("eval.budgets", [0, 4], "eval.budgets.0"),
    ("eval.priors", ["grid", "diagonal"], "eval.priors.1"),
    ("oracle.prior", "salient", "oracle.prior"),
    ("oracle.budgets", [4, 5], "oracle.budgets"),
    ("transfer.budgets", [7], "transfer.budgets"),
    ("device", "tpu", "device"),
    ("train.token_range", [49, 4], "train.token_range"),
    ("train.priors", ["uniform", "salient"], "train.priors.1"),          # a training draws no saliency maps
    ("train.epochs", KeyError, "epochs"),
    ("data.source", "cifar", "data.source"),
    ("backbones.spot.make", "download", "backbones.spot.make"),
    ("backbones.spot.init", "nope", "backbones.spot.init"),
    ("backbones.spot.init", "spot", "backbones.spot.init: init cycle spot -> spot"),
    ("backbones.spot.make", "fetch", "backbones.spot: 'model' is a required property"),
    ("data.splits", ["val", "test"], "data.splits: ['val', 'test'] lacks 'train'"),
    ("report.colour", "red", "report"),
])
def test_bad_value_is_named_in_one_line(tmp_path, capsys, key, value, message):
    cfg = copy.deepcopy(DEFAULT)
    if key == "oracle.prior":
        cfg["eval"]["priors"] = ["grid", "uniform"]
    put(cfg, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and message in err, err


def test_missing_and_unparsable_files(tmp_path, capsys):
    assert main(["validate", "--params", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["validate", "--params", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.yaml: not valid YAML" in err and "\n" not in err


@pytest.mark.parametrize("key, value, message", [
    ("backbones.spot.arch.num_heads", 5, "backbones.spot.arch"),
    ("backbones.spot.arch.embed_dimm", 96, "embed_dimm"),
    ("backbones.spot.arch.img_size", 30, "backbones.spot.arch.img_size"),
    ("eval.budgets", [4, 16, 100], "eval.budgets"),
    ("device", "cuda", "device"),
    ("data.root", "/nonexistent/fashion", "data.root"),
    ("backbones.spot.checkpoint", "/nonexistent/w.pth", "backbones.spot.checkpoint"),
    ("data.splits", ["train", "val", "val"], "data.splits"),
])
def test_validate_catches_what_would_fail_hours_later(tmp_path, capsys, key, value, message):
    """Without running anything: architectures, devices, budgets against the grid, files, splits."""
    import torch
    if key == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, err = validate_with(tmp_path, capsys, key, value)
    assert "\n" not in err and err.startswith("spot validate: error: ") and message in err, err


@pytest.mark.parametrize("key, value, spelled", [
    ("train.lr", float("nan"), ".nan"),
    ("oracle.lr", float("inf"), ".inf"),
    ("eval.knn.temperature", float("-inf"), "-.inf"),
    ("train.data_config.mean", [0.5, float("nan"), 0.5], ".nan"),
])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, capsys, key, value, spelled):
    """YAML's .nan and .inf pass every bound of the schema (NaN is no less than any minimum); they
    stop at validation, naming the key, not hours later as 'Invalid learning rate: nan'."""
    path, err = validate_with(tmp_path, capsys, key, value)
    assert spelled in path.read_text()
    assert err == f"spot validate: error: {path}: {key.replace('.mean', '.mean.1')}: {spelled} is not a finite number"


@pytest.mark.parametrize("old, value, pointer", [
    ("data.shard_count", 2000, "renamed data.images_per_shard"),
    ("data.synset_words", None, "no longer read: ImageNet class names come from timm.data.ImageNetInfo"),
])
def test_retired_keys_point_to_what_replaced_them(tmp_path, capsys, old, value, pointer):
    path, err = validate_with(tmp_path, capsys, old, value)
    assert "\n" not in err and err.startswith(f"spot validate: error: {path}: {old}: {pointer}"), err


def test_seeds_plan_a_replicate_per_seed_with_its_own_jobs(tmp_path):
    """params.yaml's `backbones.spot.seeds: [0, 1, 2]`: spot trains with seed 0, spot-s1 and spot-s2
    with 1 and 2, each with its own backbone, evaluate and oracle jobs and label-free placement at
    replicates.placement_budgets only; transfers and placer transfers reach each replicate from the
    other recipes' runs of the same draw (none with replicates.transfers: false); analyses leave them out;
    DVC watches the key the params file spells (backbones.spot). Every default backbone has 3 seeds:
    the findings speak of trained backbones only at the level of their training runs."""
    from collections import Counter

    from spot.workflow.dvc import dvc_yaml
    from spot.workflow.layout import Layout
    from spot.workflow.stage_table import STAGE, all_jobs
    cfg = load_config(REPO / "params.yaml")
    assert DEFAULT["backbones"]["spot"]["seeds"] == [0, 1, 2]
    assert {b: (s["seed"], s["replicate_of"]) for b, s in cfg["backbones"].items() if s.get("replicate_of")} == \
        {"spot-s1": (1, "spot"), "spot-s2": (2, "spot"), "spot-small-s2": (2, "spot-small"),
         "spot-small-s3": (3, "spot-small"), "vit-grid-s1": (1, "vit-grid"), "vit-grid-s2": (2, "vit-grid")}
    assert cfg["backbones"]["spot"]["seed"] == 0 and cfg["backbones"]["spot-small"]["seed"] == 1
    jobs = Counter((s.name, w.get("backbone") or w.get("dst")) for s, w in all_jobs(cfg))
    for name in ("backbone", "evaluate", "oracle-gather"):
        assert jobs[name, "spot-s1"] == jobs[name, "spot-s2"] == jobs[name, "spot"] == 1
    for name in ("learned", "placer", "entropy"):
        assert jobs[name, "spot"] == len(cfg["placement"]["budgets"]) and jobs[name, "spot-s1"] == 1
    assert not {"spot-s1", "spot-s2"} & {b for (name, b) in jobs if name == "analyze"}
    assert jobs["transfer", "spot-s1"] == 1 and jobs["placer-transfer", "spot-s2"] == 2
    pairs = {(w["src"], w["dst"]) for s, w in all_jobs(cfg) if s.name == "placer-transfer"}
    assert ("spot", "spot-small-s3") in pairs and ("spot", "spot-s1") not in pairs
    for b, seeds in (("spot", [0, 1, 2]), ("spot-s1", [0])):                   # a replicate draws its priors once
        assert STAGE["evaluate"].arguments(cfg, dict(backbone=b)).prior_seeds == seeds
    transfer = STAGE["transfer"]
    src_run = transfer.input_folders(cfg, Layout("out"), {"dst": "spot-small-s3", "src": "spot", "budget": 4})["oracle"]
    assert src_run == Layout("out")("oracle", backbone="spot-s2", budget=4)          # the third run of each
    alone = copy.deepcopy(DEFAULT)
    alone["replicates"]["transfers"] = False
    (tmp_path / "alone.yaml").write_text(yaml.safe_dump(alone))
    cut = load_config(tmp_path / "alone.yaml")
    assert not {"spot-s1", "spot-small-s2"} & {w.get("dst") for s, w in all_jobs(cut) if s.name.endswith("transfer")}
    stages = yaml.safe_load(dvc_yaml(cfg))["stages"]
    assert stages["backbone_spot-s2"]["params"] == sorted(["backbones.spot", "device", "seed", "train"])
    both = copy.deepcopy(DEFAULT)
    both["backbones"]["spot"]["seed"] = 0
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(ValueError, match="backbones.spot: give seed or seeds, not both"):
        load_config(tmp_path / "p.yaml")


def test_schema_defaults_are_filled_and_never_shared(tmp_path):
    """snakemake.utils.validate sets the schema's defaults (those beside a `$ref` too) with the
    schema's own objects: every one is the config's own, so changing one backbone's changes no other's."""
    cfg = copy.deepcopy(DEFAULT)
    for section in ("eval", "oracle"):
        cfg[section].pop("compile", None)
    cfg["train"].pop("data_config", None)
    cfg["backbones"]["fetched"] = {"make": "fetch", "model": "vit_tiny_patch16_224"}
    cfg["backbones"]["other"] = {"make": "fetch", "model": "vit_tiny_patch16_224"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg["eval"]["compile"] is None and cfg["oracle"]["compile"] is None and cfg["train"]["data_config"] == {}
    a, b = cfg["backbones"]["fetched"], cfg["backbones"]["other"]
    assert a["arch"] == b["arch"] == a["data_config"] == {} and a["checkpoint"] is None and a["tokens"] == "spot"
    assert a["arch"] is not b["arch"] and a["data_config"] is not b["data_config"]
