"""Stage evaluate: top-1 and kNN accuracy of one backbone, every prior x token budget (a pass per prior)."""
from __future__ import annotations

from pathlib import Path

from spot.core.devices import resolve_device, to_device
from spot.core.model import compile_features
from spot.core.priors import NEEDS_SALIENCY, check_budget, positions_for, split_seed
from spot.data.decoded import Decoded
from spot.data.saliency import SaliencyMaps
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.training.evaluation import evaluate_placements


def run(cfg: dict, inputs: dict, outs: dict[int, Path], backbone: str, prior: str) -> dict[int, Record]:
    """Top-1 on val and kNN accuracy (bank: the first `eval.knn.bank_size` train images, all if null,
    under the same prior and budget) with `budget` tokens placed by `prior`, for every budget of
    `outs` ({budget: folder}) in one pass over the images; 'grid' is the plain ViT on `budget` random
    patches; 'model_salient' draws from the maps of stage model-saliency. The bank's and val's
    positions are drawn from their `split_seed`: an image's positions do not depend on the other budgets.

    Writes metrics.json, predictions.parquet and bank.npz per budget (`spot.training.evaluation`).
    """
    device = resolve_device(cfg["device"])
    model = compile_features(load_backbone(inputs["backbone"], device), cfg["eval"]["compile"])
    for budget in outs:
        check_budget(prior, budget, *model.img_size, model.k)
    maps = SaliencyMaps(inputs["model_saliency"]) if prior == "model_salient" else None

    def placement(budget):
        def place(b, split):
            saliency = to_device(maps(split, b.keys), device) if maps else b.saliency
            return positions_for(prior, budget, b.keys, split_seed(cfg["seed"], split), *model.img_size, model.k,
                                 saliency, b.images, device)
        return place

    metrics = evaluate_placements(model, Decoded(inputs["decoded"], model.data_config),
                                  {n: placement(n) for n in outs}, outs, batch_size=cfg["eval"]["batch_size"],
                                  knn=cfg["eval"]["knn"], device=device, job=f"{backbone}/{prior}",
                                  saliency=prior in NEEDS_SALIENCY and not maps)
    return {n: Record(dict(top1=m["top1"], knn=m["knn"]), ["metrics.json", "predictions.parquet"])
            for n, m in metrics.items()}
