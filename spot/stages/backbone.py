"""Stage backbone: fetch a timm model (pretrained weights or a local state-dict file) or train one."""
from __future__ import annotations

from pathlib import Path

from spot.stages import Record
from spot.training.backbones import Spec, fetch
from spot.training.train import train


def run(p, inputs: dict, out: Path, backbone: str, state: Path, resume: bool | None = None) -> Record:
    """`p.config` (`backbones.<backbone>`) says which, its `make`; training checkpoints live in `state` (see `train`)."""
    config = p.config
    spec = Spec.of(backbone, config, getattr(p, "train", None))      # `train`: declared for a trained one only
    if not spec.trained:
        meta = fetch(backbone, out, model=spec.model, checkpoint=config["checkpoint"], data_config=spec.data_config,
                     **spec.kwargs())
        return Record(dict(num_params=meta["num_params"]), ["backbone.json"])
    final = train(backbone, spec, config["tokens"], p.train, inputs["shards"], inputs["decoded"], out, state,
                  init=inputs.get("init"), seed=config["seed"], device=p.device, resume=resume)
    return Record({k: v for k, v in final.items() if k != "epoch"}, ["backbone.json", "metrics.csv", "metrics.json"])
