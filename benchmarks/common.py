"""Timing helpers shared by the benchmarks: median wall time of a callable, results table + JSON."""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from spot.utils.environment import environment

OUT = Path("out/bench")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "imagenet-sample"
SAMPLE = SHARED if SHARED.is_dir() else REPO / "tests" / "data"    # real ImageNet JPEGs


def imagenet_layout(sample: Path, root: Path, copies: int = 1, splits=("val",)) -> Path:
    """`root/<split>/<wnid>/<i>_<file>`, i < copies: real copies of the sample JPEGs (named
    <wnid>_<class>.JPEG) in each split."""
    for split in splits:
        for f in sorted(sample.glob("*.JPEG")):
            d = root / split / f.name.split("_")[0]
            d.mkdir(parents=True, exist_ok=True)
            for i in range(copies):
                shutil.copyfile(f, d / f"{i}_{f.name}")
    return root


def timeit(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds per call of fn() over `reps` calls after `warmup` calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(name: str, rows: list[dict]) -> None:
    """Print rows as a table and save them with the machine description to out/bench/<name>.json."""
    import pandas as pd
    machine = environment()
    print(f"\n## {name}  ({', '.join(f'{k} {v}' for k, v in machine.items() if v is not None)})")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.json.tmp"
    tmp.write_text(json.dumps(dict(machine=machine, rows=rows), indent=2))
    tmp.rename(OUT / f"{name}.json")
