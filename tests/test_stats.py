"""spot.report.stats: bootstrap intervals over images, paired comparisons, the oracle gap closed, the best
prior chosen on held-out images, replicates. Fast unit tests (not marked slow): no pipeline runs."""
import time
import warnings

import numpy as np
import pandas as pd
import pytest

from spot.report import stats


def fixed(correct: int, n: int) -> np.ndarray:
    """(n,) bool: `correct` images right, spread over the vector."""
    return np.random.default_rng(123).permutation(np.arange(n) < correct)


def cells(count: int, n: int = 1000, seed: int = 0) -> np.ndarray:
    """(count, n) random 0/1 vectors at accuracies between 30 and 80 %."""
    rng = np.random.default_rng(seed)
    return rng.random((count, n)) < rng.uniform(0.3, 0.8, (count, 1))


def keys(n: int) -> pd.Index:
    return pd.Index([f"val_{i:06d}" for i in range(n)])


@pytest.mark.parametrize("method", ["percentile", "BCa"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_interval_matches_the_normal_approximation(method, seed):
    iv = stats.accuracy_interval(fixed(490, 1000), seed=seed, method=method)
    normal = 1.96 * np.sqrt(0.49 * 0.51 / 1000)                  # 0.0310
    assert iv.value == 0.49 and iv.n == 1000
    assert iv.low < 0.49 < iv.high
    assert iv.half_width == pytest.approx(normal, abs=0.002)
    small = stats.accuracy_interval(fixed(49, 100), seed=seed, method=method)
    assert small.half_width == pytest.approx(1.96 * np.sqrt(0.49 * 0.51 / 100), abs=0.01)
    assert 2.5 < small.half_width / iv.half_width < 4                   # sqrt(10) = 3.16


def test_same_seed_same_interval_another_seed_another():
    x = cells(20)
    a, b, c = (stats.accuracy_interval(x, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.low, b.low) and np.array_equal(a.high, b.high)
    assert not (np.array_equal(a.low, c.low) and np.array_equal(a.high, c.high))
    np.testing.assert_array_equal(a.value, x.mean(1))


def test_a_cell_alone_or_stacked_gets_the_same_interval(monkeypatch):
    x = cells(6)
    alone = stats.accuracy_interval(x[4], seed=3)
    monkeypatch.setattr(stats, "BATCH_BYTES", 5000)                     # other batches: same resamples
    table = stats.intervals({f"c{i}": v for i, v in enumerate(x)}, seed=3)
    assert list(table.index) == [f"c{i}" for i in range(6)]
    assert (table.loc["c4", ["value", "low", "high", "n"]].tolist() == [alone.value, alone.low, alone.high, 1000])


def test_intervals_of_cells_of_different_sizes():
    table = stats.intervals({"big": fixed(490, 1000), "small": fixed(49, 100)})
    assert table.n.tolist() == [1000, 100]
    assert table.loc["small"].high - table.loc["small"].low > table.loc["big"].high - table.loc["big"].low


def test_hundreds_of_cells_take_well_under_two_seconds():
    x = {i: v for i, v in enumerate(cells(300))}
    start = time.process_time()
    table = stats.intervals(x)
    assert time.process_time() - start < 2                              # 0.7 s of CPU measured
    assert ((table.low <= table.value) & (table.value <= table.high)).all()


def test_identical_vectors_are_not_distinguishable():
    a = fixed(490, 1000)
    d = stats.paired_difference(a, a.copy())
    assert (d.value, d.low, d.high) == (0, 0, 0)
    assert d.verdict == "not distinguishable"
    assert d.claim() == "not distinguishable at n = 1000"


def test_a_superset_holds_and_swapped_is_reversed():
    b = fixed(400, 1000)
    a = b.copy()
    a[np.flatnonzero(~b)[:200]] = True                                  # b's right answers and 200 more
    d, r = stats.paired_difference(a, b, seed=5), stats.paired_difference(b, a, seed=5)
    assert d.value == pytest.approx(0.2) and d.verdict == "holds" and d.low > 0.15
    assert r.verdict == "reversed" and r.claim() == "reversed at n = 1000"
    assert (r.low, r.high) == pytest.approx((-d.high, -d.low))


def test_pairing_separates_what_overlapping_intervals_cannot():
    b = fixed(490, 1000)
    a = b.copy()
    a[np.flatnonzero(~b)[:30]] = True                                   # 52.0 vs 49.0 on the same images
    ia, ib = stats.accuracy_interval(a), stats.accuracy_interval(b)
    assert ia.low < ib.high                                             # the unpaired intervals overlap
    d = stats.paired_difference(a, b)
    assert d.verdict == "holds" and 0 < d.low < 0.03 < d.high


def test_a_noisy_difference_is_not_distinguishable():
    rng = np.random.default_rng(0)
    a, b = rng.random(1000) < 0.69, rng.random(1000) < 0.684        # independent errors, 0.6 points apart
    d = stats.paired_difference(a, b)
    assert d.verdict == "not distinguishable" and d.low < 0 < d.high


def test_stacked_differences_give_a_verdict_per_cell():
    b = np.stack([fixed(400, 1000)] * 3)
    a = b.copy()
    a[0, np.flatnonzero(~b[0])[:200]] = True
    a[2, np.flatnonzero(b[2])[:200]] = False
    assert stats.paired_difference(a, b).verdict.tolist() == ["holds", "not distinguishable", "reversed"]


def test_gap_closed_known_cases():
    prior = fixed(400, 1000)
    oracle = prior.copy()
    oracle[np.flatnonzero(~prior)[:400]] = True                         # 80 %: the prior's answers and 400 more
    method = prior.copy()
    method[np.flatnonzero(oracle & ~prior)[:200]] = True                # half of the oracle's extra answers
    assert stats.gap_closed_interval(oracle, prior, oracle).value == pytest.approx(1)
    assert stats.gap_closed_interval(prior, prior, oracle).value == pytest.approx(0)
    g = stats.gap_closed_interval(method, prior, oracle)
    assert g.value == pytest.approx(0.5) and g.low < 0.5 < g.high
    # resampled together, only the 400 images of the gap vary the ratio: a proportion of 400
    assert g.half_width == pytest.approx(1.96 * np.sqrt(0.25 / 400), abs=0.01)


def test_gap_closed_with_no_gap_is_nan_without_warnings():
    prior = fixed(400, 1000)
    method = fixed(450, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = stats.gap_closed_interval(method, prior, prior)
        thin = prior.copy()
        thin[np.flatnonzero(~prior)[0]] = True                          # a gap of one image: 0 in some resamples
        g = stats.gap_closed_interval(method, prior, thin)
    assert np.isnan([none.value, none.low, none.high]).all()
    assert np.isfinite(g.value) and np.isnan([g.low, g.high]).all()


def test_selection_slice_is_fixed_per_key():
    k = keys(1000)
    sel = stats.selection_slice(k)
    order = np.random.default_rng(0).permutation(1000)
    np.testing.assert_array_equal(stats.selection_slice(k[order]), sel[order])   # not the order
    np.testing.assert_array_equal(stats.selection_slice(k[:100]), sel[:100])     # not the other keys
    assert 0.25 < sel.mean() < 0.35
    assert 0.45 < stats.selection_slice(k, 0.5).mean() < 0.55
    with pytest.raises(ValueError, match="fraction"):
        stats.selection_slice(k, 1.0)


def test_best_prior_is_chosen_on_the_selection_slice_and_compared_on_the_rest():
    k = keys(1000)
    sel = stats.selection_slice(k)
    rng = np.random.default_rng(0)
    # prior a: better on the selection slice; prior b: better on the rest and overall
    a = np.where(sel, rng.random(1000) < 0.7, rng.random(1000) < 0.4)
    b = np.where(sel, rng.random(1000) < 0.5, rng.random(1000) < 0.6)
    priors = pd.DataFrame({"b": b, "a": a}, index=k)
    assert priors.b.mean() > priors.a.mean()
    method = pd.Series(rng.random(1000) < 0.65, index=k)
    oracle = pd.Series(rng.random(1000) < 0.9, index=k)
    r = stats.against_best_prior(method.iloc[::-1], priors, oracle)     # the method's keys in another order
    assert r.choice.name == "a" and r.choice.selection.index.tolist() == ["a", "b"]
    assert set(r.choice.keys).isdisjoint(k[sel]) and len(r.choice.keys) + sel.sum() == 1000
    rest = ~sel
    assert r.difference.n == rest.sum()
    assert r.difference.value == pytest.approx(method[rest].mean() - a[rest].mean())
    assert r.gap.value == pytest.approx((method[rest].mean() - a[rest].mean()) / (oracle[rest].mean() - a[rest].mean()))
    again = stats.against_best_prior(method, priors, oracle)
    assert again.choice.name == "a" and again.choice.keys.equals(r.choice.keys) and again.difference == r.difference


def test_a_tie_on_the_selection_slice_goes_to_the_first_column():
    k = keys(200)
    same = np.random.default_rng(0).random(200) < 0.5
    assert stats.best_held_out(pd.DataFrame({"sobol": same, "grid": same}, index=k)).name == "sobol"
    assert stats.best_held_out(pd.DataFrame({"grid": same, "sobol": same}, index=k)).name == "grid"


def test_best_prior_needs_the_same_images():
    k = keys(100)
    priors = pd.DataFrame({"grid": np.ones(100, bool)}, index=k)
    with pytest.raises(ValueError, match="method: its image keys differ from those of priors"):
        stats.against_best_prior(pd.Series(np.ones(99, bool), index=k[1:]), priors)
    with pytest.raises(ValueError, match="fewer than 2"):
        stats.against_best_prior(pd.Series(np.ones(3, bool), index=k[:3]), priors.iloc[:3])


def test_replicate_summary():
    s = stats.replicate_summary([0.49, 0.51, 0.50], ["holds"] * 3)
    assert (s.mean, s.sd, s.r) == pytest.approx((0.50, 0.01, 3))
    assert s.every == "holds" and s.agreement == "holds in all 3 replicates"
    mixed = stats.replicate_summary([0.1, 0.2, 0.3], ["holds", "not distinguishable", "holds"])
    assert mixed.every is None
    assert mixed.agreement == "holds in 2 of 3 replicates, not distinguishable in 1"
    assert np.isnan(stats.replicate_summary([0.5]).sd)
    per_cell = stats.replicate_summary([[0.1, 0.5], [0.3, 0.5]])
    np.testing.assert_allclose(per_cell.mean, [0.2, 0.5])
    np.testing.assert_allclose(per_cell.sd, [np.sqrt(0.02), 0])
    with pytest.raises(ValueError, match="one verdict"):
        stats.replicate_summary([0.1, 0.2], ["holds"])
    with pytest.raises(ValueError, match="one verdict"):
        stats.replicate_summary([0.1], ["wins"])


def test_formatting():
    assert stats.percent_pm(0.49, 0.459, 0.521) == "49.0 ±3.1"
    assert stats.percent_pm(0.62, np.nan, np.nan, digits=0) == "62 ±n/a"
    assert stats.percent_points(0.007, -0.02, 0.034) == "+0.7 [-2.0, +3.4]"
    assert stats.percent_sd(0.4903, 0.0121) == "49.0 (sd 1.2)"


def test_bad_shapes_name_them():
    with pytest.raises(ValueError, match=r"\(1000,\), \(999,\)"):
        stats.paired_difference(np.ones(1000), np.ones(999))
    with pytest.raises(ValueError, match=">= 2"):
        stats.accuracy_interval(np.ones(1))
