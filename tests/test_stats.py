"""spot.report.stats: bootstrap intervals over images, intervals over training runs and images, paired
comparisons, the best of several candidates, the oracle gap closed. Fast unit tests (not marked slow): no pipeline runs."""
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


def test_a_tie_on_the_selection_slice_goes_to_the_first_column():
    k = keys(200)
    same = np.random.default_rng(0).random(200) < 0.5
    assert stats.best_held_out(pd.DataFrame({"sobol": same, "grid": same}, index=k)).name == "sobol"
    assert stats.best_held_out(pd.DataFrame({"grid": same, "sobol": same}, index=k)).name == "grid"


def test_best_held_out_needs_images_on_both_sides():
    with pytest.raises(ValueError, match="fewer than 2"):
        stats.best_held_out(pd.DataFrame({"grid": np.ones(3, bool)}, index=keys(3)))


def runs(accuracies, n: int = 1000, seed: int = 0) -> np.ndarray:
    """(r, n) 0/1: run s right on a random `accuracies[s]` share of the images."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.random(n) < p for p in accuracies]).astype(float)


def test_a_seed_effect_that_each_run_shows_is_not_a_finding_about_the_recipe():
    """Each training run's image-level interval holds (A beats B by 7 to 21 points in every run), but
    the runs disagree so much that the recipe-level interval over runs and images holds 0."""
    a, b = runs([0.57, 0.64, 0.71], seed=1), runs([0.50, 0.50, 0.50], seed=2)
    assert [stats.paired_difference(a[s], b[s]).verdict for s in range(3)] == ["holds"] * 3
    iv = stats.crossed_interval(a - b)
    assert iv.verdict == "not distinguishable" and iv.runs == 3 and iv.n == 1000
    assert iv.claim() == "not distinguishable over 3 runs x n = 1000"
    assert stats.difference(a, b) == iv


def test_three_runs_that_agree_hold_for_the_recipe():
    a, b = runs([0.62, 0.61, 0.63], seed=3), runs([0.50, 0.51, 0.50], seed=4)
    iv = stats.difference(a, b)
    assert iv.verdict == "holds" and iv.low > 0.05 and iv.value == pytest.approx((a - b).mean())
    assert stats.difference(b, a).verdict == "reversed"


def test_the_crossed_interval_adds_the_runs_spread_to_the_images():
    """Its variance is var(run means) / r + var(image means) / n with Satterthwaite's degrees of
    freedom: wider than either part alone, and the image-level t interval when the runs agree."""
    d = runs([0.5, 0.5, 0.5], seed=5) - runs([0.5, 0.5, 0.5], seed=6)
    iv = stats.crossed_interval(d, confidence=0.9)
    v_runs, v_images = d.mean(1).var(ddof=1) / 3, d.mean(0).var(ddof=1) / 1000
    df = (v_runs + v_images) ** 2 / (v_runs**2 / 2 + v_images**2 / 999)
    half = (iv.high - iv.low) / 2
    assert half == pytest.approx(scipy_t(0.95, df) * np.sqrt(v_runs + v_images))
    assert half > scipy_t(0.95, 999) * np.sqrt(v_images) and iv.confidence == 0.9
    shifted = d + np.array([[0.0], [0.1], [-0.1]])               # a run effect widens it
    assert stats.crossed_interval(shifted).high - stats.crossed_interval(shifted).low > 2 * (iv.high - iv.low)
    with pytest.raises(ValueError, match="runs >= 2"):
        stats.crossed_interval(d[:1])


def scipy_t(q: float, df: float) -> float:
    from scipy.stats import t
    return float(t.ppf(q, df))


def test_one_run_keeps_the_image_level_bootstrap():
    a, b = runs([0.6], seed=7), runs([0.5], seed=8)
    assert stats.difference(a, b, seed=3) == stats.paired_difference(a[0], b[0], seed=3)


def test_the_best_of_near_tied_candidates_does_not_hinge_on_a_selection():
    """sobol and center both beat the grid by about 10 points; whichever is ahead, the verdict holds and
    both are named; a candidate no better than the grid does not change it."""
    grid = runs([0.50, 0.50, 0.50], seed=10)
    for lead in ("sobol", "center"):
        cand = {"sobol": runs([0.61, 0.60, 0.61], seed=11), "center": runs([0.60, 0.61, 0.60], seed=12),
                "uniform": runs([0.50, 0.49, 0.51], seed=13)}
        cand[lead] = cand[lead] + 0.0
        won = stats.best_of(cand, {"grid": grid})
        assert won.verdict == "holds" and set(won.winners) == {"sobol", "center"} and won.b == "grid"
        assert won.interval.confidence == pytest.approx(1 - 0.05 / 3)


def test_best_of_reversed_and_not_distinguishable():
    grid = runs([0.60, 0.60, 0.60], seed=20)
    worse = {"sobol": runs([0.50, 0.51, 0.50], seed=21), "center": runs([0.49, 0.50, 0.50], seed=22)}
    won = stats.best_of(worse, {"grid": grid})
    assert won.verdict == "reversed" and won.winners == ("grid",) and won.interval.high < 0
    tied = {"sobol": runs([0.60, 0.61, 0.60], seed=23)}
    assert stats.best_of(tied, {"grid": grid}).verdict == "not distinguishable"


def test_best_of_leaves_out_identical_placements():
    grid = runs([0.6, 0.6, 0.6], seed=30)
    won = stats.best_of({"isotropic": grid.copy(), "sobol": runs([0.7, 0.7, 0.7], seed=31)}, {"grid": grid})
    assert won.same == (("isotropic", "grid"),) and won.a == "sobol" and won.verdict == "holds"
    assert stats.best_of({"isotropic": grid.copy()}, {"grid": grid}) is None


def test_gap_closed_over_runs_is_the_ratio_of_pooled_means():
    m, p, o = runs([0.7, 0.72, 0.71], seed=40), runs([0.5, 0.5, 0.5], seed=41), runs([0.9, 0.9, 0.9], seed=42)
    g = stats.gap_closed(m, p, o)
    assert g.value == pytest.approx((m - p).mean() / (o - p).mean()) and g.low < g.value < g.high and g.runs == 3
    assert np.isnan(stats.gap_closed(m, p, p).value)
    thin = stats.gap_closed(m, p, runs([0.52, 0.48, 0.5], seed=43))
    assert np.isnan(thin.low) and np.isnan(thin.high)              # the gap's interval holds 0: unbounded


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


def test_over_simulated_recipes_the_crossed_interval_covers_what_one_run_misses():
    """300 recipes whose training runs differ by a run effect (sd 5 points) around a true difference of
    5 points: the interval over 3 runs x 1000 images covers the recipe's difference in about 92 % of
    them (docs/uncertainty.md), one run's image-level interval in about 56 %."""
    rng = np.random.default_rng(0)
    crossed = single = 0
    for _ in range(300):
        q = rng.uniform(0.2, 0.8, 1000)
        a = rng.random((3, 1000)) < np.clip(q + 0.05 + 0.05 * rng.standard_normal((3, 1)), 0, 1)
        d = a.astype(float) - (rng.random((3, 1000)) < q)
        iv = stats.crossed_interval(d)
        crossed += iv.low <= 0.05 <= iv.high
        half = 1.96 * d[0].std(ddof=1) / np.sqrt(1000)
        single += abs(d[0].mean() - 0.05) <= half
    assert crossed / 300 > 0.85 and single / 300 < 0.7


