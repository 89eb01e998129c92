"""How sure the report's numbers are: intervals over val images and over training runs, paired
comparisons, the best of several candidates without a selection step, the fraction of the oracle
gap closed, replicate spread.

Two levels (docs/uncertainty.md derives both):
- Over the images of one trained network: one call of `scipy.stats.bootstrap` resamples the images;
  the vectors of a comparison are resampled with the same image indices (`paired=True`), so what the
  images share cancels. Inputs are per-image vectors (n,), or cells stacked in leading axes (..., n)
  on the same images: stacked cells see the same resamples, so a cell's interval is the same alone
  or stacked.
- Over the training runs of a recipe and the images together (`crossed_interval`): r runs (training
  seeds) evaluated on the same n images give an (r, n) table; its mean gets a random-effects t
  interval whose variance adds the spread of the runs' means to that of the images' means.
Values are fractions (accuracies in [0, 1]); the `percent_*` helpers render percent and percent points.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats

VERDICTS = ("holds", "reversed", "not distinguishable")
BATCH_BYTES = 1 << 26            # memory of the resampled copies of the data held at once (64 MiB)
SELECT_FRACTION = 0.3            # share of the val images that chooses the best fixed prior
SELECT_SALT = b"spot-best-prior"  # personalises the key hash of `selection_slice` (at most 16 bytes)


@dataclass(frozen=True)
class Interval:
    """A statistic of `n` images (a mean, a difference of means, a ratio of them) and its interval
    [`low`, `high`]: floats, or arrays (...,) for stacked cells; `runs` training runs (1: the images
    of one network, bootstrapped; more: `crossed_interval`), the interval's `confidence` and, over
    runs, `run_var`: the sample variance of the run means (before any `RunPrior`)."""
    value: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    n: int
    runs: int = 1
    confidence: float = 0.95
    run_var: float = np.nan

    @property
    def half_width(self) -> float | np.ndarray:
        """(high - low) / 2: the `±` of `percent_pm` (a percentile interval need not be symmetric)."""
        return (self.high - self.low) / 2

    @property
    def verdict(self) -> str | np.ndarray:
        """Of a difference A - B: 'holds' (interval above 0), 'reversed' (below 0), else 'not
        distinguishable' (the interval holds 0, or is NaN)."""
        v = np.where(np.asarray(self.low) > 0, VERDICTS[0], np.where(np.asarray(self.high) < 0, VERDICTS[1], VERDICTS[2]))
        return str(v) if v.ndim == 0 else v

    def claim(self) -> str:
        """The verdict of one difference with its sample size: 'not distinguishable at n = 1000', or
        over training runs 'holds over 3 runs x n = 700'."""
        return f"{self.verdict} " + (f"over {self.runs} runs x n = {self.n}" if self.runs > 1 else f"at n = {self.n}")


def bootstrap(samples: Sequence, statistic: Callable, *, confidence: float = 0.95, resamples: int = 2000,
              seed: int = 0, method: str = "percentile") -> Interval:
    """`statistic(*samples, axis=-1)` and its two-sided `confidence` interval from `resamples` resamples
    of the images drawn with `seed` (same seed, same numbers); `method`: 'percentile', 'basic' or
    'BCa' (BCa adds n jackknife evaluations). A bound is NaN where the statistic is NaN in a resample
    (or, for BCa, the distribution is degenerate). Each sample is (..., n), n images on the last
    axis, all resampled with the same image indices. `statistic` takes the samples and `axis` and
    reduces that axis (vectorised); resamples are evaluated in batches of about BATCH_BYTES of data."""
    samples = [np.asarray(s) for s in samples]
    n = samples[0].shape[-1] if samples[0].ndim else 0
    if n < 2 or any(s.ndim == 0 or s.shape[-1] != n for s in samples):
        raise ValueError(f"bootstrap: samples need the same number (>= 2) of images on their last axis, got shapes "
                         f"{[s.shape for s in samples]}")
    batch = max(1, BATCH_BYTES // sum(s.nbytes for s in samples))
    with warnings.catch_warnings():                  # a NaN bound is an answer here (see gap_closed_interval)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(samples, statistic, n_resamples=resamples, batch=batch, vectorized=True, paired=True,
                              axis=-1, confidence_level=confidence, method=method, rng=seed)
    ci = res.confidence_interval
    return Interval(_plain(statistic(*samples, axis=-1)), _plain(ci.low), _plain(ci.high), n, 1, confidence)


