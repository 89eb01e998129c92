"""Findings: one paragraph per case study of the paper, and a fifth on the label-free placements, as
findings.md (`templates/findings.md.j2`). Every claim is a paired comparison on the same val images
(`spot.report.stats`) with its interval and verdict, and, where a backbone has replicates, whether
the verdict holds in each. A "best" prior is chosen on the selection slice of the images and compared
on the rest (`stats.best_held_out`). Backbones come in the order of `results` (the config's)."""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from spot.methods import LABEL_FREE
from spot.report.evidence import Evidence
from spot.report.render import render
from spot.report.stats import (
    SELECT_FRACTION,
    Interval,
    accuracy_interval,
    against_best_prior,
    align,
    best_held_out,
    paired_difference,
    percent_pm,
    percent_points,
    replicate_summary,
)
from spot.report.summary import fixed_priors, model_name

OBJECT_CENTRIC = ("center", "gaussian", "salient", "model_salient")
COVERAGE = ("isotropic", "sobol", "uniform")


class Claims:
    """The comparisons of one run: per-image evidence `ev`, `replicas` (backbone -> it and its
    replicates) and the bootstrap `options` (seed, resamples)."""

    def __init__(self, results: pd.DataFrame, ev: Evidence, replicas: dict[str, list[str]], options: dict):
        self.results, self.ev, self.replicas, self.options = results, ev, replicas, options
        self.fixed = fixed_priors(results)

    def diff(self, a: pd.Series | None, b: pd.Series | None) -> Interval | None:
        """mean(a) - mean(b) on their images, aligned by key (None if either is missing)."""
        if a is None or b is None:
            return None
        a, b = align(a=a, b=b)
        return paired_difference(a.to_numpy(), b.to_numpy(), **self.options)

    def correct(self, backbone: str, prior: str, budget: int, column: str = "correct", oracle: bool = False):
        row = self.ev.row(backbone, prior, budget, oracle)
        return None if row is None else row[column]

    def priors(self, backbone: str, budget: int, names) -> pd.DataFrame | None:
        """The per-image `correct` of the fixed priors `names` that ran, a column each (None: none ran)."""
        cols = {p: self.correct(backbone, p, budget) for p in names}
        cols = {p: c for p, c in cols.items() if c is not None}
        return pd.DataFrame(cols) if cols else None

    def sentence(self, iv: Interval | None, per_replicate: Callable[[str], Interval | None], backbone: str) -> str:
        """'+0.7 [-2.0, +3.4] points: not distinguishable at n = 705', and with replicates '; holds in 2
        of 3 replicates, ...' (`per_replicate(backbone)`: the same comparison on a replicate)."""
        if iv is None:
            return "no per-image data"
        text = f"{percent_points(iv.value, iv.low, iv.high)} points: {iv.claim()}"
        names = self.replicas.get(backbone, [backbone])
        if len(names) > 1:
            ivs = [iv] + [per_replicate(b) for b in names[1:]]
            if all(x is not None for x in ivs):
                text += f"; {replicate_summary([x.value for x in ivs], [x.verdict for x in ivs]).agreement}"
        return text

    def best_against(self, backbone: str, budget: int, group, other) -> Interval | None:
        """The best prior of `group` against the best of `other` (or the prior named `other`), both
        chosen on the selection slice, compared on the rest."""
        a = self.priors(backbone, budget, group)
        b = self.priors(backbone, budget, [other] if isinstance(other, str) else other)
        if a is None or b is None:
            return None
        ca, cb = best_held_out(a), best_held_out(b)
        return self.diff(a.loc[ca.keys, ca.name], b.loc[cb.keys, cb.name])


def off_grid(c: Claims, budgets) -> list[str]:
    """Case study 1: the best off-grid prior against the grid, per backbone and budget."""
    lines = []
    for b in c.replicas:
        for n in budgets:
            off = [p for p in c.fixed.prior.unique() if p != "grid"]
            a = c.priors(b, n, off)
            if a is None or c.correct(b, "grid", n) is None:
                continue
            name = best_held_out(a).name
            lines.append(f"{b}, {n} tokens: best off-grid prior {name} vs grid, " + c.sentence(
                c.best_against(b, n, off, "grid"), lambda r: c.best_against(r, n, off, "grid"), b))
    return lines


