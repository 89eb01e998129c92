"""Data stages, measured side by side in one run on real ImageNet JPEGs (../shared/data/imagenet-sample,
or --root: an ImageNet folder layout) and Fashion-MNIST:

1. `write_shards` vs plain `tar -h` of the same files (ratio: shard time / tar time), on the sample
   linked `--copies` times under other names (1200 files by default: at 120, tar's start-up hides
   its per-file cost);
2. the shard loader (decode + resize + crop + normalise) in images per second, with 0 (in the main
   process), 1 and 2 loader workers;
3. spectral-residual saliency maps in images per second.

    python -m benchmarks.bench_data [--root DIR] [--copies 10]
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch

from benchmarks.common import report, timeit
from spot.data.loading import make_loader
from spot.data.shards import write_shards
from spot.saliency import saliency_maps, write_saliency

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def imagenet_layout(sample: Path, root: Path, copies: int = 1) -> Path:
    """`root/val/<wnid>/<i>_<file>`, i < copies: links to the sample JPEGs (named <wnid>_<class>.JPEG)."""
    for f in sorted(sample.glob("*.JPEG")):
        d = root / "val" / f.name.split("_")[0]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(copies):
            (d / f"{i}_{f.name}").symlink_to(f)
    return root


def count(loader) -> int:
    """Images in one pass over `loader`."""
    return sum(len(b.labels) for b in loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="ImageNet folder layout (default: the shared sample)")
    ap.add_argument("--copies", type=int, default=10, help="links per sample image (default 10: 1200 files)")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = a.root or imagenet_layout(SAMPLE, tmp / "imagenet", a.copies)
        files = sorted(p for p in (root / "val").rglob("*") if p.is_file() or p.is_symlink())
        mb = sum(p.stat().st_size for p in files) / 1e6
        t_shard = timeit(lambda: write_shards("imagenet", root, tmp / "shards", splits=["val"], shard_count=300,
                                              shard_bytes=1e9), a.reps)
        t_tar = timeit(lambda: subprocess.run(["tar", "-chf", str(tmp / "plain.tar"), "-C", str(root), "val"],
                                              check=True), a.reps)
        rows.append(dict(bench="imagenet shards vs tar", images=len(files), MB=mb, spot_s=t_shard, baseline_s=t_tar,
                         ratio=t_shard / t_tar, img_per_s=len(files) / t_shard))

        cfg = dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225), crop_pct=0.875, crop_mode="center")
        for workers in (0, 1, 2):
            t = timeit(lambda: count(make_loader(tmp / "shards", "val", cfg, 32, num_workers=workers)), a.reps)
            rows.append(dict(bench=f"imagenet loader 224px, {workers} workers", images=len(files), spot_s=t,
                             img_per_s=len(files) / t))

        t = timeit(lambda: write_saliency(tmp / "shards", tmp / "saliency", "spectral_residual", 64), a.reps)
        rows.append(dict(bench="saliency stage (decode + maps + png)", images=len(files), spot_s=t,
                         img_per_s=len(files) / t))
        x = torch.rand(64, 3, 224, 224)
        t = timeit(lambda: saliency_maps(x, "spectral_residual", 64), a.reps)
        rows.append(dict(bench="saliency maps only, 224px batch", images=64, spot_s=t, img_per_s=64 / t))

        fm = Path("/usr/share/datasets/fashion-mnist")
        if fm.is_dir():
            t = timeit(lambda: write_shards("fashion-mnist", fm, tmp / "fm", splits=["train", "val"],
                                            shard_count=2000, shard_bytes=1e9, max_per_class=500), 1, warmup=0)
            rows.append(dict(bench="fashion-mnist shards (5000 + 5000)", images=10000, spot_s=t, img_per_s=10000 / t))
            cfg28 = dict(cfg, input_size=(3, 28, 28), interpolation="bilinear", crop_pct=1.0)
            for workers in (0, 1, 2):
                t = timeit(lambda: count(make_loader(tmp / "fm", "train", cfg28, 128, num_workers=workers)), 1)
                rows.append(dict(bench=f"fashion-mnist loader 28px, {workers} workers", images=5000, spot_s=t,
                                 img_per_s=5000 / t))
    report("data", rows)


if __name__ == "__main__":
    main()