@dataclass(frozen=True)
class RunPrior:
    """What the report's claims say together about the spread of a recipe's runs: the sample variances
    of run means are scaled inverse-chi-square around `var` with `df` degrees of freedom (`run_prior`;
    inf: one common variance). `crossed_interval` moderates a claim's own variance with it."""
    df: float
    var: float


def run_prior(variances, df) -> RunPrior | None:
    """The prior of `RunPrior` fitted by moments to sample variances (k,) on `df` (k,) degrees of freedom
    each (Smyth 2004, limma's `fitFDist` without covariates): log s^2 has mean log s0^2 + digamma(d/2) -
    log(d/2) - digamma(d0/2) + log(d0/2) and variance trigamma(d/2) + trigamma(d0/2). Zero variances
    (identical runs) tell nothing and are left out; None with fewer than 3 left."""
    s2, d = np.asarray(variances, dtype=float), np.asarray(df, dtype=float)
    keep = s2 > 0
    s2, d = s2[keep], d[keep]
    if len(s2) < 3:
        return None
    e = np.log(s2) - special.digamma(d / 2) + np.log(d / 2)
    spread = e.var(ddof=1) - special.polygamma(1, d / 2).mean()
    if spread <= 0:                                   # no more spread than sampling gives: one variance
        return RunPrior(np.inf, float(np.exp(e.mean())))
    d0 = 2 * _trigamma_inverse(spread)
    return RunPrior(float(d0), float(np.exp(e.mean() + special.digamma(d0 / 2) - np.log(d0 / 2))))


def _trigamma_inverse(y: float) -> float:
    """x with trigamma(x) = y > 0, by Newton's method from 0.5 + 1 / y (as limma's `trigammaInverse`)."""
    x = 0.5 + 1 / y
    for _ in range(50):
        tri = special.polygamma(1, x)
        step = tri * (1 - tri / y) / special.polygamma(2, x)
        x += step
        if -step / x < 1e-8:
            break
    return float(x)


def crossed_interval(cells, *, confidence: float = 0.95, prior: RunPrior | None = None) -> Interval:
    """The mean of `cells` ((r, n): r >= 2 training runs, each evaluated on the same n images; e.g.
    per-image paired differences) with a random-effects t interval over runs and images.

    Each cell is mean + run effect + image effect + noise. The variance of the mean is estimated by
    var(run means) / r + var(image means) / n (each over-counts the noise by its share, so the sum is
    conservative by noise / (r n)), with Welch-Satterthwaite's degrees of freedom: about r - 1 where
    the runs' spread dominates (a t quantile of 4.30 at 3 runs), about n - 1 where the images' does.
    With a `prior` (`run_prior` of many claims) var(run means) is moderated: (d0 s0^2 + (r - 1) s^2) /
    (d0 + r - 1) on d0 + r - 1 degrees of freedom (Smyth 2004), so 3 runs do not decide alone how
    wide the interval is. A zero variance gives a zero-width interval."""
    d = np.asarray(cells, dtype=float)
    if d.ndim != 2 or min(d.shape) < 2:
        raise ValueError(f"crossed_interval: cells need shape (runs >= 2, images >= 2), got {d.shape}")
    r, n = d.shape
    s2, df_runs = d.mean(axis=1).var(ddof=1), r - 1
    if prior is not None and s2 > 0:
        s2, df_runs = ((prior.var, np.inf) if np.isinf(prior.df)
                       else ((prior.df * prior.var + df_runs * s2) / (prior.df + df_runs), prior.df + df_runs))
    v_runs, v_images = s2 / r, d.mean(axis=0).var(ddof=1) / n
    v = v_runs + v_images
    df = v**2 / (v_runs**2 / df_runs + v_images**2 / (n - 1)) if v > 0 else np.inf
    half = stats.t.ppf((1 + confidence) / 2, df) * np.sqrt(v)
    mean = float(d.mean())
    return Interval(mean, mean - half, mean + half, n, r, confidence, d.mean(axis=1).var(ddof=1))


