"""Stage placer-transfer: the placer trained with backbone `src` placing the tokens of backbone `dst`."""
from __future__ import annotations

from pathlib import Path

import torch

from spot.core.devices import resolve_device
from spot.data.decoded import Decoded
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.training.evaluation import evaluate_placement
from spot.training.placer_files import load_placer
from spot.utils.io import read_json, write_json


def run(p, inputs: dict, out: Path, src: str, dst: str, budget: int) -> Record:
    """Evaluate `dst` with `budget` tokens placed by `src`'s placer (`spot.training.evaluation.evaluate_placement`),
    beside `dst`'s own placer. Writes metrics.json (top1, knn, top1_own: dst's own placer,
    gain = top1 - top1_own), predictions.parquet, bank.npz."""
    device = resolve_device(p.device)
    model, placer = load_backbone(inputs["backbone"], device), load_placer(inputs["placer"], device)
    if placer.n != budget:
        raise ValueError(f"the placer in {inputs['placer']} places {placer.n} tokens, not {budget}")

    @torch.no_grad()
    def place(b, split):
        return placer(b.images.to(device))

    metrics = evaluate_placement(model, Decoded(inputs["decoded"], model.data_config), place, out,
                                 batch_size=p.batch_size, knn=p.knn, device=device,
                                 job=f"placer {src} -> {dst}/{budget}")
    metrics["top1_own"] = read_json(inputs["own"] / "metrics.json")["top1"]
    metrics["gain"] = metrics["top1"] - metrics["top1_own"]
    write_json(out / "metrics.json", metrics)
    return Record(dict(top1=metrics["top1"], knn=metrics["knn"], gain=metrics["gain"]),
                  ["metrics.json", "predictions.parquet"])
