"""Stage learned: N token positions shared by every image, fitted on train through the frozen
backbone (labels while fitting only), then evaluated on val like a prior."""
from __future__ import annotations

from pathlib import Path

from spot import live
from spot.backbones import load_backbone
from spot.data.decoded import Decoded
from spot.evaluation import SplitBatches, evaluate_placement
from spot.learned_prior import fit_global_prior
from spot.outputs import Record
from spot.utils import resolve_device, write_json


def run(cfg: dict, inputs: dict, out: Path, backbone: str, budget: int) -> Record:
    """Fit `budget` positions (`placement.learned`: steps, lr, init prior) on batches of
    `placement.batch_size` train images, then evaluate them as `spot.evaluation.evaluate_placement`
    does. Writes positions.json (positions (budget, 2) (y, x) in [0, 1], loss per step),
    metrics.json (with extra_flops 0: shared positions cost nothing at inference),
    predictions.parquet and bank.npz."""
    p, device = cfg["placement"], resolve_device(cfg["device"])
    model = load_backbone(inputs["backbone"], device)
    data = Decoded(inputs["decoded"], model.data_config)
    losses = []

    def log(step, m):
        losses.append(round(m["loss"], 6))
        live.log_metrics({"learned/loss": m["loss"]}, step)

    pos = fit_global_prior(model, SplitBatches(data, "train", p["batch_size"], device), n=budget,
                           steps=p["learned"]["steps"], lr=p["learned"]["lr"], init=p["learned"]["init"],
                           seed=cfg["seed"], log=log)
    write_json(out / "positions.json", dict(positions=pos.tolist(), loss=losses))
    metrics = evaluate_placement(model, data, lambda b, split: pos.expand(len(b.keys), -1, -1), out,
                                 batch_size=cfg["eval"]["batch_size"], knn=cfg["eval"]["knn"], device=device,
                                 job=f"learned {backbone}/{budget}")
    write_json(out / "metrics.json", metrics | dict(extra_flops=0.0))
    return Record(dict(top1=metrics["top1"], knn=metrics["knn"], extra_flops=0.0),
                  ["positions.json", "metrics.json", "predictions.parquet"])
