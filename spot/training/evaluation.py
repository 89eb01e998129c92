"""Evaluating one way of placing tokens: top-1 on val, kNN against a train bank, the files it writes.

A placement is a function `place(batch, split) -> (B, N, 2)` positions (y, x) in [0, 1] for a
`spot.data.decoded.Batch` of split "train" (the kNN bank) or "val": a fixed prior, a learned global
prior, a placer network or a label-free search. Stage evaluate and the label-free placement stages
all evaluate through `evaluate_placements`, so their metrics.json and predictions.parquet agree;
several placements share one pass over the images (evaluate: every budget of a prior).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spot.core.devices import autocast_for, to_device
from spot.core.knn import knn_predict
from spot.core.model import SPoTViT, frozen
from spot.data.decoded import Decoded
from spot.utils.io import atomic_path, write_json
from spot.utils.progress import progress

Place = Callable[[object, str], torch.Tensor]


class SplitBatches:
    """Re-iterable batches of one split (every iteration is a new pass in stored order), e.g. for
    `spot.methods.learned_prior.fit_global_prior` and `spot.methods.placer.train_placer`."""

    def __init__(self, data: Decoded, split: str, batch_size: int, device, saliency: bool = False):
        self.data, self.split, self.batch_size, self.device, self.saliency = data, split, batch_size, device, saliency

    def __iter__(self):
        return self.data.batches(self.split, self.batch_size, saliency=self.saliency, device=self.device)


@torch.no_grad()
def run_split(model: SPoTViT, batches, places: dict, device, desc: str) -> dict:
    """For each placement `places[name](batch) -> (B, N, 2)`: features (n, D), logits (n, classes),
    labels (n,), keys and positions (n, N, 2) of the batches' images, in order, all placements in
    one pass over the images. bf16 autocast on CUDA; features, logits and positions stay on the
    device (no synchronisation per batch; the kNN runs there too), labels and keys on the CPU."""
    out = {name: dict(features=[], logits=[], positions=[]) for name in places}
    labels, keys = [], []
    with frozen(model, device):
        for b in progress(batches, desc=desc, unit="batch"):
            x = to_device(b.images, device)
            for name, place in places.items():
                pos = to_device(place(b), device)       # e.g. a learned prior's positions, on the CPU
                with autocast_for(device):
                    tok = model.forward_features(x, pos)
                    out[name]["features"].append(model.vit.forward_head(tok, pre_logits=True).float())
                    out[name]["logits"].append(model.vit.forward_head(tok).float())
                out[name]["positions"].append(pos.float())
            labels.append(b.labels)
            keys += b.keys
    labels = torch.cat(labels)
    return {name: {k: torch.cat(v) for k, v in r.items()} | dict(labels=labels, keys=keys)
            for name, r in out.items()}


def evaluate_placements(model: SPoTViT, data: Decoded, places: dict, outs: dict, *, batch_size: int, knn: dict,
                        device, job: str, saliency: bool = False) -> dict:
    """Top-1 on val and kNN accuracy (bank: the first `knn["bank_size"]` train images, all if None,
    placed the same way) of `model` with the tokens each placement `places[name](batch, split)`
    puts, in one pass over each split. `saliency`: batches carry their maps. Writes into `outs[name]`
    metrics.json, predictions.parquet (key, label, label_name, pred, pred_name, correct, knn_pred,
    knn_correct, positions as 2N floats (y, x) in [0, 1]) and bank.npz (train features float16,
    labels); returns {name: metrics}. A head without one logit per class name is a one-line error."""
    data.require_head(model.num_classes)

    def split(name, limit=None):
        batches = data.batches(name, batch_size, limit=limit, saliency=saliency, device=device)
        return run_split(model, batches, {k: lambda b, p=p: p(b, name) for k, p in places.items()}, device,
                         f"{'kNN bank' if name == 'train' else name} {job}")

    banks, vals = split("train", knn["bank_size"]), split("val")
    return {name: write_results(banks[name], vals[name], outs[name], knn, data.class_names) for name in places}


def evaluate_placement(model: SPoTViT, data: Decoded, place: Place, out: Path, **kw) -> dict:
    """`evaluate_placements` of one placement into `out`; returns its metrics."""
    return evaluate_placements(model, data, {None: place}, {None: out}, **kw)[None]


def write_results(bank: dict, val: dict, out: Path, knn: dict, class_names: list[str]) -> dict:
    """kNN of `val`'s features against `bank`'s (results of `run_split`, on their device), the metrics
    and files of `evaluate_placements` in `out`; `class_names[label]` names the labels and predictions."""
    labels, pred = val["labels"], val["logits"].argmax(1).cpu()
    knn_pred = knn_predict(bank["features"], bank["labels"], val["features"], k=knn["k"],
                           temperature=knn["temperature"], num_classes=val["logits"].shape[1])
    metrics = dict(top1=(pred == labels).sum().item() / len(labels),
                   knn=(knn_pred == labels).sum().item() / len(labels), n_val=len(labels), n_bank=len(bank["labels"]),
                   k=knn["k"], temperature=knn["temperature"])
    names = np.asarray(class_names, dtype=object)               # parquet stores each name once (dictionary encoding)
    table = pa.Table.from_pandas(pd.DataFrame(dict(key=val["keys"], label=labels.numpy(), label_name=names[labels.numpy()],
                                                   pred=pred.numpy(), pred_name=names[pred.numpy()],
                                                   correct=(pred == labels).numpy(), knn_pred=knn_pred.numpy(),
                                                   knn_correct=(knn_pred == labels).numpy())), preserve_index=False)
    pos = val["positions"].flatten(1).cpu().numpy()                 # a fixed-size list column: no row objects
    table = table.append_column("positions", pa.FixedSizeListArray.from_arrays(pa.array(pos.ravel()), pos.shape[1]))
    with atomic_path(out / "predictions.parquet") as tmp:
        pq.write_table(table, tmp)
    with atomic_path(out / "bank.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, features=bank["features"].half().cpu().numpy(), labels=bank["labels"].numpy())
    write_json(out / "metrics.json", metrics)
    return metrics
