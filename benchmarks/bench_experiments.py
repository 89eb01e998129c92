"""Experiment stages on the default model size (28 px Fashion-MNIST, patch 4, 4 blocks of width 96),
streamed from shards, measured in one run:

1. `evaluate` (kNN bank on train + top-1 on val) in images per second, per token budget;
2. `run_oracle` (SPoT-ON on one val shard) in image-steps per second, per token budget.

    python -m benchmarks.bench_experiments [--images 1000] [--device auto]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm

from benchmarks.common import report
from spot import SPoTViT
from spot.backbones import describe, save_backbone
from spot.data.shards import write_shards
from spot.evaluate import evaluate
from spot.search import run_oracle

ARCH = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="images per split")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards("fashion-mnist", "/usr/share/datasets/fashion-mnist", tmp / "shards", splits=["train", "val"],
                     shard_count=a.images, shard_bytes=1e9, max_per_class=a.images // 10)
        model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH))
        save_backbone(model, tmp / "b", describe(model, "b", "vit_tiny_patch16_224", ARCH, source="bench"))
        for n in (4, 16, 49):
            t = time.perf_counter()
            evaluate(tmp / "b", tmp / "shards", tmp / f"eval{n}", "isotropic", n, device=a.device)
            dt = time.perf_counter() - t
            rows.append(dict(stage="evaluate", tokens=n, images=2 * a.images, seconds=dt, img_per_s=2 * a.images / dt))
        for n in (4, 16, 49):
            t = time.perf_counter()
            run_oracle(tmp / "b", tmp / "shards", "val-000000", tmp / f"oracle{n}.npz", "isotropic", n,
                       steps=a.steps, lr=2.4e-2, device=a.device)
            dt = time.perf_counter() - t
            rows.append(dict(stage=f"oracle ({a.steps} steps)", tokens=n, images=a.images, seconds=dt,
                             img_steps_per_s=a.images * a.steps / dt))
    report("experiments", rows)


if __name__ == "__main__":
    main()
