"""Stage evaluate: top-1 and kNN accuracy of one backbone, every prior x token budget (a pass per prior)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spot.core.devices import resolve_device, to_device
from spot.core.knn import knn_predict
from spot.core.model import compile_features
from spot.core.priors import NEEDS_SALIENCY, check_budget, draws, positions_for, split_seed
from spot.data.decoded import Decoded
from spot.data.saliency import SaliencyMaps
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.training.evaluation import evaluate_placements, run_split
from spot.utils.io import atomic_path


def run(p, inputs: dict, outs: dict[int, Path], backbone: str, prior: str) -> dict[int, Record]:
    """Top-1 on val and kNN accuracy (bank: the first `eval.knn.bank_size` train images, all if null,
    under the same prior and budget) with `budget` tokens placed by `prior`, for every budget of
    `outs` ({budget: folder}) in one pass over the images; 'grid' is the plain ViT on `budget` random
    patches; 'model_salient' draws from the maps of stage model-saliency. The bank's and val's
    positions are drawn from their `split_seed`: an image's positions do not depend on the other budgets.

    Writes metrics.json, predictions.parquet and bank.npz per budget (`spot.training.evaluation`),
    and for a prior whose positions depend on the seed, draws.parquet: the val pass again under each
    other `eval.prior_seeds` s (`replicates.prior_seeds` on a replicate backbone; val positions from
    seed + 2s + 1), against the same kNN bank.
    """
    device = resolve_device(p.device)
    model = compile_features(load_backbone(inputs["backbone"], device), p.compile)
    for budget in outs:
        check_budget(prior, budget, *model.img_size, model.k)
    maps = SaliencyMaps(inputs["model_saliency"]) if prior == "model_salient" else None

    def placement(budget, draw=0):
        def place(b, split):
            saliency = to_device(maps(split, b.keys), device) if maps else b.saliency
            return positions_for(prior, budget, b.keys, split_seed(p.seed + 2 * draw, split), *model.img_size,
                                 model.k, saliency, b.images, device)
        return place

    data, saliency = Decoded(inputs["decoded"], model.data_config), prior in NEEDS_SALIENCY and not maps
    metrics = evaluate_placements(model, data, {n: placement(n) for n in outs}, outs,
                                  batch_size=p.batch_size, knn=p.knn, device=device,
                                  job=f"{backbone}/{prior}", saliency=saliency)
    seeded = [n for n in outs if draws(prior, n, *model.img_size, model.k)]
    other = [s for s in p.prior_seeds if s != 0] if seeded else []
    if other:
        batches = data.batches("val", p.batch_size, saliency=saliency, device=device)
        places = {(n, s): (lambda place: lambda b: place(b, "val"))(placement(n, s)) for n in seeded for s in other}
        val = run_split(model, batches, places, device, f"val draws {backbone}/{prior}")
        for n in seeded:
            write_draws({s: val[n, s] for s in other}, outs[n], p.knn)
    files = ["metrics.json", "predictions.parquet"]
    return {n: Record(dict(top1=m["top1"], knn=m["knn"]), files + (["draws.parquet"] if other and n in seeded else []))
            for n, m in metrics.items()}


def write_draws(vals: dict, out: Path, knn: dict) -> None:
    """draws.parquet in `out`: key, draw, correct, knn_correct per val image of each draw's pass
    ({draw: `run_split` result}), the kNN against out/bank.npz (the reported draw's bank)."""
    bank = np.load(out / "bank.npz")
    rows = []
    for s, v in vals.items():
        pred = knn_predict(torch.from_numpy(bank["features"]).to(v["features"].device), torch.from_numpy(bank["labels"]),
                           v["features"], k=knn["k"], temperature=knn["temperature"], num_classes=v["logits"].shape[1])
        rows.append(pd.DataFrame(dict(key=v["keys"], draw=s, correct=(v["logits"].argmax(1).cpu() == v["labels"]).numpy(),
                                      knn_correct=(pred.cpu() == v["labels"]).numpy())))
    with atomic_path(out / "draws.parquet") as tmp:
        pd.concat(rows, ignore_index=True).to_parquet(tmp, index=False)