def difference(a, b, *, confidence: float = 0.95, prior: RunPrior | None = None, **options) -> Interval:
    """mean(a) - mean(b) on the same images: (n,) per image (one network: `paired_difference`), or
    (r, n) per training run and image, r >= 2 (`crossed_interval` of the differences, moderated by
    `prior`). `options`: the bootstrap's (seed, resamples) for one network."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim == 2 and len(a) > 1:
        return crossed_interval(a - b, confidence=confidence, prior=prior)
    return paired_difference(a.reshape(-1), b.reshape(-1), confidence=confidence, **options)


def _plain(x) -> float | np.ndarray:
    """A float for a 0-d result, else a float array."""
    return float(x) if np.ndim(x) == 0 else np.asarray(x, dtype=float)


def _mean(x, axis):
    return x.mean(axis=axis)


def _difference(a, b, axis):
    return a.mean(axis=axis) - b.mean(axis=axis)


def _gap_closed(method, prior, oracle, axis):
    """(m - p) / (o - p) of the means; NaN where the gap o - p is <= 0 (the fraction is unbounded)."""
    p = prior.mean(axis=axis)
    gap = oracle.mean(axis=axis) - p
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, (method.mean(axis=axis) - p) / gap, np.nan)


def accuracy_interval(correct, **options) -> Interval:
    """Accuracy, the mean of `correct` ((n,) 0/1 per val image, or cells (..., n) on the same images),
    with its bootstrap interval over the images. Any per-image values work (e.g. a saliency change).
    `options`: `confidence` (0.95), `resamples` (2000), `seed` (0), `method` ('percentile'), as
    `bootstrap`."""
    return bootstrap([correct], _mean, **options)


def paired_difference(a, b, **options) -> Interval:
    """mean(a) - mean(b) of two 0/1 vectors on the same images ((n,) or (..., n), aligned by image
    key: `align`) with its paired bootstrap interval (both resampled with the same images), and its
    `verdict` / `claim`. `options` as `accuracy_interval`."""
    return bootstrap([a, b], _difference, **options)


def gap_closed_interval(method, best_prior, oracle, **options) -> Interval:
    """The fraction of the oracle gap a method closes, (m - p) / (o - p) of the mean accuracies of the
    method, the best fixed prior and the oracle on the same images ((n,) or (..., n) 0/1 each),
    numerator and denominator resampled together. The value is NaN when the gap o - p is <= 0, the
    bounds are NaN when it is <= 0 in any resample (the fraction is then unbounded). `options` as
    `accuracy_interval`."""
    return bootstrap([method, best_prior, oracle], _gap_closed, **options)


def intervals(cells: Mapping[Hashable, np.ndarray], **options) -> pd.DataFrame:
    """`accuracy_interval` of every cell ({name: (n,) per-image vector}), the cells of each n stacked
    into one call (a cell's numbers do not depend on the others): columns value, low, high, n,
    indexed by name in the order given. `options` as `accuracy_interval`."""
    by_n: dict[int, list] = {}
    for name, v in cells.items():
        by_n.setdefault(np.shape(v)[-1] if np.ndim(v) else 0, []).append(name)
    rows = {}
    for names in by_n.values():
        iv = accuracy_interval(np.stack([np.asarray(cells[k]) for k in names]), **options)
        rows |= {k: (iv.value[i], iv.low[i], iv.high[i], iv.n) for i, k in enumerate(names)}
    return pd.DataFrame([rows[k] for k in cells], index=list(cells), columns=["value", "low", "high", "n"])


def align(**tables: pd.Series | pd.DataFrame | None) -> list:
    """The per-image tables (indexed by image key) in the first one's key order (None stays None); a
    ValueError names a table whose keys repeat or differ from the first's."""
    (first, ref), *_ = [(k, t) for k, t in tables.items() if t is not None]
    out = []
    for name, t in tables.items():
        if t is None:
            out.append(None)
            continue
        missing, extra = ref.index.difference(t.index), t.index.difference(ref.index)
        if not t.index.is_unique or len(missing) or len(extra):
            raise ValueError(f"{name}: its image keys {'repeat' if not t.index.is_unique else 'differ from those of'} "
                             f"{first} ({len(missing)} missing, {len(extra)} extra, e.g. {[*missing[:1], *extra[:1]]})")
        out.append(t.loc[ref.index])
    return out


def selection_slice(keys: Sequence[str], fraction: float = SELECT_FRACTION) -> np.ndarray:
    """(n,) bool: True for the images that choose the best fixed prior, False for the rest, on which
    it is compared. An image is in the selection slice iff the first 8 bytes of the BLAKE2b hash of
    its key (personalised with SELECT_SALT), read as a fraction of 2**64, are below `fraction`: fixed
    per key, whatever the other keys, their order, the backbone, the budget or the run."""
    if not 0 < fraction < 1:
        raise ValueError(f"selection fraction must be in (0, 1), got {fraction}")
    h = [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8, person=SELECT_SALT).digest(), "little")
         for k in keys]
    return np.array(h, dtype=float) / 2**64 < fraction


