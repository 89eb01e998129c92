"""spot.report.stats on a report-sized load: CPU seconds (the process's, so other work on the machine
counts little) and wall seconds of bootstrap intervals over val images, stacked and one by one.

    python -m benchmarks.bench_stats [--images 1000] [--resamples 2000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import report
from spot.report import stats


def timed(bench: str, fn, **extra) -> dict:
    """One call of fn(): its CPU and wall seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return dict(bench=bench, cpu_s=time.process_time() - cpu, wall_s=time.perf_counter() - wall, **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="val images per vector (the default config's n)")
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vec = lambda n=args.images: rng.random(n) < rng.uniform(0.3, 0.8)
    opts = dict(resamples=args.resamples)
    rows = []
    for count in (210, 300, 600):                  # 210: the default report's top-1, kNN and SPoT-ON columns
        cells = {i: vec() for i in range(count)}
        rows.append(timed("intervals, stacked", lambda: stats.intervals(cells, **opts), cells=count))
    cells = {i: vec() for i in range(210)}
    rows.append(timed("accuracy_interval, one call per cell", lambda: [stats.accuracy_interval(v, **opts)
                                                                       for v in cells.values()], cells=210))
    rows.append(timed("intervals, stacked, BCa", lambda: stats.intervals(cells, method="BCa", **opts), cells=210))
    a, b = np.stack([vec() for _ in range(100)]), np.stack([vec() for _ in range(100)])
    rows.append(timed("paired_difference, one call per pair", lambda: [stats.paired_difference(x, y, **opts)
                                                                       for x, y in zip(a, b)], cells=100))
    rows.append(timed("paired_difference, stacked", lambda: stats.paired_difference(a, b, **opts), cells=100))
    runs = lambda: np.stack([vec() for _ in range(3)]).astype(float)
    priors = {p: runs() for p in "abcdefg"}
    rows.append(timed("best_of 7 priors vs grid, one network (bootstrap)", lambda: [
        stats.best_of({p: v[0] for p, v in priors.items()}, {"grid": runs()[0]}, **opts) for _ in range(18)], cells=18))
    rows.append(timed("best_of 7 priors vs grid, 3 training runs (crossed)", lambda: [
        stats.best_of(priors, {"grid": runs()}) for _ in range(18)], cells=18))
    big = {i: vec(50_000) for i in range(20)}
    rows.append(timed("intervals, stacked (ImageNet val)", lambda: stats.intervals(big, **opts), cells=20,
                      images=50_000))
    report("stats", [dict(images=args.images, resamples=args.resamples) | r for r in rows])


if __name__ == "__main__":
    main()
