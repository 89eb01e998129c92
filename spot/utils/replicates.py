"""The training runs of a config's backbones: a primary backbone and its replicates (`backbones.<name>.seeds`,
expanded by `spot.workflow.config.expand_seeds` into `<name>-s<seed>` with `replicate_of`)."""
from __future__ import annotations


def primaries(cfg: dict) -> list[str]:
    """The backbones that replicate no other, in the config's order."""
    return list(training_runs(cfg["backbones"]))


def training_runs(backbones: dict) -> dict[str, list[str]]:
    """Each primary backbone of `backbones` (the config's) -> its training runs: itself, then its replicates in
    seed order."""
    out: dict[str, list[str]] = {b: [] for b, spec in backbones.items() if not spec.get("replicate_of")}
    for b, spec in backbones.items():
        out[spec.get("replicate_of") or b].append(b)
    return out


def paired_runs(cfg: dict) -> list[str]:
    """The backbones that transfers reach: the primaries, and with `replicates.transfers` the k-th
    replicates of every backbone for each k that all of them have (a transfer pairs runs by draw)."""
    runs = training_runs(cfg["backbones"])
    depth = min(map(len, runs.values())) if cfg["replicates"]["transfers"] else 1
    return [r for b in runs for r in runs[b][:depth]]


def same_draw(cfg: dict, recipe: str, like: str) -> str:
    """The training run of primary backbone `recipe` drawn as `like` is among its own (the k-th of each)."""
    runs = training_runs(cfg["backbones"])
    return runs[recipe][runs[cfg["backbones"][like].get("replicate_of") or like].index(like)]
