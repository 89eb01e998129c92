"""Prior evaluation: top-1 and kNN accuracy of one backbone x prior x token budget."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spot.backbones import load_backbone
from spot.data.loading import make_loader
from spot.knn import knn_predict
from spot.model import SPoTViT
from spot.priors import NEEDS_SALIENCY, PRIORS, sample_positions
from spot.utils import atomic_path, resolve_device, write_json, write_run_record


def check_request(backbone_dir: str | Path, prior: str, budget: int, saliency_dir=None) -> None:
    """Raise a one-line error for a bad prior, budget or backbone before any work."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if not (Path(backbone_dir) / "backbone.json").is_file():
        raise FileNotFoundError(f"backbone {backbone_dir} does not exist (no backbone.json)")
    from spot.utils import read_json
    meta = read_json(Path(backbone_dir) / "backbone.json")
    h, w = meta["img_size"]
    cells = (h // meta["patch_size"]) * (w // meta["patch_size"])
    if not 1 <= budget <= h * w:
        raise ValueError(f"token budget {budget} is outside 1..{h * w} (the image's pixel count)")
    if prior == "grid" and budget > cells:
        raise ValueError(f"token budget {budget} exceeds the {cells} patch cells of prior 'grid'")
    if prior in NEEDS_SALIENCY and saliency_dir is None:
        raise ValueError(f"prior {prior!r} needs saliency maps (saliency_dir)")


def positions_for(model: SPoTViT, prior: str, budget: int, keys: list[str], seed: int,
                  saliency: torch.Tensor | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
    """(B, budget, 2) positions, each image's drawn from a generator seeded by (seed, key): the same
    positions whatever the batch size or order."""
    out = []
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
        out.append(sample_positions(prior, 1, budget, *model.img_size, k=model.k, generator=gen,
                                    saliency=None if saliency is None else saliency[i:i + 1],
                                    images=None if images is None else images[i:i + 1]))
    return torch.cat(out)


@torch.no_grad()
def run_split(model: SPoTViT, loader, prior: str, budget: int, seed: int, device, desc: str,
              limit: int | None = None) -> dict:
    """Features, logits, labels, keys and positions of the loader's images in order (the first `limit`)."""
    feats, logits, labels, keys, positions = [], [], [], [], []
    for b in tqdm(loader, desc=desc, unit="batch"):
        if limit is not None and len(keys) >= limit:
            break
        if limit is not None and len(keys) + len(b.keys) > limit:
            n = limit - len(keys)
            b = type(b)(b.images[:n], b.labels[:n], b.keys[:n], None if b.saliency is None else b.saliency[:n])
        x = b.images.to(device)
        pos = positions_for(model, prior, budget, b.keys, seed, b.saliency, b.images).to(device)
        tok = model.forward_features(x, pos)
        feats.append(model.vit.forward_head(tok, pre_logits=True).float().cpu())
        logits.append(model.vit.forward_head(tok).float().cpu())
        labels.append(b.labels)
        keys += b.keys
        positions.append(pos.cpu())
    return dict(features=torch.cat(feats), logits=torch.cat(logits), labels=torch.cat(labels), keys=keys,
                positions=torch.cat(positions))


def evaluate(backbone_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, prior: str, budget: int,
             k_nn: int = 20, temperature: float = 0.07, batch_size: int = 256, seed: int = 0,
             saliency_dir: str | Path | None = None, device: str = "auto", num_workers: int = 0,
             bank_size: int | None = None) -> dict:
    """Top-1 (val) and kNN accuracy (bank: the first `bank_size` train images, all if None, under the
    same prior and budget) of a backbone
    with `budget` tokens placed by `prior`; prior 'grid' is the plain ViT on `budget` random patches.

    Writes metrics.json, predictions.parquet (key, label, pred, correct, knn_pred, knn_correct,
    positions as 2N floats (y, x) in [0, 1]), bank.npz (train features float16, labels), run.json.
    """
    check_request(backbone_dir, prior, budget, saliency_dir if prior in NEEDS_SALIENCY else "")
    device = resolve_device(device)
    model = load_backbone(backbone_dir, device)
    name = Path(backbone_dir).name
    sal = saliency_dir if prior in NEEDS_SALIENCY else None
    loader = lambda split: make_loader(shards_dir, split, model.data_config, batch_size,  # noqa: E731
                                       num_workers=num_workers, saliency_dir=sal)
    bank = run_split(model, loader("train"), prior, budget, seed, device, f"bank {name}/{prior}/{budget}",
                     limit=bank_size)
    val = run_split(model, loader("val"), prior, budget, seed + 1, device, f"val {name}/{prior}/{budget}")
    pred = val["logits"].argmax(1)
    knn = knn_predict(bank["features"], bank["labels"], val["features"], k=k_nn, temperature=temperature,
                      num_classes=val["logits"].shape[1])
    labels = val["labels"]
    metrics = dict(top1=(pred == labels).sum().item() / len(labels), knn=(knn == labels).sum().item() / len(labels),
                   n_val=len(labels), n_bank=len(bank["labels"]), k=k_nn, temperature=temperature)
    out = Path(out_dir)
    table = pd.DataFrame(dict(key=val["keys"], label=labels.numpy(), pred=pred.numpy(),
                              correct=(pred == labels).numpy(), knn_pred=knn.numpy(),
                              knn_correct=(knn == labels).numpy(),
                              positions=list(val["positions"].flatten(1).numpy())))
    with atomic_path(out / "predictions.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out / "bank.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, features=bank["features"].half().numpy(), labels=bank["labels"].numpy())
    write_json(out / "metrics.json", metrics)
    write_run_record(out, stage="evaluate", job=f"evaluate/{name}/{prior}/{budget}",
                     params=dict(backbone=name, prior=prior, budget=budget, seed=seed, k_nn=k_nn,
                                 temperature=temperature, bank_size=bank_size),
                     metrics=dict(top1=metrics["top1"], knn=metrics["knn"]),
                     artifacts=["metrics.json", "predictions.parquet"])
    return metrics
