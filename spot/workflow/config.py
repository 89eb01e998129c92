"""The configuration: a params file loaded, validated and completed with the schema's defaults, once.
Every stage reads the result.

Where each kind of check lives (each in one place, none done twice):
- the schema (spot/workflow/schemas/params.schema.yaml, through `snakemake.utils.validate`): types,
  ranges, enums, required keys and defaults; the two defaults that depend on other keys come after
  it (a backbone's `seed`: the top-level one, `expand_seeds`; a `make: train` backbone's `model`:
  `TRAIN_MODEL`, set last so that every job's params keep their key order, a rerun trigger);
- `validate`: what the schema misreads (retired keys, NaN and infinities) and `relations`, what
  relates keys to each other (a budget list within another, `init` naming a backbone, ...). Every
  job calls it (`load_config`), so one started by hand stops on one line before any work;
- `spot.workflow.preflight`: what needs this machine (devices, data folders, checkpoints, timm
  architectures and the budgets they fit), once before a run (`spot validate`, Snakemake)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from spot.utils.text import one_line
from spot.workflow.declaration import lookup

SCHEMA = Path(__file__).resolve().parent / "schemas" / "params.schema.yaml"   # package data
TRAIN_MODEL = "vit_tiny_patch16_224"     # the timm architecture a `make: train` backbone builds on

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


def unshared(value):
    """`value` with every dict and list its own: the schema sets its default objects themselves."""
    if isinstance(value, dict):
        return {k: unshared(v) for k, v in value.items()}
    return [unshared(v) for v in value] if isinstance(value, list) else value


def apply_schema(cfg: dict) -> None:
    """Validate `cfg` against the schema and set its defaults in place; a one-line ValueError
    '<dotted.key>: <message>' for the first error."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate as snakemake_validate
    try:
        snakemake_validate(cfg, str(SCHEMA), set_default=True)
    except WorkflowError as e:
        bad = e.__context__                                  # the jsonschema ValidationError
        where = ".".join(str(p) for p in bad.absolute_path) or "(top level)"
        why = f"{bad.instance} lacks {bad.validator_value['const']!r}" if bad.validator == "contains" else bad.message
        raise ValueError(f"{where}: {why}") from None
    cfg.update(unshared(cfg))


def relations(cfg: dict):
    """(dotted key, problem) for each relation between keys of the schema-valid `cfg` that fails."""
    backbones, place, model = cfg["backbones"], cfg["placement"], cfg["saliency"]["model"]
    for name, spec in backbones.items():
        if spec["make"] == "train" and not spec["arch"] and not spec["init"]:
            yield f"backbones.{name}", "make 'train' needs 'arch' or 'init'"
        if spec["init"] and spec["init"] not in backbones:
            yield f"backbones.{name}.init", f"{spec['init']!r} is not a backbone of this file"
    for name in backbones:
        chain = [name]
        while (init := backbones[chain[-1]]["init"]) and backbones[chain[-1]]["make"] == "train":
            if init in chain:
                yield f"backbones.{name}.init", f"init cycle {' -> '.join([*chain, init])}"
                break
            chain.append(init)
    lo, hi = cfg["train"]["token_range"]
    if lo > hi:
        yield "train.token_range", f"{lo} > {hi}"
    if cfg["oracle"]["prior"] not in cfg["eval"]["priors"]:
        yield "oracle.prior", (f"{cfg['oracle']['prior']!r} must be one of eval.priors "
                               "(its evaluation supplies the start positions and the kNN bank)")
    if cfg["oracle"]["prior"] == "model_salient":
        yield "oracle.prior", "'model_salient' is for eval.priors only (use 'salient')"
    subsets = [("oracle.budgets", "eval.budgets"), ("transfer.budgets", "oracle.budgets")] + \
        [("placement.budgets", "eval.budgets")] * bool(place["methods"]) + \
        [("placement.transfer", "placement.budgets"), ("replicates.placement_budgets", "placement.budgets")]
    for key, within in subsets:
        if extra := set(lookup(cfg, key) or []) - set(lookup(cfg, within)):
            yield key, f"{sorted(extra)} not in {within}"
    if place["methods"] and not place["budgets"]:
        yield "placement.budgets", f"empty, while placement.methods names {place['methods']}"
    if "placer" in place["methods"] and place["placer"]["init"] == "learned" and "learned" not in place["methods"]:
        yield "placement.placer.init", "'learned' needs 'learned' in placement.methods"
    if model is not None and model not in backbones:
        yield "saliency.model", f"{model!r} is not a backbone of this file"
    if "model_salient" in cfg["eval"]["priors"] and model is None:
        yield "eval.priors", "'model_salient' needs saliency.model (the backbone making its maps)"
    if 0 not in cfg["eval"]["prior_seeds"]:
        yield "eval.prior_seeds", "must hold 0 (the reported draw of the priors' positions)"


def validate(cfg: dict, source: str = "params.yaml") -> dict:
    """Raise a one-line ValueError '<source>: <dotted.key>: <problem>' for the first problem of `cfg`
    (a retired key names what replaced it); fill defaults and expand seeds in place; return cfg."""
    try:
        for key, instead in RETIRED.items():
            section, _, name = key.partition(".")
            if isinstance(cfg.get(section), dict) and name in cfg[section]:
                raise ValueError(f"{key}: {instead}")
        check_numbers(cfg)
        apply_schema(cfg)
        for key, problem in relations(cfg):
            raise ValueError(f"{key}: {problem}")
        cfg["backbones"] = expand_seeds(cfg["backbones"], cfg["seed"])
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    for spec in cfg["backbones"].values():
        if spec["make"] == "train":
            spec.setdefault("model", TRAIN_MODEL)
    return cfg


def expand_seeds(backbones: dict, seed: int) -> dict:
    """The backbones with each `seeds: [s0, s1, ...]` expanded: the backbone itself trains with s0,
    and a replicate `<name>-s<s>` (its own folders, jobs and MLflow runs; `replicate_of` the
    backbone) with each other seed, right after it. Every backbone gets its `seed` (default `seed`)."""
    out = {}
    for name, spec in backbones.items():
        seeds = spec.pop("seeds", None)
        if seeds is not None and "seed" in spec:
            raise ValueError(f"backbones.{name}: give seed or seeds, not both")
        spec.setdefault("seed", seeds[0] if seeds else seed)
        out[name] = spec
        for s in (seeds or [])[1:]:
            if f"{name}-s{s}" in backbones:
                raise ValueError(f"backbones.{name}-s{s}: the name of {name}'s replicate with seed {s}")
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
