"""Stage placer: a small network that places N tokens per image from a low-resolution copy of it,
trained on train through the frozen backbone, evaluated on val; its inference cost is stated."""
from __future__ import annotations

from pathlib import Path

import torch

from spot.core.cost import relative_flops
from spot.core.devices import resolve_device
from spot.data.decoded import Decoded
from spot.methods.learned_prior import initial_positions
from spot.methods.placer import Placer, train_placer
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.training.evaluation import SplitBatches, evaluate_placement
from spot.training.placer_files import save_placer
from spot.utils import live
from spot.utils.io import read_json, write_json


def run(p, inputs: dict, out: Path, backbone: str, budget: int) -> Record:
    """Train a `spot.methods.placer.Placer` for `budget` tokens (`placement.placer`: steps, lr, in_size,
    width; it starts at the learned global prior of this backbone and budget when `init` is
    'learned', else at that prior's positions) on batches of `placement.batch_size` train images
    with the classification loss, then evaluate it (`spot.training.evaluation.evaluate_placement`). Writes
    placer.safetensors + placer.json (`spot.training.placer_files.save_placer`), metrics.json (with extra_flops:
    the placer's FLOPs over the backbone's forward at `budget` tokens), predictions.parquet, bank.npz."""
    settings, device = p.placer, resolve_device(p.device)
    model = load_backbone(inputs["backbone"], device)
    data = Decoded(inputs["decoded"], model.data_config)
    x = next(data.batches("val", 16, device=device)).images.to(device)     # also the images the cost is counted on
    init = (torch.tensor(read_json(inputs["learned"] / "positions.json")["positions"]) if settings["init"] == "learned"
            else initial_positions(settings["init"], budget, model.img_size, model.k, p.seed))
    placer = Placer(budget, in_chans=x.shape[1], in_size=settings["in_size"], width=settings["width"],
                    init=init, seed=p.seed).to(device)
    losses = train_placer(model, placer, SplitBatches(data, "train", p.fit_batch_size, device),
                          steps=settings["steps"], lr=settings["lr"],
                          log=lambda step, m: live.log_metrics({"placer/loss": m["loss"]}, step))
    save_placer(placer, out, meta=dict(backbone=backbone, budget=budget, loss=[round(v, 6) for v in losses.tolist()],
                                       **{f"placer.{k}": v for k, v in settings.items()}))

    @torch.no_grad()
    def place(b, split):
        return placer(b.images.to(device))

    metrics = evaluate_placement(model, data, place, out, batch_size=p.batch_size, knn=p.knn,
                                 device=device, job=f"placer {backbone}/{budget}")
    with torch.no_grad():
        cost = relative_flops(lambda: model(x, placer(x)), model, x, placer(x))
    metrics |= dict(extra_flops=cost["extra"], placer_flops=(cost["flops"] - cost["backbone_flops"]) / len(x),
                    backbone_flops=cost["backbone_flops"] / len(x))
    write_json(out / "metrics.json", metrics)
    return Record(dict(top1=metrics["top1"], knn=metrics["knn"], extra_flops=metrics["extra_flops"]),
                  ["placer.safetensors", "placer.json", "metrics.json", "predictions.parquet"])
