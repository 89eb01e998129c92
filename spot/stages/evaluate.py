"""Stage evaluate: top-1 and kNN accuracy of one backbone x prior x token budget."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spot.backbones import load_backbone
from spot.data.decoded import Decoded
from spot.knn import knn_predict
from spot.model import SPoTViT, compile_features
from spot.outputs import Record
from spot.priors import NEEDS_SALIENCY, check_budget, positions_for
from spot.utils import atomic_path, resolve_device, write_json


@torch.no_grad()
def run_split(model: SPoTViT, batches, prior: str, budget: int, seed: int, device, desc: str) -> dict:
    """Features (n, D), logits (n, classes), labels (n,), keys and positions (n, budget, 2) of the
    batches' images, in order."""
    feats, logits, labels, keys, positions = [], [], [], [], []
    for b in tqdm(batches, desc=desc, unit="batch"):
        x = b.images.to(device, non_blocking=True)
        pos = positions_for(prior, budget, b.keys, seed, *model.img_size, model.k, b.saliency, b.images).to(device)
        tok = model.forward_features(x, pos)
        feats.append(model.vit.forward_head(tok, pre_logits=True).float().cpu())
        logits.append(model.vit.forward_head(tok).float().cpu())
        labels.append(b.labels)
        keys += b.keys
        positions.append(pos.cpu())
    return dict(features=torch.cat(feats), logits=torch.cat(logits), labels=torch.cat(labels), keys=keys,
                positions=torch.cat(positions))


def run(cfg: dict, inputs: dict, out: Path, backbone: str, prior: str, budget: int) -> Record:
    """Top-1 on val and kNN accuracy (bank: the first `eval.knn.bank_size` train images, all if null,
    under the same prior and budget) with `budget` tokens placed by `prior`; 'grid' is the plain ViT
    on `budget` random patches. Val positions are drawn with seed + 1, the bank's with seed.

    Writes metrics.json, predictions.parquet (key, label, pred, correct, knn_pred, knn_correct,
    positions as 2N floats (y, x) in [0, 1]) and bank.npz (train features float16, labels).
    """
    device = resolve_device(cfg["device"])
    model = compile_features(load_backbone(inputs["backbone"], device), cfg["eval"]["compile"])
    check_budget(prior, budget, *model.img_size, model.k)
    knn, seed = cfg["eval"]["knn"], cfg["seed"]

    data = Decoded(inputs["decoded"], model.data_config)

    def batches(split, limit=None):
        return data.batches(split, cfg["eval"]["batch_size"], limit=limit, saliency=prior in NEEDS_SALIENCY,
                            device=device)

    job = f"{backbone}/{prior}/{budget}"
    bank = run_split(model, batches("train", knn["bank_size"]), prior, budget, seed, device, f"bank {job}")
    val = run_split(model, batches("val"), prior, budget, seed + 1, device, f"val {job}")
    labels, pred = val["labels"], val["logits"].argmax(1)
    knn_pred = knn_predict(bank["features"], bank["labels"], val["features"], k=knn["k"],
                           temperature=knn["temperature"], num_classes=val["logits"].shape[1])
    metrics = dict(top1=(pred == labels).sum().item() / len(labels),
                   knn=(knn_pred == labels).sum().item() / len(labels), n_val=len(labels), n_bank=len(bank["labels"]),
                   k=knn["k"], temperature=knn["temperature"])
    table = pd.DataFrame(dict(key=val["keys"], label=labels.numpy(), pred=pred.numpy(),
                              correct=(pred == labels).numpy(), knn_pred=knn_pred.numpy(),
                              knn_correct=(knn_pred == labels).numpy(),
                              positions=list(val["positions"].flatten(1).numpy())))
    with atomic_path(out / "predictions.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out / "bank.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, features=bank["features"].half().numpy(), labels=bank["labels"].numpy())
    write_json(out / "metrics.json", metrics)
    return Record(dict(top1=metrics["top1"], knn=metrics["knn"]), ["metrics.json", "predictions.parquet"])
