"""The configuration: a params file loaded, validated against workflow/schemas/params.schema.yaml,
and completed with the schema's defaults, once. Every stage reads the result."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "params.schema.yaml"
TRAIN_MODEL = "vit_tiny_patch16_224"     # the timm architecture a `make: train` backbone builds on


def schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def fill_defaults(value, node: dict, defs: dict) -> None:
    """Set every absent key of `value` that `node` (a schema) gives a `default`, recursively."""
    node = defs[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node
    if not isinstance(value, dict):
        return
    for key, sub in node.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            fill_defaults(value[key], sub, defs)
    if isinstance(node.get("additionalProperties"), dict):
        for key in set(value) - set(node.get("properties", {})):
            fill_defaults(value[key], node["additionalProperties"], defs)


def validate(cfg: dict, source: str = "params.yaml") -> dict:
    """Raise a one-line ValueError naming the first bad key of `cfg`; fill defaults; return cfg."""
    s = schema()
    errors = sorted(jsonschema.Draft202012Validator(s).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"{source}: {where}: {e.message}")
    for name, spec in cfg["backbones"].items():
        if spec["make"] == "fetch" and "model" not in spec:
            raise ValueError(f"{source}: backbones.{name}: make 'fetch' needs 'model' (a timm model name)")
        if spec["make"] == "train" and "arch" not in spec and not spec.get("init"):
            raise ValueError(f"{source}: backbones.{name}: make 'train' needs 'arch' or 'init'")
        if spec.get("init") and spec["init"] not in cfg["backbones"]:
            raise ValueError(f"{source}: backbones.{name}.init: {spec['init']!r} is not a backbone of this file")
    lo, hi = cfg["train"]["token_range"]
    if lo > hi:
        raise ValueError(f"{source}: train.token_range: {lo} > {hi}")
    if cfg["oracle"]["prior"] not in cfg["eval"]["priors"]:
        raise ValueError(f"{source}: oracle.prior: {cfg['oracle']['prior']!r} must be one of eval.priors "
                         "(its evaluation supplies the start positions and the kNN bank)")
    for key, within in (("oracle", "eval"), ("transfer", "oracle")):
        extra = set(cfg[key]["budgets"]) - set(cfg[within]["budgets"])
        if extra:
            raise ValueError(f"{source}: {key}.budgets: {sorted(extra)} not in {within}.budgets")
    fill_defaults(cfg, s, s.get("$defs", {}))
    for spec in cfg["backbones"].values():
        spec.setdefault("seed", cfg["seed"])
        if spec["make"] == "train":
            spec.setdefault("model", TRAIN_MODEL)
    return cfg


def read(path: str | Path) -> dict:
    """The YAML mapping in `path`, unvalidated; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return cfg


def load_config(path: str | Path = "params.yaml") -> dict:
    """The validated configuration in `path`, defaults filled; one-line errors naming file and key."""
    return validate(read(path), str(path))
