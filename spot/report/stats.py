"""How sure the report's numbers are: bootstrap intervals over val images, paired comparisons, the
fraction of the oracle gap closed, the best fixed prior chosen on held-out images, replicate spread.

Every number of the report is a mean over val images, so its interval comes from one call of
`scipy.stats.bootstrap` that resamples the images; the vectors of a comparison are resampled with
the same image indices (`paired=True`), so what the images share cancels. Inputs are per-image
vectors, shape (n,) for n images, or cells stacked in leading axes (..., n) on the same images:
stacked cells see the same resamples, so a cell's interval is the same alone or stacked, and a
stack is one vectorised call. Values are fractions (accuracies in [0, 1]); the `percent_*`
helpers render percent and percent points.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

VERDICTS = ("holds", "reversed", "not distinguishable")
BATCH_BYTES = 1 << 26            # memory of the resampled copies of the data held at once (64 MiB)
SELECT_FRACTION = 0.3            # share of the val images that chooses the best fixed prior
SELECT_SALT = b"spot-best-prior"  # personalises the key hash of `selection_slice` (at most 16 bytes)


@dataclass(frozen=True)
class Interval:
    """A statistic of `n` images (a mean, a difference of means, a ratio of them) and its bootstrap
    interval [`low`, `high`]: floats, or arrays (...,) for stacked cells."""
    value: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    n: int

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
        """The verdict of one difference with its sample size: 'not distinguishable at n = 1000'."""
        return f"{self.verdict} at n = {self.n}"


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
    return Interval(_plain(statistic(*samples, axis=-1)), _plain(ci.low), _plain(ci.high), n)


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


@dataclass(frozen=True)
class BestPrior:
    """A method against the best fixed prior chosen on held-out images: `choice` (`best_held_out`:
    the prior, its selection, the images compared), `difference` (method - prior on those images,
    paired) and `gap` (the fraction of the oracle gap closed there; None without an oracle)."""
    choice: Choice
    difference: Interval
    gap: Interval | None


def against_best_prior(method: pd.Series, priors: pd.DataFrame, oracle: pd.Series | None = None, *,
                       fraction: float = SELECT_FRACTION, **options) -> BestPrior:
    """A label-free method against the best fixed prior without favouring the prior: the prior is
    chosen on the selection slice (`best_held_out`) and compared on the other images only.
    `method`, `oracle`: per-image 0/1 (index: image key), `priors`: a 0/1 column per fixed prior,
    all on the same keys. `options` as `accuracy_interval`."""
    priors, method, oracle = align(priors=priors, method=method, oracle=oracle)
    choice = best_held_out(priors, fraction)
    m, p = method[choice.keys].to_numpy(), priors.loc[choice.keys, choice.name].to_numpy()
    gap = gap_closed_interval(m, p, oracle[choice.keys].to_numpy(), **options) if oracle is not None else None
    return BestPrior(choice, paired_difference(m, p, **options), gap)


@dataclass(frozen=True)
class Replicates:
    """A number over replicates (training seeds, prior seeds): `mean` and `sd` (ddof 1; NaN for one
    replicate) over the replicates' axis, their count `r`, and the verdict of a paired comparison in
    each replicate (`verdicts`, empty if none was given)."""
    mean: float | np.ndarray
    sd: float | np.ndarray
    r: int
    verdicts: tuple[str, ...] = ()

    @property
    def every(self) -> str | None:
        """The verdict of every replicate if they agree, else None."""
        return self.verdicts[0] if self.verdicts and len(set(self.verdicts)) == 1 else None

    @property
    def agreement(self) -> str:
        """'holds in all 3 replicates', or each verdict's count: 'holds in 2 of 3 replicates, not
        distinguishable in 1'."""
        if self.every:
            return f"{self.every} in all {self.r} replicates"
        (top, c), *rest = Counter(self.verdicts).most_common()
        return f"{top} in {c} of {self.r} replicates" + "".join(f", {v} in {k}" for v, k in rest)


def replicate_summary(values, verdicts: Sequence[str] = ()) -> Replicates:
    """Mean and sd of `values` ((r,) one number per replicate, or (r, ...) cells) over the replicates,
    with the verdict of a paired comparison in each replicate (`Interval.verdict`), if given."""
    v, verdicts = np.asarray(values, dtype=float), tuple(verdicts)
    r = len(v)
    if r == 0 or (verdicts and len(verdicts) != r) or any(x not in VERDICTS for x in verdicts):
        raise ValueError(f"replicate_summary: {r} values and verdicts {list(verdicts)}: need >= 1 value and, "
                         f"if given, one verdict of {VERDICTS} per value")
    sd = v.std(axis=0, ddof=1) if r > 1 else np.full(v.shape[1:], np.nan)
    return Replicates(_plain(v.mean(axis=0)), _plain(sd), r, verdicts)


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
