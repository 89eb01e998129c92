"""Evaluating the token-reduction baselines (`spot.methods.budget.Point`s) like a prior: top-1 on val,
kNN against a train bank made by the same method and setting, every setting in one pass over the images.

The settings that reduce nothing (ToMe r = 0, EViT keep rate 1, the full resolution, no patch
dropped) are the plain model on its grid: it runs once and stands for all of them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from spot.core.devices import autocast_for, to_device
from spot.core.knn import knn_predict
from spot.core.model import SPoTViT, frozen
from spot.core.priors import positions_for, split_seed
from spot.data.decoded import Decoded
from spot.methods.budget import Point
from spot.methods.merging import tome_forward
from spot.methods.pruning import evit_forward
from spot.methods.resolution import low_res_forward
from spot.utils.progress import progress

FULL = "full"         # the name of the one evaluation that stands for every setting that reduces nothing


def pooled(model: SPoTViT, images: torch.Tensor, point: Point | None, keys: list[str], split: str, seed: int,
           block: int = 0, prop_attn: bool = True) -> torch.Tensor:
    """(B, D) pooled features (pre-logits) of `model` on images (B, C, H, W) reduced as `point` says
    (None: the plain model on its grid). Random drop keeps the patches the grid prior draws for the
    images' `keys` in `split` (`positions_for`, seed `split_seed(seed, split)`): exactly n of them."""
    vit = model.vit
    if point is None:
        return vit.forward_head(model.forward_features(images), pre_logits=True)
    s = point.setting
    if point.method == "tome":
        return tome_forward(model, images, s, prop_attn=prop_attn, pre_logits=True)
    if point.method == "evit":
        return evit_forward(model, images, {block: s}, pre_logits=True)
    if point.method == "lowres":
        return low_res_forward(model, images, s, pre_logits=True)
    if point.method == "drop":
        pos = positions_for("grid", s, keys, split_seed(seed, split), *model.img_size, model.k, device=images.device)
        return vit.forward_head(model.forward_features(images, pos), pre_logits=True)
    raise ValueError(f"unknown reduction method {point.method!r}")


@torch.no_grad()
def evaluate_points(model: SPoTViT, data: Decoded, points: dict[str, Point | None], *, batch_size: int, knn: dict,
                    device, seed: int, block: int = 0, prop_attn: bool = True, job: str = "") -> pd.DataFrame:
    """Per val image and point ({name: Point, or None for the plain model}): key, label, point, pred,
    correct, knn_pred, knn_correct; the kNN bank is the first `knn["bank_size"]` train images (all if
    None) through the same point. bf16 autocast on CUDA, as `spot.training.evaluation.run_split`."""
    data.require_head(model.num_classes)
    out = {}
    with frozen(model, device):
        for split, limit in (("train", knn["bank_size"]), ("val", None)):
            feats = {name: [] for name in points}
            labels, keys = [], []
            batches = data.batches(split, batch_size, limit=limit, device=device)
            for b in progress(batches, desc=f"{'kNN bank' if split == 'train' else split} {job}", unit="batch"):
                x = to_device(b.images, device)
                for name, p in points.items():
                    with autocast_for(device):
                        feats[name].append(pooled(model, x, p, b.keys, split, seed, block, prop_attn).float())
                labels.append(b.labels)
                keys += b.keys
            out[split] = ({k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels), keys)
    (bank, bank_labels, _), (val, labels, keys) = out["train"], out["val"]
    rows = []
    for name in points:
        logits = model.vit.head(val[name]).float()
        pred = logits.argmax(1).cpu()
        knn_pred = knn_predict(bank[name], bank_labels, val[name], k=knn["k"], temperature=knn["temperature"],
                               num_classes=logits.shape[1]).cpu()
        rows.append(pd.DataFrame(dict(key=keys, label=labels.numpy(), point=name, pred=pred.numpy(),
                                      correct=(pred == labels).numpy(), knn_pred=knn_pred.numpy(),
                                      knn_correct=(knn_pred == labels).numpy())))
    return pd.concat(rows, ignore_index=True).astype({"point": "category"}) if rows else pd.DataFrame()


def accuracies(per_image: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """{point: (top1, knn)} of `evaluate_points`' table."""
    acc = per_image.groupby("point", observed=True)[["correct", "knn_correct"]].mean()
    return {name: (float(r.correct), float(r.knn_correct)) for name, r in acc.iterrows()}


def as_setting(setting) -> list[int] | float | int:
    """A setting as JSON holds it (numpy and torch numbers made plain)."""
    if isinstance(setting, (list, tuple)):
        return [int(v) for v in setting]
    return float(setting) if isinstance(setting, (float, np.floating)) else int(setting)
