"""The simulation of docs/uncertainty.md ("Three runs, moderated by all the claims"): coverage, width
and verdict moves of `crossed_interval` alone and moderated by `run_prior`.

    python scripts/simulate-intervals.py [PAIRS]     (default 50 pairs of reports per row, ~10 s)

A report is K = 57 claims, each (3 runs, 1 000 images) of per-image differences with a true difference
uniform in [-10, +15] points and a run effect of sd tau; a pair of reports redraws every run on the
same images, as another machine does."""
import sys

import numpy as np

from spot.report import stats

K, N, R = 57, 1000, 3
rng = np.random.default_rng(0)


def report(taus, mus, q) -> list[np.ndarray]:
    """K claims' (R, N) difference tables: runs of A shifted by a run effect, against runs of B."""
    return [(rng.random((R, N)) < np.clip(q[k] + mus[k] + taus[k] * rng.standard_normal((R, 1)), 0, 1)).astype(float)
            - (rng.random((R, N)) < q[k]) for k in range(K)]


def intervals(tables, moderated: bool) -> list[stats.Interval]:
    prior = stats.run_prior([stats.crossed_interval(d).run_var for d in tables], [R - 1] * K) if moderated else None
    return [stats.crossed_interval(d, prior=prior) for d in tables]


def main(pairs: int) -> None:
    rows = {"log-uniform in [0.3, 5] points": lambda: np.exp(rng.uniform(np.log(0.003), np.log(0.05), K)),
            "0": lambda: np.zeros(K), "2 points": lambda: np.full(K, 0.02), "5 points": lambda: np.full(K, 0.05)}
    print("| run effect tau | covers mu: alone / moderated | mean width | moved (of 57): alone / moderated |")
    for label, taus in rows.items():
        cover, width, moved = ({m: [] for m in (False, True)} for _ in range(3))
        for _ in range(pairs):
            tau, mus, q = taus(), rng.uniform(-0.1, 0.15, K), rng.uniform(0.2, 0.7, K)
            first, second = report(tau, mus, q), report(tau, mus, q)
            for m in (False, True):
                a, b = intervals(first, m), intervals(second, m)
                cover[m] += [iv.low <= mu <= iv.high for iv, mu in zip(a, mus)]
                width[m] += [iv.high - iv.low for iv in a]
                moved[m].append(sum(x.verdict != y.verdict for x, y in zip(a, b)))
        print(f"| {label} | {100 * np.mean(cover[False]):.0f} % / {100 * np.mean(cover[True]):.0f} % | "
              f"{100 * np.mean(width[False]):.1f} / {100 * np.mean(width[True]):.1f} points | "
              f"{np.mean(moved[False]):.1f} / {np.mean(moved[True]):.1f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
