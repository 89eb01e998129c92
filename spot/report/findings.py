"""Findings: one computed paragraph per case study of the paper, and a fifth on the label-free
placements, as findings.md (`templates/findings.md.j2`). Backbones come in the order of `results`
(`spot.report.collect`: the config's)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from spot.report.analyse import fixed_priors, gap_closed, model_name
from spot.report.render import render

OBJECT_CENTRIC = ("center", "gaussian", "salient", "model_salient")
COVERAGE = ("isotropic", "sobol", "uniform")


def off_grid(fixed: pd.DataFrame) -> list[dict]:
    """Case study 1, per backbone and budget: the best off-grid prior against the grid."""
    out = []
    for b, g in fixed.groupby("backbone", sort=False):
        parts = []
        for n, gn in g.groupby("budget"):
            grid, off = gn[gn.prior == "grid"], gn[gn.prior != "grid"]
            if not grid.empty and not off.empty:
                best = off.loc[off.top1.idxmax()]
                parts.append(dict(budget=n, prior=best.prior, best=best.top1, grid=grid.top1.iloc[0]))
        out.append(dict(backbone=b, parts=parts))
    return out


def object_centric(fixed: pd.DataFrame) -> list[dict]:
    """Case study 2, per backbone at its smallest and largest budget: the best object-centric prior
    against the best coverage prior."""
    out = []
    for b, g in fixed.groupby("backbone", sort=False):
        budgets = sorted(g.budget.unique())
        parts = []
        for n in (budgets[0], budgets[-1]) if budgets else ():
            gn = g[g.budget == n]
            oc, cov = gn[gn.prior.isin(OBJECT_CENTRIC)].top1.max(), gn[gn.prior.isin(COVERAGE)].top1.max()
            if not (np.isnan(oc) or np.isnan(cov)):
                parts.append(dict(budget=n, object_centric=oc, coverage=cov))
        out.append(dict(backbone=b, parts=parts))
    return out


def saliency(sal: pd.DataFrame) -> list[dict]:
    """Case study 3's rows of the analysis, `model` true where the model's maps were measured too."""
    rows = [] if sal.empty else sal.to_dict("records")
    return [dict(r, model=not np.isnan(r.get("model_saliency_init", np.nan))) for r in rows]


def salient_maps(fixed: pd.DataFrame) -> list[dict]:
    """Case study 3: the spectral-residual maps against the model's, where both priors ran."""
    out = []
    for (b, n), g in fixed[fixed.prior.isin(("salient", "model_salient"))].groupby(["backbone", "budget"], sort=False):
        top = dict(zip(g.prior, g.top1))
        if len(top) == 2:
            out.append(dict(backbone=b, budget=n, **top))
    return out


def label_free(gaps: pd.DataFrame, fixed: pd.DataFrame, starts) -> dict:
    """Case study 5's summary at the smallest budget (methods that close >= 30% of the gap at <= 25%
    extra FLOPs, the best per backbone), and what the gap numbers say: what seeing the image adds
    (placer over the learned prior) and what the entropy search does to its start prior (SPoT-ON's,
    `starts`)."""
    sparse = gaps[gaps.budget == gaps.budget.min()]
    met = sparse[(sparse.gap_closed >= 0.3) & (sparse.extra_flops <= 0.25)]
    valid = sparse.dropna(subset=["gap_closed"])
    best = valid.loc[valid.groupby("backbone").gap_closed.idxmax()] if not valid.empty else valid
    why = []
    top = gaps.pivot_table(index=["backbone", "budget"], columns="method", values="top1", sort=False)
    for (b, n), row in top.iterrows():
        ran = set(row.dropna().index)
        start = fixed[(fixed.backbone == b) & (fixed.budget == n) & fixed.prior.isin(starts)]
        why.append(dict(backbone=b, budget=n, placer=row.get("placer"), learned=row.get("learned"),
                        per_image={"learned", "placer"} <= ran, entropy=row.get("entropy"),
                        start=None if "entropy" not in ran or start.empty else start.iloc[0]))
    return dict(budget=sparse.budget.min(), met=met.backbone.nunique(), of=sparse.backbone.nunique(),
                best=best.to_dict("records"), why=why)


def findings(results: pd.DataFrame, trans: pd.DataFrame, sal: pd.DataFrame, ptrans: pd.DataFrame | None = None) -> str:
    """findings.md of the collected results (`spot.report.collect`)."""
    fixed = fixed_priors(results)
    gaps = gap_closed(results)
    placers = []
    for r in ptrans.itertuples() if ptrans is not None else ():
        same = fixed[(fixed.backbone == r.dst) & (fixed.budget == r.budget)].top1
        placers.append(dict(r._asdict(), best=None if same.empty else same.max()))
    return render("findings.md.j2", model_name=model_name, off_grid=off_grid(fixed),
                  object_centric=object_centric(fixed), saliency=saliency(sal),
                  salient_maps=salient_maps(fixed), oracle=results[results.oracle].to_dict("records"),
                  transfers=[] if trans.empty else trans.to_dict("records"), gaps=gaps.to_dict("records"),
                  summary=None if gaps.empty else label_free(gaps, fixed, results[results.oracle].prior.unique()),
                  placers=placers)