def object_centric(c: Claims, budgets) -> list[str]:
    """Case study 2: the best object-centric prior against the best coverage prior, at the smallest
    and largest budget."""
    lines = []
    for b in c.replicas:
        for n in sorted({budgets[0], budgets[-1]}):
            iv = c.best_against(b, n, OBJECT_CENTRIC, COVERAGE)
            if iv is not None:
                lines.append(f"{b}, {n} tokens: object-centric best vs coverage best, " + c.sentence(
                    iv, lambda r: c.best_against(r, n, OBJECT_CENTRIC, COVERAGE), b))
    return lines


def oracle(c: Claims) -> list[str]:
    """Case study 3: SPoT-ON's found positions against its start, snapped to the grid; the saliency
    under the tokens; the spectral-residual maps against the model's."""
    lines = []
    for r in c.results[c.results.oracle & c.results.backbone.isin(list(c.replicas))].itertuples():
        def vs(column, b, r=r):
            return c.diff(c.correct(b, r.prior, r.budget, column, True),
                          c.correct(b, r.prior, r.budget, "correct_init", True))
        lines.append(f"SPoT-ON {r.backbone} {r.prior} N={r.budget}: found positions vs start "
                     f"({100 * r.top1_init:.1f} -> {100 * r.top1:.1f}), " + c.sentence(vs("correct", r.backbone),
                                                                                      lambda b: vs("correct", b), r.backbone)
                     + "; snapped to the grid vs start, " + c.sentence(vs("snapped_correct", r.backbone),
                                                                       lambda b: vs("snapped_correct", b), r.backbone))
    for (b, n), s in c.ev.saliency.items():
        for prefix, maps in (("", "spectral-residual maps"), ("model_", "the model's input-gradient maps")):
            if f"{prefix}init" in s:
                change = accuracy_interval((s[f"{prefix}final"] - s[f"{prefix}init"]).to_numpy(), **c.options)
                more = accuracy_interval((s[f"{prefix}final"] > s[f"{prefix}init"]).to_numpy(float), **c.options)
                lines.append(f"saliency under SPoT-ON's tokens, {b} N={n}, {maps}: change {change.value:+.4f} "
                             f"[{change.low:+.4f}, {change.high:+.4f}] ({change.claim()}); "
                             f"{percent_pm(more.value, more.low, more.high)} % of images moved to more salient pixels")
    for b in c.replicas:
        for n in sorted(c.fixed.budget.unique()):
            iv = c.diff(c.correct(b, "salient", n), c.correct(b, "model_salient", n))
            if iv is not None:
                lines.append(f"salient prior {b} N={n}: spectral-residual maps vs the model's input-gradient maps "
                             f"(model_salient), " + c.sentence(iv, lambda r: c.diff(
                                 c.correct(r, "salient", n), c.correct(r, "model_salient", n)), b))
    return lines


def transfers(c: Claims, start: str) -> list[str]:
    """Case study 4: another backbone's oracle placements against the destination's own start prior."""
    return [f"{src} -> {dst}, N={n}: {src}'s oracle placements vs {dst}'s {start} prior, "
            + c.sentence(c.diff(t, c.correct(dst, start, n)), lambda r: None, dst)
            for (src, dst, n), t in c.ev.transfer.items()]


