"""The SPoT-ON stage: oracle search over one validation shard, then gathered per backbone/prior/budget."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spot.backbones import load_backbone
from spot.data.loading import make_loader
from spot.evaluate import check_request, positions_for
from spot.knn import knn_predict
from spot.oracle import oracle_search
from spot.priors import NEEDS_SALIENCY
from spot.utils import atomic_path, resolve_device, write_json, write_run_record


def run_oracle(backbone_dir: str | Path, shards_dir: str | Path, shard: str, out_path: str | Path, prior: str,
               budget: int, steps: int = 5, lr: float = 3e-3, optimizer: str = "adamw", batch_size: int = 256,
               seed: int = 0, saliency_dir: str | Path | None = None, device: str = "auto") -> None:
    """SPoT-ON for every image of shard `shard` (e.g. 'val-000000') starting from `prior` with `budget`
    tokens (the same seeded positions `evaluate` uses on val). Writes `out_path` (.npz): keys, labels,
    init/final/snapped positions (n, N, 2), trajectory (n, steps+1, N, 2), correct (n, steps+1),
    snapped_correct (n,), features (n, D) at the final positions."""
    check_request(backbone_dir, prior, budget, saliency_dir if prior in NEEDS_SALIENCY else "")
    device = resolve_device(device)
    model = load_backbone(backbone_dir, device)
    loader = make_loader(shards_dir, shard, model.data_config, batch_size,
                         saliency_dir=saliency_dir if prior in NEEDS_SALIENCY else None)
    parts: dict[str, list] = {k: [] for k in ("keys", "labels", "trajectory", "correct", "snapped",
                                               "snapped_correct", "features")}
    for b in tqdm(loader, desc=f"oracle {Path(backbone_dir).name}/{prior}/{budget} {shard}", unit="batch"):
        init = positions_for(model, prior, budget, b.keys, seed + 1, b.saliency, b.images).to(device)
        r = oracle_search(model, b.images.to(device), b.labels.to(device), init, steps=steps, lr=lr,
                          optimizer=optimizer)
        parts["keys"] += b.keys
        parts["labels"].append(b.labels.numpy())
        for k in ("trajectory", "correct", "snapped", "snapped_correct", "features"):
            parts[k].append(getattr(r, k).cpu().numpy())
    arrays = {k: np.asarray(v) if k == "keys" else np.concatenate(v) for k, v in parts.items()}
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def gather_oracle(shard_results: list[str | Path], bank_path: str | Path, out_dir: str | Path, backbone: str,
                  prior: str, budget: int, params: dict, k_nn: int = 20, temperature: float = 0.07) -> dict:
    """Join the per-shard oracle results; kNN of the final features against the evaluate bank of the
    same backbone/prior/budget. Writes metrics.json (top1_init, top1 (oracle: an upper bound, it uses
    labels), top1_snapped, knn, per-step loss-free accuracy curve), results.parquet, run.json."""
    parts = [np.load(p) for p in shard_results]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}
    bank = np.load(bank_path)
    knn = knn_predict(torch.from_numpy(bank["features"]).float(), torch.from_numpy(bank["labels"]),
                      torch.from_numpy(cat["features"]), k=k_nn, temperature=temperature)
    labels = cat["labels"]
    curve = cat["correct"].mean(0)
    metrics = dict(top1_init=float(curve[0]), top1=float(curve[-1]), top1_snapped=float(cat["snapped_correct"].mean()),
                   knn=float((knn.numpy() == labels).mean()), accuracy_per_step=[float(a) for a in curve],
                   n=int(len(labels)), steps=int(cat["trajectory"].shape[1] - 1))
    traj = cat["trajectory"]
    table = pd.DataFrame(dict(key=cat["keys"], label=labels, correct_init=cat["correct"][:, 0],
                              correct=cat["correct"][:, -1], snapped_correct=cat["snapped_correct"],
                              knn_correct=knn.numpy() == labels, init=list(traj[:, 0].reshape(len(labels), -1)),
                              final=list(traj[:, -1].reshape(len(labels), -1))))
    out = Path(out_dir)
    with atomic_path(out / "results.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    write_json(out / "metrics.json", metrics)
    write_run_record(out, stage="oracle", job=f"oracle/{backbone}/{prior}/{budget}",
                     params=dict(backbone=backbone, prior=prior, budget=budget, **params),
                     metrics={k: v for k, v in metrics.items() if not isinstance(v, list)},
                     artifacts=["metrics.json", "results.parquet"])
    return metrics
