"""Stage oracle-gather: the SPoT-ON parts of one backbone x budget joined, kNN of the found features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spot.core.knn import knn_predict
from spot.stages import Record
from spot.utils.io import atomic_path, write_json


def run(p, inputs: dict, out: Path, backbone: str, budget: int) -> Record:
    """Join the parts; kNN of the final features against the bank of the evaluation the search
    started from. Writes metrics.json (top1_init, top1 (an upper bound: it uses labels),
    top1_snapped, knn, accuracy_per_step) and results.parquet (per image: correctness, init and
    final positions as 2N floats)."""
    parts = [np.load(f / "part.npz") for f in inputs["parts"]]
    parts = [part for part in parts if "keys" in part.files]
    if not parts:
        raise ValueError(f"the oracle parts of {backbone}/{budget} hold no images (no val shards?)")
    cat = {k: np.concatenate([part[k] for part in parts]) for k in parts[0].files}
    bank = np.load(inputs["eval"] / "bank.npz")
    knn = p.knn
    knn_pred = knn_predict(torch.from_numpy(bank["features"]).float(), torch.from_numpy(bank["labels"]),
                           torch.from_numpy(cat["features"]), k=knn["k"], temperature=knn["temperature"]).numpy()
    labels, n = cat["labels"], len(cat["labels"])
    curve = cat["correct"].mean(0)
    metrics = dict(top1_init=float(curve[0]), top1=float(curve[-1]), top1_snapped=float(cat["snapped_correct"].mean()),
                   knn=float((knn_pred == labels).mean()), accuracy_per_step=[float(a) for a in curve],
                   n=int(n), steps=int(cat["correct"].shape[1] - 1))
    table = pd.DataFrame(dict(key=cat["keys"], label=labels, correct_init=cat["correct"][:, 0],
                              correct=cat["correct"][:, -1], snapped_correct=cat["snapped_correct"],
                              knn_correct=knn_pred == labels, init=list(cat["init"].reshape(n, -1)),
                              final=list(cat["final"].reshape(n, -1))))
    with atomic_path(out / "results.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    write_json(out / "metrics.json", metrics)
    return Record(metrics, ["metrics.json", "results.parquet"])
