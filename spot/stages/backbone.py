"""Stage backbone: fetch a timm model (pretrained weights or a local state-dict file) or train one."""
from __future__ import annotations

from pathlib import Path

from spot.stages import Record
from spot.training.backbones import fetch
from spot.training.train import train


def run(cfg: dict, inputs: dict, out: Path, backbone: str, state: Path, resume: bool | None = None) -> Record:
    """`backbones.<backbone>.make` says which; training checkpoints live in `state` (see `train`)."""
    spec = cfg["backbones"][backbone]
    if spec["make"] == "fetch":
        meta = fetch(backbone, out, model=spec["model"], checkpoint=spec["checkpoint"], data_config=spec["data_config"],
                     **spec["arch"])
        return Record(dict(num_params=meta["num_params"]), ["backbone.json"])
    final = train(backbone, spec, cfg["train"], inputs["shards"], inputs["decoded"], out, state,
                  init=inputs.get("init"), seed=spec["seed"], device=cfg["device"], resume=resume)
    return Record({k: v for k, v in final.items() if k != "epoch"}, ["backbone.json", "metrics.csv", "metrics.json"])
