"""Transfer: oracle placements found with backbone A, evaluated on backbone B for the same images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spot.backbones import load_backbone
from spot.data.loading import make_loader
from spot.utils import read_json, resolve_device, write_json, write_run_record


@torch.no_grad()
def transfer(src_oracle_dir: str | Path, dst_backbone_dir: str | Path, dst_eval_dir: str | Path,
             shards_dir: str | Path, out_dir: str | Path, batch_size: int = 256, device: str = "auto") -> dict:
    """Top-1 of backbone B (`dst_backbone_dir`) with the final oracle positions of A (`src_oracle_dir`),
    against B with the prior A started from (`dst_eval_dir`, same images and budget) and A's oracle.
    With A == B it reproduces A's oracle top-1."""
    src_dir, dst_dir = Path(src_oracle_dir), Path(dst_backbone_dir)
    for p in (src_dir / "results.parquet", dst_dir / "backbone.json", Path(dst_eval_dir) / "metrics.json"):
        if not p.is_file():
            raise FileNotFoundError(f"transfer input {p} does not exist")
    src = read_json(src_dir / "run.json")["params"]
    found = pd.read_parquet(src_dir / "results.parquet")
    final = {k: np.asarray(v, dtype=np.float32).reshape(-1, 2) for k, v in zip(found["key"], found["final"])}
    device = resolve_device(device)
    model = load_backbone(dst_dir, device)
    hits, n = 0, 0
    for b in tqdm(make_loader(shards_dir, "val", model.data_config, batch_size),
                  desc=f"transfer {src['backbone']} -> {dst_dir.name}", unit="batch"):
        keep = [i for i, k in enumerate(b.keys) if k in final]
        if not keep:
            continue
        pos = torch.from_numpy(np.stack([final[b.keys[i]] for i in keep])).to(device)
        logits = model(b.images[keep].to(device), pos)
        hits += (logits.argmax(1).cpu() == b.labels[keep]).sum().item()
        n += len(keep)
    if n != len(final):
        raise ValueError(f"transfer: {len(final) - n} oracle images of {src_dir} are not in the val shards {shards_dir}")
    metrics = dict(top1_transfer=hits / n, top1_prior=read_json(Path(dst_eval_dir) / "metrics.json")["top1"],
                   top1_src_oracle=read_json(src_dir / "metrics.json")["top1"], n=n)
    metrics["gain"] = metrics["top1_transfer"] - metrics["top1_prior"]
    out = Path(out_dir)
    write_json(out / "metrics.json", metrics)
    job = f"transfer/{src['backbone']}__{dst_dir.name}/{src['budget']}"
    write_run_record(out, stage="transfer", job=job,
                     params=dict(src=src["backbone"], dst=dst_dir.name, prior=src["prior"], budget=src["budget"]),
                     metrics=metrics, artifacts=["metrics.json"])
    return metrics
