"""Data stages, measured side by side in one run on real ImageNet JPEGs (../shared/data/imagenet-sample,
or --root: an ImageNet folder layout) and Fashion-MNIST:

1. `write_shards` vs plain `tar` of the same files, interleaved run by run, each writing a fresh
   output: with the files in the page cache (warm) and read from disk (cold: each file's cached
   pages dropped with posix_fadvise before each run). The sample is copied `--copies` times under
   other names (4 800 files by default; real copies, since tar stores links to one file once);
2. the shard loader (decode + resize + crop + normalise) in images per second, with 0 (in the main
   process), 1 and 2 loader workers, on 1 200 of those images;
3. spectral-residual saliency maps in images per second.

    python -m benchmarks.bench_data [--root DIR] [--copies 40] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SAMPLE, imagenet_layout, report, timeit
from spot.core.saliency import saliency_maps
from spot.data.saliency import write_saliency
from spot.data.shards import default_workers, write_shards
from spot.data.stream import make_loader


def count(loader) -> int:
    """Images in one pass over `loader`."""
    return sum(len(b.labels) for b in loader)


def drop_cached(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from disk."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def fresh_run(fn, out: Path, files: list[Path], cold: bool) -> float:
    """Seconds of fn() writing `out` anew (removed first), the source files warm or cold."""
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    if cold:
        drop_cached(files)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def shard_vs_tar(root: Path, tmp: Path, files: list[Path], reps: int) -> list[dict]:
    """write_shards (1 process, every CPU) against `tar -cf` of the same files, interleaved."""
    runs = {f"spot, {w} process{'es' * (w > 1)}": (lambda w=w: write_shards(
        "imagenet", root, tmp / "shards-bench", splits=["val"], images_per_shard=1000, workers=w), tmp / "shards-bench")
        for w in sorted({1, default_workers()})}
    runs["tar"] = (lambda: subprocess.run(["tar", "-cf", str(tmp / "plain.tar"), "-C", str(root), "val"], check=True),
                   tmp / "plain.tar")
    mb = sum(f.stat().st_size for f in files) / 1e6
    rows = []
    for cold in (False, True):
        times = {k: [] for k in runs}
        for _ in range(reps + 1):                        # the first round warms up and is dropped
            for k, (fn, out) in runs.items():
                times[k].append(fresh_run(fn, out, files, cold))
        t_tar = statistics.median(times["tar"][1:])
        for k, ts in times.items():
            t = statistics.median(ts[1:])
            rows.append(dict(bench=f"{len(files)} JPEGs ({mb:.0f} MB) {'cold' if cold else 'warm'}: {k}",
                             images=len(files), spot_s=t, img_per_s=len(files) / t, MB_per_s=mb / t,
                             x_tar_img_per_s=t_tar / t))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="ImageNet folder layout (default: the shared sample)")
    ap.add_argument("--copies", type=int, default=40, help="copies of each sample image (default 40: 4800 files)")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rows = []
    Path("out").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir="out") as tmp:   # on the disk (a tmpfs /tmp has no cold reads)
        tmp = Path(tmp)
        root = a.root or imagenet_layout(SAMPLE, tmp / "imagenet", a.copies)
        files = sorted(p for p in (root / "val").rglob("*") if p.is_file())
        rows += shard_vs_tar(root, tmp, files, a.reps)
        write_shards("imagenet", root, tmp / "shards", splits=["val"], images_per_shard=300, max_images=1200)
        n = 1200

        cfg = dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225), crop_pct=0.875, crop_mode="center")
        for workers in (0, 1, 2):
            t = timeit(lambda: count(make_loader(tmp / "shards", "val", cfg, 32, num_workers=workers)), a.reps)
            rows.append(dict(bench=f"imagenet loader 224px, {workers} workers", images=n, spot_s=t,
                             img_per_s=n / t))

        t = timeit(lambda: write_saliency(tmp / "shards", tmp / "saliency", "spectral_residual", 64), a.reps)
        rows.append(dict(bench="saliency stage (decode + maps + png)", images=n, spot_s=t, img_per_s=n / t))
        x = torch.rand(64, 3, 224, 224)
        t = timeit(lambda: saliency_maps(x, "spectral_residual", 64), a.reps)
        rows.append(dict(bench="saliency maps only, 224px batch", images=64, spot_s=t, img_per_s=64 / t))

        fm = Path("/usr/share/datasets/fashion-mnist")
        if fm.is_dir():
            t = timeit(lambda: write_shards("fashion-mnist", fm, tmp / "fm", splits=["train", "val"],
                                            images_per_shard=2000, shard_bytes=1e9, max_per_class=500), 1, warmup=0)
            rows.append(dict(bench="fashion-mnist shards (5000 + 5000)", images=10000, spot_s=t, img_per_s=10000 / t))
            cfg28 = dict(cfg, input_size=(3, 28, 28), interpolation="bilinear", crop_pct=1.0)
            for workers in (0, 1, 2):
                t = timeit(lambda: count(make_loader(tmp / "fm", "train", cfg28, 128, num_workers=workers)), 1)
                rows.append(dict(bench=f"fashion-mnist loader 28px, {workers} workers", images=5000, spot_s=t,
                                 img_per_s=5000 / t))
    report("data", rows)


if __name__ == "__main__":
    main()
