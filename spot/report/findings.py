"""Findings: one paragraph per case study of the paper, and a fifth on the label-free placements, as
findings.md (`templates/findings.md.j2`) and a row per claim (`Claim`, findings.csv).

Every claim is a paired comparison on the same val images (`spot.report.stats`), made at the level
it is about: a backbone trained here with replicates (`backbones.<name>.seeds`) is a recipe, and its
claims combine the training runs and the images in one interval (`stats.crossed_interval`); a
backbone trained once says so, and fetched weights are one fixed network (image-level bootstrap).
A claim about "the best" of several priors tests every candidate (`stats.best_of`), so no selection
step decides it. Backbones come in the order of `results` (the config's)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from spot.methods import LABEL_FREE
from spot.report.evidence import Evidence
from spot.report.render import render
from spot.report.stats import (
    SELECT_FRACTION,
    Contest,
    Interval,
    RunPrior,
    accuracy_interval,
    align,
    best_held_out,
    best_of,
    difference,
    gap_closed,
    percent_pm,
    percent_points,
    run_prior,
)
from spot.report.summary import fixed_priors, model_name

OBJECT_CENTRIC = ("center", "gaussian", "salient", "model_salient")
COVERAGE = ("isotropic", "sobol", "uniform")
ONE_RUN, FIXED = "one training run", "fixed weights"

Getter = Callable[[str], pd.Series | None]     # a training run's name -> its per-image values (None: not run)


@dataclass(frozen=True)
class Claim:
    """One comparison of findings.md: its case study, `subject` (the same words in every run, so two
    runs' claims pair up), `level` ('3 training runs', 'one training run', 'fixed weights'), verdict,
    the difference and its interval (fractions) at `confidence`, and the line as printed."""
    case: int
    subject: str
    level: str
    verdict: str
    value: float
    low: float
    high: float
    confidence: float
    text: str


class Claims:
    """The comparisons of one run: per-image evidence `ev`, `replicas` (backbone -> it and its
    replicates), `fixed` (backbones of fetched weights), the bootstrap `options` (seed, resamples) and
    the `prior` of the runs' spread that every claim over training runs is moderated by."""

    def __init__(self, results: pd.DataFrame, ev: Evidence, replicas: dict[str, list[str]], fixed: set[str],
                 options: dict, prior: RunPrior | None = None):
        self.results, self.ev, self.replicas, self.fixed_weights, self.options = results, ev, replicas, fixed, options
        self.prior, self.fixed = prior, fixed_priors(results)
        self.made: list[Claim] = []
        self.spreads: list[tuple[float, int]] = []     # (variance of the run means, runs - 1) per claim over runs

    def correct(self, backbone: str, prior: str, budget: int, column: str = "correct", oracle: bool = False):
        row = self.ev.row(backbone, prior, budget, oracle)
        return None if row is None else row[column]

    def runs(self, backbone: str, *getters: Getter) -> list[str]:
        """The training runs of `backbone` that every getter has data of: all its replicas, else the
        backbone alone (e.g. a transfer that replicates do not run), else none."""
        names = self.replicas.get(backbone, [backbone])
        for group in (names, names[:1]):
            if all(g(r) is not None for g in getters for r in group):
                return group
        return []

    def arrays(self, backbone: str, getters: dict[str, Getter]) -> tuple[dict[str, np.ndarray], list[str]]:
        """{name: (runs, n) per-image values on the first getter's image order of the first run} over
        `runs`, and those runs ({}, [] if some getter has no data)."""
        runs = self.runs(backbone, *getters.values())
        if not runs:
            return {}, []
        first = next(iter(getters.values()))(runs[0])
        out = {k: np.stack([align(ref=first, x=g(r))[1].to_numpy() for r in runs]) for k, g in getters.items()}
        return out, runs

    def level(self, backbone: str, runs: int) -> str:
        return FIXED if backbone in self.fixed_weights else ONE_RUN if runs == 1 else f"{runs} training runs"

    def say(self, case: int, subject: str, backbone: str, runs: int, iv: Interval, detail: str = "",
            pair: str = "") -> str:
        """Record the claim and give its line: 'subject: pair +0.7 [-2.0, +3.4] points: not
        distinguishable at n = 1000 (one training run)detail'."""
        level = self.level(backbone, runs)
        if runs > 1:
            self.spreads.append((iv.run_var, runs - 1))
        conf = "" if iv.confidence == 0.95 else f" ({100 * iv.confidence:.1f} % interval)"
        text = (f"{subject}: {pair}{percent_points(iv.value, iv.low, iv.high)} points{conf}: {iv.claim()}"
                + ("" if runs > 1 else f" ({level})") + detail)
        self.made.append(Claim(case, subject, level, iv.verdict, float(iv.value), float(iv.low), float(iv.high),
                               iv.confidence, text))
        return text

    def compare(self, case: int, subject: str, backbone: str, a: Getter, b: Getter, detail: str = "") -> str | None:
        """mean(a) - mean(b) over the backbone's runs (None where a run lacks either)."""
        x, runs = self.arrays(backbone, {"a": a, "b": b})
        if not runs:
            return None
        return self.say(case, subject, backbone, len(runs), difference(x["a"], x["b"], prior=self.prior, **self.options),
                        detail)

    def contest(self, case: int, subject: str, backbone: str, group_a, group_b, budget: int) -> str | None:
        """The best of `group_a` against the best of `group_b` (rows of the results by prior or method
        name, at `budget`; `stats.best_of`). None where one side has no data."""
        getters = {p: (lambda r, p=p: self.correct(r, p, budget)) for p in (*group_a, *group_b)}
        x, runs = self.arrays(backbone, {p: g for p, g in getters.items() if g(backbone) is not None})
        a, b = ({p: x[p] for p in group if p in x} for group in (group_a, group_b))
        won = best_of(a, b, prior=self.prior, **self.options) if a and b else None
        return None if won is None else self.say(case, subject, backbone, len(runs), won.interval, contest_detail(won),
                                                 f"{won.a} vs {won.b} ")


def contest_detail(c: Contest) -> str:
    """What a `Contest` adds to its line: who beats every opponent, which pairs were identical."""
    text = ""
    if c.winners and c.side > 1:
        text += (f"; {'candidates' if c.verdict == 'holds' else 'opponents'} that beat every "
                 f"{'opponent' if c.verdict == 'holds' else 'candidate'}: {', '.join(c.winners)}")
    for x in dict.fromkeys(x for x, _ in c.same):
        ys = [y for x2, y in c.same if x2 == x]
        text += (f"; {x} places its tokens as {', '.join(ys)} {'does' if len(ys) == 1 else 'do'} here (identical "
                 f"per-image results): left out")
    return text


def off_grid(c: Claims, budgets) -> list[str]:
    """Case study 1: the best off-grid prior against the grid, per backbone and budget."""
    off = [p for p in c.fixed.prior.unique() if p != "grid"]
    return [line for b in c.replicas for n in budgets
            if (line := c.contest(1, f"{b}, {n} tokens: best off-grid prior vs grid", b, off, ["grid"], n))]


def object_centric(c: Claims, budgets) -> list[str]:
    """Case study 2: the best object-centric prior against the best coverage prior, at the smallest
    and largest budget."""
    return [line for b in c.replicas for n in sorted({budgets[0], budgets[-1]})
            if (line := c.contest(2, f"{b}, {n} tokens: object-centric best vs coverage best", b, OBJECT_CENTRIC,
                                  COVERAGE, n))]


def oracle(c: Claims) -> list[str]:
    """Case study 3: SPoT-ON's found positions against its start, snapped to the grid; the saliency
    under the tokens; the spectral-residual maps against the model's."""
    lines = []
    for r in c.results[c.results.oracle & c.results.backbone.isin(list(c.replicas))].itertuples():
        def column(name, r=r):
            return lambda b: c.correct(b, r.prior, r.budget, name, True)
        found = c.compare(3, f"SPoT-ON {r.backbone} {r.prior} N={r.budget}: found positions vs start", r.backbone,
                          column("correct"), column("correct_init"), f" (top-1 {100 * r.top1_init:.1f} -> "
                                                                     f"{100 * r.top1:.1f} on {r.backbone})")
        snapped = c.compare(3, f"SPoT-ON {r.backbone} {r.prior} N={r.budget}: snapped to the grid vs start",
                            r.backbone, column("snapped_correct"), column("correct_init"))
        lines += [x for x in (found, snapped) if x]
    for (b, n), s in c.ev.saliency.items():
        for prefix, maps in (("", "spectral-residual maps"), ("model_", "the model's input-gradient maps")):
            if f"{prefix}init" in s:
                change = accuracy_interval((s[f"{prefix}final"] - s[f"{prefix}init"]).to_numpy(), **c.options)
                more = accuracy_interval((s[f"{prefix}final"] > s[f"{prefix}init"]).to_numpy(float), **c.options)
                lines.append(f"saliency under SPoT-ON's tokens, {b} N={n}, {maps}: change {change.value:+.4f} "
                             f"[{change.low:+.4f}, {change.high:+.4f}] ({change.claim()}, {c.level(b, 1)}); "
                             f"{percent_pm(more.value, more.low, more.high)} % of images moved to more salient pixels")
    for b in c.replicas:
        for n in sorted(c.fixed.budget.unique()):
            line = c.compare(3, f"salient prior {b} N={n}: spectral-residual maps vs the model's input-gradient maps "
                             f"(model_salient)", b, lambda r, n=n: c.correct(r, "salient", n),
                             lambda r, n=n: c.correct(r, "model_salient", n))
            if line:
                lines.append(line)
    return lines


def transfers(c: Claims, start: str) -> list[str]:
    """Case study 4: another backbone's oracle placements against the destination's own start prior,
    over the destination's runs (each with the source's run of the same draw, where replicates transfer)."""
    return [c.compare(4, f"{src} -> {dst}, N={n}: {src}'s oracle placements vs {dst}'s {start} prior", dst,
                      lambda r, k=(src, n): c.ev.transfer.get((k[0], r, k[1])), lambda r, n=n: c.correct(r, start, n))
            for src, dst, n in c.ev.transfer if dst in c.replicas]


def gap_line(c: Claims, backbone: str, method: str, budget: int, start: str) -> tuple[str, Interval | None]:
    """The fraction of the oracle gap `method` closes: the best fixed prior chosen on the selection
    slice of the images, averaged over the training runs, and the fraction on the other images."""
    fixed = list(c.fixed[(c.fixed.backbone == backbone) & (c.fixed.budget == budget)].prior)
    getters = {p: (lambda r, p=p: c.correct(r, p, budget)) for p in fixed}
    getters |= {"method": lambda r: c.correct(r, method, budget), "oracle": lambda r: c.correct(r, start, budget,
                                                                                                oracle=True)}
    x, runs = c.arrays(backbone, getters)
    if not runs:
        return "no SPoT-ON at this budget", None
    keys = getters[fixed[0]](runs[0]).index             # the image order of the arrays
    choice = best_held_out(pd.DataFrame({p: x[p].mean(axis=0) for p in fixed}, index=keys))
    rest = keys.isin(choice.keys)                   # the images not used to choose
    gap = gap_closed(x["method"][:, rest], x[choice.name][:, rest], x["oracle"][:, rest], **c.options)
    if np.isnan(gap.value):
        return f"no gap to close (SPoT-ON does not beat {choice.name})", gap
    return (f"gap closed {percent_pm(gap.value, gap.low, gap.high, 0)} % (best fixed prior {choice.name}, chosen on "
            f"{100 * SELECT_FRACTION:.0f} % of the images" + ("" if not np.isnan(gap.low) else
                                                             "; the gap holds 0: unbounded") + ")"), gap


def label_free(c: Claims, start: str) -> list[str]:
    """Case study 5: each label-free method against the best fixed prior and the fraction of the oracle
    gap it closes; what seeing the image adds; the entropy search against its start; another
    backbone's placer against the destination's own."""
    lines, gaps = [], []
    for r in c.results[c.results.prior.isin(LABEL_FREE) & c.results.backbone.isin(list(c.replicas))].itertuples():
        fixed = list(c.fixed[(c.fixed.backbone == r.backbone) & (c.fixed.budget == r.budget)].prior)
        gap, iv = gap_line(c, r.backbone, r.prior, r.budget, start)
        flops = "" if pd.isna(r.extra_flops) else f", {100 * r.extra_flops:+.1f}% FLOPs"
        line = c.contest(5, f"{model_name(r.prior, False)} {r.backbone} N={r.budget} vs the best fixed prior",
                         r.backbone, [r.prior], fixed, r.budget)
        if line is None:
            continue
        lines.append(f"{line}; {gap}{flops}")
        if iv is not None and r.extra_flops <= 0.25:
            gaps.append((r.budget, r.backbone, r.prior, iv))
        if r.prior == "placer":
            lines.append(c.compare(5, f"what seeing the image adds, {r.backbone} N={r.budget}: placer vs learned prior",
                                   r.backbone, lambda b, n=r.budget: c.correct(b, "placer", n),
                                   lambda b, n=r.budget: c.correct(b, "learned", n)))
        if r.prior == "entropy":
            lines.append(c.compare(5, f"entropy search vs its start ({start}), {r.backbone} N={r.budget}", r.backbone,
                                   lambda b, n=r.budget: c.correct(b, "entropy", n),
                                   lambda b, n=r.budget: c.correct(b, start, n)))
    if gaps:
        n = min(g[0] for g in gaps)
        verdicts = [f"{model_name(m, False)} {b} " + ("no gap" if np.isnan(g.value) else "unbounded" if np.isnan(g.low)
                                                      else "holds" if g.low >= 0.3 else "not shown" if g.high >= 0.3
                                                      else "fails") for budget, b, m, g in gaps if budget == n]
        lines.append(f"closes >= 30% of the gap at <= 25% extra FLOPs, {n} tokens (holds: the whole interval is above "
                     f"30%; not shown: it holds 30%; fails: below; no gap: SPoT-ON does not beat the prior): "
                     + ", ".join(verdicts))
    for src, dst, n in [k for k in c.ev.placer_transfer if k[1] in c.replicas]:
        lines.append(c.compare(5, f"placer transfer {src} -> {dst}, N={n}: {src}'s placer vs {dst}'s own", dst,
                               lambda r, k=(src, n): c.ev.placer_transfer.get((k[0], r, k[1])),
                               lambda r, n=n: c.correct(r, "placer", n)))
    return [x for x in lines if x]


def describe(prior: RunPrior) -> str:
    """The prior in words: 'a run sd of 2.5 points, worth 4.6 runs' degrees of freedom'."""
    df = "infinitely many (one spread for all claims)" if np.isinf(prior.df) else f"{prior.df:.1f}"
    return f"a run sd of {100 * np.sqrt(prior.var):.1f} points, worth {df} degrees of freedom"


def frontier(c: Claims, matches: pd.DataFrame | None, budget_flops: dict, tol: float = 0.02) -> list[str]:
    """Case study 6: at each budget, the best label-free SPoT method (a fixed off-grid prior, or a
    label-free placement whose FLOPs are within +tol of the budget's) against the best token-reduction
    baseline whose setting lands within ±tol of that compute (`matches` of stage reduction; random drop
    is the grid prior), paired on the same images (`Claims.contest`, over training runs where the
    backbone has replicates). A method that reaches no setting there is named unreachable with the
    distance of its cheapest setting, and a budget no baseline reaches is stated as such."""
    if matches is None or matches.empty:
        return []
    names = {"tome": "ToMe", "evit": "EViT", "lowres": "low resolution", "drop": "random drop"}
    lines = []
    for b in c.replicas:
        mine = matches[matches.backbone == b]
        for n in sorted(mine.budget.unique()):
            at = mine[mine.budget == n]
            flops = budget_flops.get((b, int(n)))
            where = f"{b}, {n} tokens ({flops / 1e6:.2f} MFLOPs)" if flops else f"{b}, {n} tokens"
            off = "; unreachable at this compute: " + ", ".join(
                f"{names.get(r.method, r.method)} (cheapest {100 * (r.cheapest / r.target - 1):+.0f}%)"
                for r in at[~at.reachable].itertuples()) if (~at.reachable).any() else ""
            reach = [m for m in at[at.reachable].method if c.correct(b, m, int(n)) is not None]
            if not reach:
                lines.append(f"{where}: no reduction baseline reaches this compute{off}")
                continue
            mine_rows = c.results[(c.results.backbone == b) & (c.results.budget == n) & ~c.results.oracle]
            free = mine_rows[mine_rows.prior.isin(LABEL_FREE)]
            over = free[free.extra_flops.fillna(0) > tol]
            spot = [p for p in c.fixed[(c.fixed.backbone == b) & (c.fixed.budget == n)].prior if p != "grid"]
            spot += [p for p in free.prior if p not in set(over.prior)]
            line = c.contest(6, f"{where}: best label-free SPoT vs best reduction baseline at equal FLOPs", b, spot,
                             reach, int(n))
            if line:
                left = "; left out, above this compute: " + ", ".join(
                    f"{model_name(r.prior, False)} ({100 * r.extra_flops:+.1f}% FLOPs)" for r in over.itertuples())
                lines.append(line + off + (left if len(over) else ""))
    return lines


def findings(results: pd.DataFrame, ev: Evidence, replicas: dict[str, list[str]] | None = None, *,
             fixed: set[str] = frozenset(), start: str = "isotropic", matches: pd.DataFrame | None = None,
             budget_flops: dict | None = None, tolerance: float = 0.02, **options) -> tuple[str, pd.DataFrame]:
    """findings.md and a row per claim (`Claim`): every claim of the collected `results` as a paired
    comparison on the per-image evidence `ev`. `replicas`: each reported backbone -> it and its
    replicates (default: every backbone of `results`, alone); `fixed`: backbones of fetched weights;
    `start`: oracle.prior; `options`: seed, resamples of the bootstrap over one network's images.
    The claims are made twice: the first time tells how the runs of this report spread
    (`stats.run_prior` of every claim over runs), the second moderates each claim's spread by it."""
    replicas = replicas or {b: [b] for b in results.backbone.unique()}

    def made(prior: RunPrior | None) -> tuple[Claims, dict[str, list[str]]]:
        c = Claims(results, ev, replicas, set(fixed), options, prior)
        budgets = sorted(c.fixed.budget.unique())
        return c, dict(off_grid=off_grid(c, budgets), object_centric=object_centric(c, budgets), oracle=oracle(c),
                       transfers=[x for x in transfers(c, start) if x], label_free=label_free(c, start),
                       frontier=frontier(c, matches, budget_flops or {}, tolerance))
    first, _ = made(None)
    prior = run_prior(*zip(*first.spreads)) if first.spreads else None
    c, comparisons = made(prior)
    text = render("findings.md.j2", fraction=SELECT_FRACTION, count=len(c.made), prior=prior and describe(prior),
                  recipes=sum(not x.level.startswith(("one", "fixed")) for x in c.made), **comparisons)
    return text, pd.DataFrame([asdict(x) for x in c.made], columns=list(Claim.__dataclass_fields__))
