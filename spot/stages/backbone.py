"""Stage backbone: fetch a timm model (pretrained weights or a local state-dict file) or train one."""
from __future__ import annotations

from pathlib import Path

from spot.stages import Record
from spot.training.backbones import backbone_spec, fetch
from spot.training.train import train


def run(cfg: dict, inputs: dict, out: Path, backbone: str, state: Path, resume: bool | None = None) -> Record:
    """`backbones.<backbone>.make` says which; training checkpoints live in `state` (see `train`)."""
    config, spec = cfg["backbones"][backbone], backbone_spec(cfg, backbone)
    if not spec.trained:
        meta = fetch(backbone, out, model=spec.model, checkpoint=config["checkpoint"], data_config=spec.data_config,
                     **spec.kwargs())
        return Record(dict(num_params=meta["num_params"]), ["backbone.json"])
    final = train(backbone, spec, config["tokens"], cfg["train"], inputs["shards"], inputs["decoded"], out, state,
                  init=inputs.get("init"), seed=config["seed"], device=cfg["device"], resume=resume)
    return Record({k: v for k, v in final.items() if k != "epoch"}, ["backbone.json", "metrics.csv", "metrics.json"])
