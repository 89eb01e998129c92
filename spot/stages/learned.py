"""Stage learned: N token positions shared by every image, fitted on train through the frozen
backbone (labels while fitting only), then evaluated on val like a prior."""
from __future__ import annotations

from pathlib import Path

from spot.core.devices import resolve_device
from spot.data.decoded import Decoded
from spot.methods.learned_prior import fit_global_prior
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.training.evaluation import SplitBatches, evaluate_placement
from spot.utils import live
from spot.utils.io import write_json


def run(p, inputs: dict, out: Path, backbone: str, budget: int) -> Record:
    """Fit `budget` positions (`placement.learned`: steps, lr, init prior) on batches of
    `placement.batch_size` train images, then evaluate them as `spot.training.evaluation.evaluate_placement`
    does. Writes positions.json (positions (budget, 2) (y, x) in [0, 1], loss per step),
    metrics.json (with extra_flops 0: shared positions cost nothing at inference),
    predictions.parquet and bank.npz."""
    device = resolve_device(p.device)
    model = load_backbone(inputs["backbone"], device)
    data = Decoded(inputs["decoded"], model.data_config)
    losses = []

    def log(step, m):
        losses.append(round(m["loss"], 6))
        live.log_metrics({"learned/loss": m["loss"]}, step)

    fit = p.learned
    pos = fit_global_prior(model, SplitBatches(data, "train", p.fit_batch_size, device), n=budget,
                           steps=fit["steps"], lr=fit["lr"], init=fit["init"], seed=p.seed, log=log)
    write_json(out / "positions.json", dict(positions=pos.tolist(), loss=losses))
    metrics = evaluate_placement(model, data, lambda b, split: pos.expand(len(b.keys), -1, -1), out,
                                 batch_size=p.batch_size, knn=p.knn, device=device,
                                 job=f"learned {backbone}/{budget}")
    write_json(out / "metrics.json", metrics | dict(extra_flops=0.0))
    return Record(dict(top1=metrics["top1"], knn=metrics["knn"], extra_flops=0.0),
                  ["positions.json", "metrics.json", "predictions.parquet"])
