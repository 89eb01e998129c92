"""Stage transfer: oracle placements found with backbone `src`, evaluated on backbone `dst`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spot.core.devices import autocast_for, resolve_device, to_device
from spot.core.model import frozen
from spot.data.decoded import Decoded
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.utils.io import atomic_path, read_json, write_json
from spot.utils.progress import progress


@torch.no_grad()
def run(p, inputs: dict, out: Path, src: str, dst: str, budget: int) -> Record:
    """Top-1 of `dst` with the final oracle positions of `src`, against `dst` on the prior the
    search started from (same images, same budget) and `src`'s own oracle top-1. With src == dst it
    reproduces the oracle's top-1. Writes metrics.json and predictions.parquet (key, label, pred,
    correct per image)."""
    found = pd.read_parquet(inputs["oracle"] / "results.parquet")
    final = {k: np.asarray(v, dtype=np.float32).reshape(-1, 2) for k, v in zip(found["key"], found["final"])}
    device = resolve_device(p.device)
    model = load_backbone(inputs["backbone"], device)
    keys, labels, preds = [], [], []                 # per batch, kept on the device: no wait per batch
    batches = Decoded(inputs["decoded"], model.data_config).batches("val", p.batch_size, device=device)
    with frozen(model, device):
        for b in progress(batches, desc=f"transfer {src} -> {dst}/{budget}", unit="batch"):
            keep = [i for i, k in enumerate(b.keys) if k in final]
            if not keep:
                continue
            pos = to_device(torch.from_numpy(np.stack([final[b.keys[i]] for i in keep])), device)
            with autocast_for(device):                                 # as the oracle ran it
                logits = model(b.images[to_device(torch.tensor(keep), device)], pos)
            keys += [b.keys[i] for i in keep]
            labels.append(b.labels[keep])
            preds.append(logits.argmax(1))
    n = len(keys)
    if n != len(final):
        raise ValueError(f"transfer: {len(final) - n} oracle images of {inputs['oracle']} are not among the val "
                         f"images of {inputs['decoded']}")
    labels, preds = torch.cat(labels).numpy(), torch.cat(preds).cpu().numpy()
    per_image = pd.DataFrame(dict(key=keys, label=labels, pred=preds, correct=labels == preds))
    with atomic_path(out / "predictions.parquet") as tmp:
        per_image.to_parquet(tmp, index=False)
    metrics = dict(top1_transfer=per_image.correct.mean(), top1_prior=read_json(inputs["eval"] / "metrics.json")["top1"],
                   top1_src_oracle=read_json(inputs["oracle"] / "metrics.json")["top1"], n=n)
    metrics["gain"] = metrics["top1_transfer"] - metrics["top1_prior"]
    write_json(out / "metrics.json", metrics)
    return Record(metrics, ["metrics.json", "predictions.parquet"])
