"""The collected results summarised (`spot.report.collect` makes them): the paper's model names, the
fixed priors, the gap the label-free placements close, and the numbers of metrics.json and the DVC metrics.

`results` has a row per backbone, prior (or label-free method), oracle flag and budget. The fixed
priors are the rows that are neither SPoT-ON nor a label-free placement.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from spot.methods import LABEL_FREE

PAPER_ORDER = ("grid", "uniform", "gaussian", "sobol", "isotropic", "center", "salient", "model_salient")


def model_name(prior: str, oracle: bool) -> str:
    """The paper's name of a results row's model: 'ViT' (grid), 'SPoT', 'SPoT-ON', 'SPoT-placer'."""
    if prior in LABEL_FREE:
        return f"SPoT-{prior}"
    return "SPoT-ON" if oracle else ("ViT" if prior == "grid" else "SPoT")


def fixed_priors(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of fixed priors (neither SPoT-ON nor a label-free placement)."""
    return results[~results.oracle & ~results.prior.isin(LABEL_FREE)]


def gap_closed(results: pd.DataFrame) -> pd.DataFrame:
    """Per label-free method, backbone and budget: top1, the best fixed prior (name, top1), SPoT-ON's
    top1 (NaN without a search at that budget), gap_closed (NaN where SPoT-ON does not beat the best
    fixed prior) and extra_flops; backbones in the order of `results`."""
    fixed, orc = fixed_priors(results), results[results.oracle]
    rows = []
    for r in results[results.prior.isin(LABEL_FREE)].itertuples():
        same = fixed[(fixed.backbone == r.backbone) & (fixed.budget == r.budget)]
        on = orc[(orc.backbone == r.backbone) & (orc.budget == r.budget)].top1
        if same.empty:
            continue
        best = same.loc[same.top1.idxmax()]
        top = on.max() if not on.empty else np.nan
        rows.append(dict(method=r.prior, backbone=r.backbone, budget=r.budget, top1=r.top1, best_prior=best.prior,
                         best_fixed=best.top1, oracle_top1=top, gap_closed=(r.top1 - best.top1) / (top - best.top1)
                         if top > best.top1 else np.nan, extra_flops=r.extra_flops))
    columns = ["method", "backbone", "budget", "top1", "best_prior", "best_fixed", "oracle_top1", "gap_closed",
               "extra_flops"]
    rank = {"method": {m: i for i, m in enumerate(LABEL_FREE)},
            "backbone": {b: i for i, b in enumerate(results.backbone.unique())}}
    return pd.DataFrame(rows, columns=columns).sort_values(["backbone", "budget", "method"], key=lambda c: c.map(
        rank[c.name]) if c.name in rank else c, ignore_index=True)


def flat_metrics(results: pd.DataFrame, trans: pd.DataFrame, gaps: pd.DataFrame,
                 sal: pd.DataFrame | None = None) -> dict[str, float]:
    """Every number, flat ('<backbone>/<prior>[/oracle]/<budget>/top1', 'transfer/<src>__<dst>/<budget>/gain',
    '<backbone>/<method>/<budget>/gap_closed', '<backbone>/<prior>[/oracle]/<budget>/saliency'), fractions
    rounded to 6 digits: the report's metrics.json."""
    flat = {f"{r.backbone}/{r.prior}{'/oracle' if r.oracle else ''}/{r.budget}/{c}": round(float(getattr(r, c)), 6)
            for r in results.itertuples() for c in ("top1", "knn", *bounds(r, "top1", "knn"))}
    flat |= {f"transfer/{r.src}__{r.dst}/{r.budget}/gain": round(float(r.gain), 6) for r in trans.itertuples()}
    flat |= {f"{r.backbone}/{r.method}/{r.budget}/{c}": round(float(getattr(r, c)), 6)
             for r in gaps.itertuples() for c in ("gap_closed", "extra_flops") if not np.isnan(getattr(r, c))}
    for r in sal.itertuples() if sal is not None else ():
        for prefix in ("", "model_"):
            for at, when in (("", "init"), ("/oracle", "final")):
                value = getattr(r, f"{prefix}saliency_{when}", np.nan)
                if not pd.isna(value):
                    flat[f"{r.backbone}/{r.prior}{at}/{r.budget}/{prefix}saliency"] = round(float(value), 6)
    return flat


def bounds(row, *columns: str) -> list[str]:
    """The interval columns of `columns` a results row has and fills (`<c>_low`, `<c>_high`)."""
    return [f"{c}_{b}" for c in columns for b in ("low", "high") if not pd.isna(getattr(row, f"{c}_{b}", np.nan))]


def metric_folder(backbone: str, results: pd.DataFrame) -> str:
    """The folder of a backbone's DVC metrics: '<backbone>', or '<recipe>/s<seed>' for a backbone with
    replicates and for each replicate, so that `spot/s0` (the backbone) sorts before `spot/s1`."""
    if "replicate_of" not in results:
        return backbone
    of = results.drop_duplicates("backbone").set_index("backbone").replicate_of.dropna()
    recipe = of.get(backbone, backbone)
    if recipe not in set(of):
        return backbone
    return f"{recipe}/s{int(results.loc[results.backbone == backbone, 'seed'].iloc[0])}"


def metric_rows(results: pd.DataFrame, trans: pd.DataFrame, ptrans: pd.DataFrame | None = None) -> dict[str, dict]:
    """The DVC metrics: one small file per backbone and way of placing tokens (`metric_folder`/<row>.json),
    keyed by budget, then top1 / knn in percent (1 decimal), so that `dvc metrics show` prints the
    paper's table, a row per file, in a few columns.

    Budgets are zero-padded, so `dvc metrics show` sorts its columns by budget. Rows: each prior,
    `spot-on` (the oracle), `spot-on-snapped` (its positions snapped to the grid),
    `transfer-from-<src>` (another backbone's oracle positions), `learned`, `placer`, `entropy`
    (label-free placements), `placer-from-<src>` (another backbone's placer). Intervals, the gap
    closed, extra FLOPs and saliency are in tables.md, results.csv and metrics.json, not here: a
    column each would widen every row of `dvc metrics show`."""
    budgets = list(results.budget) + (list(trans.budget) if not trans.empty else [])
    width = len(str(max(budgets)))
    rows: dict[str, dict] = {}

    def put(backbone, row, budget, **values):
        cell = rows.setdefault(f"{metric_folder(backbone, results)}/{row}.json", {}).setdefault(
            f"{int(budget):0{width}d}", {})
        cell.update({k: round(100 * float(v), 1) for k, v in values.items() if not pd.isna(v)})

    for r in results.itertuples():
        if r.oracle:
            put(r.backbone, "spot-on", r.budget, top1=r.top1, knn=r.knn)
            put(r.backbone, "spot-on-snapped", r.budget, top1=r.top1_snapped)
        else:
            put(r.backbone, r.prior, r.budget, top1=r.top1, knn=r.knn)
    for r in trans.itertuples() if not trans.empty else ():
        if r.src != r.dst:
            put(r.dst, f"transfer-from-{r.src}", r.budget, top1=r.top1_transfer)
    for r in ptrans.itertuples() if ptrans is not None else ():
        put(r.dst, f"placer-from-{r.src}", r.budget, top1=r.top1)
    return {k: dict(sorted(v.items())) for k, v in sorted(rows.items())}
