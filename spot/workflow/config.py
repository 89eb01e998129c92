"""The configuration: a params file loaded, validated against the schema shipped with the package
(spot/workflow/schemas/params.schema.yaml), and completed with the schema's defaults, once. Every stage reads the result."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import jsonschema
import yaml

from spot.utils.text import one_line

SCHEMA = Path(__file__).resolve().parent / "schemas" / "params.schema.yaml"   # package data
TRAIN_MODEL = "vit_tiny_patch16_224"     # the timm architecture a `make: train` backbone builds on


def schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def resolve(node: dict, defs: dict) -> dict:
    """A schema node with its `$ref` (to `#/$defs/<name>`) replaced by the definition; keys beside
    the `$ref` (a description, another default) win."""
    return dict(defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}) \
        if "$ref" in node else node


def fill_defaults(value, node: dict, defs: dict) -> None:
    """Set every absent key of `value` that `node` (a schema) gives a `default`, recursively."""
    node = resolve(node, defs)
    if not isinstance(value, dict):
        return
    for key, sub in node.get("properties", {}).items():
        if key not in value and "default" in resolve(sub, defs):
            value[key] = copy.deepcopy(resolve(sub, defs)["default"])
        if key in value:
            fill_defaults(value[key], sub, defs)
    if isinstance(node.get("additionalProperties"), dict):
        for key in set(value) - set(node.get("properties", {})):
            fill_defaults(value[key], node["additionalProperties"], defs)


RETIRED = {                              # keys of older params files -> what to write instead
    "data.shard_count": "renamed data.images_per_shard (it counts the images in a shard, not the shards)",
    "data.synset_words": "no longer read: ImageNet class names come from timm.data.ImageNetInfo (remove the key)",
}


def check_numbers(value, key: str = "") -> None:
    """A one-line ValueError naming the first key of `value` (nested dicts and lists) holding NaN or an
    infinity: the schema's bounds hold for them (NaN is no less than any minimum)."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_numbers(v, f"{key}.{i}")
    elif isinstance(value, float) and not math.isfinite(value):
        spelled = ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
        raise ValueError(f"{key}: {spelled} is not a finite number")


def validate(cfg: dict, source: str = "params.yaml") -> dict:
    """Raise a one-line ValueError naming the first bad key of `cfg` (retired keys with what replaces
    them); fill defaults; return cfg."""
    for key, instead in RETIRED.items():
        section, _, name = key.partition(".")
        if isinstance(cfg.get(section), dict) and name in cfg[section]:
            raise ValueError(f"{source}: {key}: {instead}")
    try:
        check_numbers(cfg)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
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
    place = cfg["placement"]
    extra = set(place["budgets"]) - set(cfg["eval"]["budgets"]) if place["methods"] else set()
    if extra:
        raise ValueError(f"{source}: placement.budgets: {sorted(extra)} not in eval.budgets")
    if set(place["transfer"]) - set(place["budgets"]):
        raise ValueError(f"{source}: placement.transfer: {sorted(set(place['transfer']) - set(place['budgets']))} "
                         "not in placement.budgets")
    if place["methods"] and not place["budgets"]:
        raise ValueError(f"{source}: placement.budgets: empty, while placement.methods names {place['methods']}")
    model = cfg["saliency"]["model"]
    if model is not None and model not in cfg["backbones"]:
        raise ValueError(f"{source}: saliency.model: {model!r} is not a backbone of this file")
    if "model_salient" in cfg["eval"]["priors"] and model is None:
        raise ValueError(f"{source}: eval.priors: 'model_salient' needs saliency.model (the backbone making its maps)")
    if cfg["oracle"]["prior"] == "model_salient":
        raise ValueError(f"{source}: oracle.prior: 'model_salient' is for eval.priors only (use 'salient')")
    if "placer" in place["methods"] and place["placer"]["init"] == "learned" and "learned" not in place["methods"]:
        raise ValueError(f"{source}: placement.placer.init: 'learned' needs 'learned' in placement.methods")
    if 0 not in cfg["eval"]["prior_seeds"]:
        raise ValueError(f"{source}: eval.prior_seeds: must hold 0 (the reported draw of the priors' positions)")
    extra = set(cfg["replicates"]["placement_budgets"] or []) - set(place["budgets"])
    if extra:
        raise ValueError(f"{source}: replicates.placement_budgets: {sorted(extra)} not in placement.budgets")
    cfg["backbones"] = expand_seeds(cfg["backbones"], cfg["seed"], source)
    for spec in cfg["backbones"].values():
        if spec["make"] == "train":
            spec.setdefault("model", TRAIN_MODEL)
    return cfg


def expand_seeds(backbones: dict, seed: int, source: str) -> dict:
    """The backbones with each `seeds: [s0, s1, ...]` expanded: the backbone itself trains with s0,
    and a replicate `<name>-s<s>` (its own folders, jobs and MLflow runs; `replicate_of` the
    backbone) with each other seed, right after it. Every backbone gets its `seed` (default `seed`)."""
    out = {}
    for name, spec in backbones.items():
        seeds = spec.pop("seeds", None)
        if seeds is not None and "seed" in spec:
            raise ValueError(f"{source}: backbones.{name}: give seed or seeds, not both")
        spec.setdefault("seed", seeds[0] if seeds else seed)
        out[name] = spec
        for s in (seeds or [])[1:]:
            if f"{name}-s{s}" in backbones:
                raise ValueError(f"{source}: backbones.{name}-s{s}: the name of {name}'s replicate with seed {s}")
            out[f"{name}-s{s}"] = dict(copy.deepcopy(spec), seed=s, replicate_of=name)
    return out


def written_key(cfg: dict, key: str) -> str:
    """`key` as the params file spells it: a replicate's `backbones.<name>-s<s>...` is its backbone's."""
    parts = key.split(".")
    if parts[0] == "backbones" and len(parts) > 1 and cfg["backbones"].get(parts[1], {}).get("replicate_of"):
        parts[1] = cfg["backbones"][parts[1]]["replicate_of"]
    return ".".join(parts)


def read(path: str | Path) -> dict:
    """The YAML mapping in `path`, unvalidated; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({one_line(e)})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return cfg


def load_config(path: str | Path = "params.yaml") -> dict:
    """The validated configuration in `path`, defaults filled; one-line errors naming file and key."""
    return validate(read(path), str(path))
