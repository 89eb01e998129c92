"""Stage entropy: label-free test-time search, SPoT-ON's loop with the label replaced by the
entropy of the model's own prediction, from the oracle's start prior; evaluated like a prior."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spot.core.cost import relative_flops
from spot.core.devices import resolve_device
from spot.core.priors import NEEDS_SALIENCY, check_budget, positions_for, split_seed
from spot.data.decoded import Decoded
from spot.methods.entropy_search import entropy_search
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.training.evaluation import evaluate_placement
from spot.utils.io import atomic_path, write_json


def run(p, inputs: dict, out: Path, backbone: str, budget: int) -> Record:
    """Start every image (bank and val) at the positions `evaluate` draws for prior `oracle.prior`
    (`split_seed`), run `placement.entropy.steps` entropy-lowering AdamW steps
    of lr `placement.entropy.lr` on the positions (the search never sees a label), evaluate the
    final positions (`spot.training.evaluation.evaluate_placement`). Writes metrics.json (with extra_flops:
    the search's FLOPs over one backbone forward; entropy_per_step and accuracy_per_step on val, labels
    used for scoring only), trajectories.npz (val keys, trajectory (n, steps+1, N, 2) float16),
    predictions.parquet, bank.npz."""
    search, prior, device = p.entropy, p.prior, resolve_device(p.device)
    model = load_backbone(inputs["backbone"], device)
    check_budget(prior, budget, *model.img_size, model.k)
    data = Decoded(inputs["decoded"], model.data_config)
    found = {"keys": [], "trajectory": [], "entropy": [], "correct": []}

    def start(b, split):
        return positions_for(prior, budget, b.keys, split_seed(p.seed, split), *model.img_size, model.k,
                             b.saliency, b.images, device)

    def place(b, split):
        r = entropy_search(model, b.images.to(device), start(b, split), steps=search["steps"], lr=search["lr"])
        if split == "val":
            found["keys"] += b.keys
            found["trajectory"].append(r.trajectory.half().cpu().numpy())
            found["entropy"].append(r.image_entropy.cpu())
            found["correct"].append(r.predictions.cpu() == b.labels[:, None])       # scoring only, after the search
        return r.positions

    metrics = evaluate_placement(model, data, place, out, batch_size=p.batch_size, knn=p.knn,
                                 device=device, job=f"entropy {backbone}/{budget}", saliency=prior in NEEDS_SALIENCY)
    with atomic_path(out / "trajectories.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=np.asarray(found["keys"]), trajectory=np.concatenate(found["trajectory"]))
    b = next(data.batches("val", 16, saliency=prior in NEEDS_SALIENCY, device=device))
    x, s0 = b.images.to(device), start(b, "val")
    cost = relative_flops(lambda: entropy_search(model, x, s0, steps=search["steps"], lr=search["lr"]), model, x, s0)
    metrics |= dict(extra_flops=cost["extra"], start_prior=prior, steps=search["steps"],
                    entropy_per_step=[round(v, 6) for v in torch.cat(found["entropy"]).mean(0).tolist()],
                    accuracy_per_step=[round(v, 6) for v in torch.cat(found["correct"]).float().mean(0).tolist()])
    write_json(out / "metrics.json", metrics)
    return Record(dict(top1=metrics["top1"], knn=metrics["knn"], extra_flops=metrics["extra_flops"],
                       entropy_per_step=metrics["entropy_per_step"], accuracy_per_step=metrics["accuracy_per_step"]),
                  ["metrics.json", "predictions.parquet", "trajectories.npz"])
