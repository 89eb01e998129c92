"""params.yaml validation: every shipped config passes, a bad value stops with one line naming it."""
import copy

import pytest
import yaml

from spot.cli import main
from spot.config import load_config
from tests.conftest import REPO

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("path", ["params.yaml", "config/smoke.yaml", "config/imagenet.yaml"])
def test_shipped_configs_are_valid(path):
    cfg = load_config(REPO / path)
    assert cfg["oracle"]["prior"] in cfg["eval"]["priors"]


def put(cfg, dotted, value):
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    if value is KeyError:
        del cfg[last]
    else:
        cfg[last] = value


@pytest.mark.parametrize("key, value, message", [
    ("eval.budgets", [0, 4], "eval.budgets.0"),
    ("eval.priors", ["grid", "diagonal"], "eval.priors.1"),
    ("oracle.prior", "salient", "oracle.prior"),
    ("oracle.budgets", [4, 5], "oracle.budgets"),
    ("transfer.budgets", [7], "transfer.budgets"),
    ("device", "tpu", "device"),
    ("train.token_range", [49, 4], "train.token_range"),
    ("train.epochs", KeyError, "epochs"),
    ("data.source", "cifar", "data.source"),
    ("backbones.spot.make", "download", "backbones.spot.make"),
    ("backbones.spot.init", "nope", "backbones.spot.init"),
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
    cfg = copy.deepcopy(DEFAULT)
    put(cfg, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("spot validate: error: ") and message in err, err