@dataclass(frozen=True)
class Choice:
    """The best column of a per-image 0/1 table, chosen on the selection slice: `name`, `selection`
    (each column's accuracy on the selection slice, best first) and `keys` (the other images, on
    which the choice is to be compared)."""
    name: str
    selection: pd.Series
    keys: pd.Index


def best_held_out(table: pd.DataFrame, fraction: float = SELECT_FRACTION) -> Choice:
    """The column of `table` (per-image 0/1, index: image key; e.g. a column per fixed prior) with the
    highest accuracy on the `selection_slice` of its images (the first column on a tie), and the
    images left to compare it on. Choosing the best on the images it is compared on favours it."""
    select = selection_slice(table.index, fraction)
    if min(select.sum(), (~select).sum()) < 2:
        raise ValueError(f"best_held_out: {len(select)} images leave fewer than 2 on one side of the selection "
                         f"slice (fraction {fraction})")
    acc = table[select].mean().sort_values(ascending=False, kind="stable")
    return Choice(str(acc.index[0]), acc, table.index[~select])


def gap_closed(method, best_prior, oracle, *, confidence: float = 0.95, **options) -> Interval:
    """The fraction of the oracle gap closed, (m - p) / (o - p), on (n,) per-image vectors of one
    network (`gap_closed_interval`) or (r, n) tables of r >= 2 training runs on the same images: the
    ratio of the pooled means, its interval by the delta method on `crossed_interval` (the linearised
    cells (m - p - g (o - p)) / mean(o - p)). NaN value where the pooled gap is <= 0; NaN bounds where
    the gap's own interval holds 0 (the fraction is then unbounded)."""
    m, p, o = (np.asarray(x, dtype=float) for x in (method, best_prior, oracle))
    if m.ndim < 2 or len(m) < 2:
        return gap_closed_interval(m.reshape(-1), p.reshape(-1), o.reshape(-1), confidence=confidence, **options)
    gap = crossed_interval(o - p, confidence=confidence)
    if gap.value <= 0:
        return Interval(np.nan, np.nan, np.nan, m.shape[1], len(m), confidence)
    g = (m - p).mean() / gap.value
    z = crossed_interval((m - p - g * (o - p)) / gap.value, confidence=confidence)
    low, high = (g + z.low - z.value, g + z.high - z.value) if gap.low > 0 else (np.nan, np.nan)
    return Interval(float(g), low, high, m.shape[1], len(m), confidence)


