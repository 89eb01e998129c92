"""params.yaml: load and validate against workflow/schemas/params.schema.yaml."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "params.schema.yaml"


def validate(cfg: dict, source: str = "params.yaml") -> dict:
    """Raise a one-line ValueError naming the first bad key of `cfg`; fill defaults; return cfg."""
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"{source}: {where}: {e.message}")
    cfg.setdefault("root", "out")
    for name, spec in cfg["backbones"].items():
        need = "model" if spec["make"] == "fetch" else None
        if need and need not in spec:
            raise ValueError(f"{source}: backbones.{name}: make 'fetch' needs 'model' (a timm model name)")
        if spec["make"] == "train" and "arch" not in spec and "init" not in spec:
            raise ValueError(f"{source}: backbones.{name}: make 'train' needs 'arch' or 'init'")
        if spec.get("init") and spec["init"] not in cfg["backbones"]:
            raise ValueError(f"{source}: backbones.{name}.init: {spec['init']!r} is not a backbone of this file")
    lo, hi = cfg["train"]["token_range"]
    if lo > hi:
        raise ValueError(f"{source}: train.token_range: {lo} > {hi}")
    if cfg["oracle"]["prior"] not in cfg["eval"]["priors"]:
        raise ValueError(f"{source}: oracle.prior: {cfg['oracle']['prior']!r} must be one of eval.priors "
                         "(its evaluation supplies the kNN bank)")
    for key, within in (("oracle", "eval"), ("transfer", "oracle")):
        extra = set(cfg[key]["budgets"]) - set(cfg[within]["budgets"])
        if extra:
            raise ValueError(f"{source}: {key}.budgets: {sorted(extra)} not in {within}.budgets")
    return cfg


def load_config(path: str | Path = "params.yaml") -> dict:
    """The validated configuration in `path`; FileNotFoundError / ValueError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return validate(cfg, str(path))