def test_the_run_prior_recovers_the_spread_of_sample_variances():
    """Sample variances on 2 degrees of freedom of true variances drawn scaled inverse-chi-square(d0 = 8,
    s0^2 = 4): the moment fit finds about d0 and s0^2; variances that differ only by sampling give d0 =
    inf; zeros are left out, and fewer than 3 variances give None."""
    rng = np.random.default_rng(0)
    true = 8 * 4 / rng.chisquare(8, 4000)
    prior = stats.run_prior(true * rng.chisquare(2, 4000) / 2, np.full(4000, 2))
    assert prior.df == pytest.approx(8, rel=0.3) and prior.var == pytest.approx(4, rel=0.1)
    common = stats.run_prior(4 * rng.chisquare(2, 4000) / 2, np.full(4000, 2))
    assert common.df > 100 and common.var == pytest.approx(4, rel=0.1)
    assert stats.run_prior([0.0, 1.0, 2.0], [2, 2, 2]) is None


def test_a_prior_keeps_three_agreeing_runs_from_deciding_alone_how_wide_the_interval_is():
    """Where many claims show runs that scatter by 5 points, three runs that happen to agree still get
    an interval about as wide as the others', on more degrees of freedom than 2."""
    rng = np.random.default_rng(1)
    claims = [runs(0.6 + 0.05 * rng.standard_normal(3), seed=60 + k) - runs([0.55] * 3, seed=90 + k)
              for k in range(30)]
    prior = stats.run_prior([stats.crossed_interval(d).run_var for d in claims], [2] * 30)
    lucky = runs([0.60, 0.601, 0.599], seed=50) - runs([0.55] * 3, seed=51)
    alone, moderated = stats.crossed_interval(lucky), stats.crossed_interval(lucky, prior=prior)
    assert moderated.half_width > 1.5 * alone.half_width
    typical = np.median([stats.crossed_interval(d, prior=prior).half_width for d in claims])
    assert moderated.half_width == pytest.approx(typical, rel=0.5)
    assert stats.difference(lucky, np.zeros_like(lucky), prior=prior) == moderated