@dataclass(frozen=True)
class Contest:
    """The best of candidates A against the best of B: `verdict` ('holds': some a beats every b;
    'reversed': some b beats every a; else 'not distinguishable'), the pair `a`, `b` that shows it (the
    highest-scoring winner against the highest-scoring other side; without a winner the highest-scoring
    a against the b it does not beat) and their difference `interval` (a - b at the confidence of the
    side that decides), `winners` (every a
    that beats every b, or every b that beats every a), `side` (the number of candidates on the side
    that decides) and `same` (pairs left out: identical data)."""
    verdict: str
    a: str
    b: str
    interval: Interval
    winners: tuple[str, ...]
    side: int
    same: tuple[tuple[str, str], ...] = ()


def best_of(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, confidence: float = 0.95,
            **options) -> Contest | None:
    """Is the best of `a` better than the best of `b`? No step chooses a best: max(A) > max(B) iff some a
    beats every b. Each a is tested against every b (an intersection-union test: every pair at the
    level), the |A| tests of the a's are Bonferroni-corrected (confidence 1 - (1 - confidence) / |A|),
    and 'reversed' is the same test with the sides swapped. So near-tied candidates cannot change the
    verdict by which one wins a selection. Values: per-image arrays, (n,) of one network or (r, n) of
    r training runs on the same images (`difference`); a pair whose data are identical (the same
    placement, e.g. isotropic and grid on the full grid) leaves its a out. None if no a is left."""
    same = tuple((x, y) for x in a for y in b if np.array_equal(a[x], b[y]))
    a = {x: v for x, v in a.items() if x not in {p[0] for p in same}}
    if not a:
        return None
    level = {"a": 1 - (1 - confidence) / len(a), "b": 1 - (1 - confidence) / len(b)}
    iv = {(side, x, y): difference(a[x], b[y], confidence=level[side], **options)
          for side in level for x in a for y in b}
    lows = {x: min(iv["a", x, y].low for y in b) for x in a}        # x beats every b where its lowest bound > 0
    highs = {y: max(iv["b", x, y].high for x in a) for y in b}      # y beats every a where this is < 0
    wins_a, wins_b = [x for x in a if lows[x] > 0], [y for y in b if highs[y] < 0]
    mean = {k: float(np.mean(v)) for k, v in (a | b).items()}
    top_a, top_b = max(a, key=mean.get), max(b, key=mean.get)
    if wins_b:                                       # the best-scoring b that beats every a, against the top a
        y = max(wins_b, key=mean.get)
        return Contest(VERDICTS[1], top_a, y, iv["b", top_a, y], tuple(wins_b), len(b), same)
    if wins_a:                                       # the best-scoring a that beats every b, against the top b
        x = max(wins_a, key=mean.get)
        return Contest(VERDICTS[0], x, top_b, iv["a", x, top_b], tuple(wins_a), len(a), same)
    y = min(b, key=lambda y: iv["a", top_a, y].low)  # the top a against the opponent it does not beat
    return Contest(VERDICTS[2], top_a, y, iv["a", top_a, y], (), len(a), same)


def percent_pm(value: float, low: float, high: float, digits: int = 1) -> str:
    """A fraction in percent with its interval's half-width in percent points: '49.0 ±3.1'
    ('±n/a' for a NaN interval)."""
    hw = 100 * (high - low) / 2
    return f"{100 * value:.{digits}f} ±" + ("n/a" if np.isnan(hw) else f"{hw:.{digits}f}")


def percent_points(value: float, low: float, high: float, digits: int = 1) -> str:
    """A difference of fractions in percent points with its interval: '+0.7 [-2.0, +3.4]'."""
    return f"{100 * value:+.{digits}f} [{100 * low:+.{digits}f}, {100 * high:+.{digits}f}]"


def percent_sd(mean: float, sd: float, digits: int = 1) -> str:
    """A mean over replicates in percent with their sd in percent points: '49.0 (sd 1.2)'."""
    return f"{100 * mean:.{digits}f} (sd {100 * sd:.{digits}f})"