def label_free(c: Claims, start: str) -> list[str]:
    """Case study 5: each label-free method against the best fixed prior (chosen held out) and the
    fraction of the oracle gap it closes; what seeing the image adds; the entropy search against
    its start; another backbone's placer against the destination's own."""
    lines, gaps = [], []
    for r in c.results[c.results.prior.isin(LABEL_FREE) & c.results.backbone.isin(list(c.replicas))].itertuples():
        def best(b, r=r):
            priors = c.priors(b, r.budget, c.fixed.prior.unique())
            method = c.correct(b, r.prior, r.budget)
            return None if priors is None or method is None else against_best_prior(
                method, priors, c.correct(b, start, r.budget, oracle=True), **c.options)
        res = best(r.backbone)
        if res is None:
            continue
        gap = ("no SPoT-ON at this budget" if res.gap is None else "no gap to close (SPoT-ON does not beat it)"
               if pd.isna(res.gap.value) else f"gap closed {percent_pm(res.gap.value, res.gap.low, res.gap.high, 0)} %"
               + ("" if not pd.isna(res.gap.low) else " (the gap holds 0 in some resamples: unbounded)"))
        flops = "" if pd.isna(r.extra_flops) else f", {100 * r.extra_flops:+.1f}% FLOPs"
        lines.append(f"{model_name(r.prior, False)} {r.backbone} N={r.budget} vs the best fixed prior "
                     f"{res.choice.name}, " + c.sentence(res.difference, lambda b: getattr(best(b), "difference", None),
                                                         r.backbone) + f"; {gap}{flops}")
        if res.gap is not None and r.extra_flops <= 0.25:
            gaps.append((r.budget, r.backbone, r.prior, res.gap))
        if r.prior == "placer":
            lines.append(f"what seeing the image adds, {r.backbone} N={r.budget}: placer vs learned prior, "
                         + c.sentence(c.diff(c.correct(r.backbone, "placer", r.budget),
                                             c.correct(r.backbone, "learned", r.budget)), lambda b: c.diff(
                             c.correct(b, "placer", r.budget), c.correct(b, "learned", r.budget)), r.backbone))
        if r.prior == "entropy":
            lines.append(f"entropy search vs its start ({start}), {r.backbone} N={r.budget}: " + c.sentence(
                c.diff(c.correct(r.backbone, "entropy", r.budget), c.correct(r.backbone, start, r.budget)),
                lambda b: c.diff(c.correct(b, "entropy", r.budget), c.correct(b, start, r.budget)), r.backbone))
    if gaps:
        n = min(g[0] for g in gaps)
        verdicts = [f"{model_name(m, False)} {b} " + ("no gap" if pd.isna(g.value) else "unbounded" if pd.isna(g.low)
                                                      else "holds" if g.low >= 0.3 else "not shown" if g.high >= 0.3
                                                      else "fails") for budget, b, m, g in gaps if budget == n]
        lines.append(f"closes >= 30% of the gap at <= 25% extra FLOPs, {n} tokens (holds: the whole interval is above "
                     f"30%; not shown: it holds 30%; fails: below; no gap: SPoT-ON does not beat the prior): "
                     + ", ".join(verdicts))
    for (src, dst, n), t in c.ev.placer_transfer.items():
        lines.append(f"placer transfer {src} -> {dst}, N={n}: {src}'s placer vs {dst}'s own, "
                     + c.sentence(c.diff(t, c.correct(dst, "placer", n)), lambda r: None, dst))
    return lines


def findings(results: pd.DataFrame, ev: Evidence, replicas: dict[str, list[str]] | None = None, *,
             start: str = "isotropic", **options) -> str:
    """findings.md: every claim of the collected `results` as a paired comparison on the per-image
    evidence `ev`. `replicas`: each reported backbone -> it and its replicates (default: every backbone
    of `results`, alone); `start`: oracle.prior; `options`: seed, resamples of the bootstrap."""
    replicas = replicas or {b: [b] for b in results.backbone.unique()}
    c = Claims(results, ev, replicas, options)
    budgets = sorted(c.fixed.budget.unique())
    comparisons = dict(off_grid=off_grid(c, budgets), object_centric=object_centric(c, budgets), oracle=oracle(c),
                       transfers=transfers(c, start), label_free=label_free(c, start))
    return render("findings.md.j2", fraction=SELECT_FRACTION, count=sum(map(len, comparisons.values())),
                  **comparisons)
