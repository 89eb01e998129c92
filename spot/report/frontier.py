"""The accuracy-FLOPs frontier: the token-reduction baselines of stage reduction beside SPoT's rows.

Reads each reduction folder (`spot.stages.reduction`): its evaluated settings (`points`), its matches
of SPoT's budgets (`matches`, reachable or not) and SPoT's FLOPs per image at each budget
(`budget_flops`). Gives the results table its `flops` column, the per-image evidence of the settings
that match a budget (rows `(backbone, method, False, budget)` of `Evidence`, for case study 6), the
frontier's rows of results.csv and the table at matched FLOPs of tables.md.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from spot.methods import LABEL_FREE
from spot.report.collect import in_order, records
from spot.report.evidence import Evidence
from spot.report.stats import intervals, percent_pm
from spot.report.summary import fixed_priors
from spot.utils.io import read_json

NAMES = {"tome": "ToMe", "evit": "EViT", "lowres": "low resolution", "drop": "random drop"}
POINT_COLUMNS = ["backbone", "method", "setting", "name", "flops", "budget", "top1", "top1_low", "top1_high", "knn",
                 "knn_low", "knn_high"]


def read_frontier(inputs: dict, order: list[str], **options) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """(points, matches, budget_flops, per_image) of the reduction folders: points, a row per backbone,
    method and setting (a row per budget it matches, budget NA for sweep settings) with top-1 and kNN
    and their bootstrap intervals over the val images (`options`: seed, resamples); matches, a row per
    backbone, method and budget (target, flops, error, reachable, cheapest); budget_flops
    {(backbone, budget): SPoT's FLOPs per image}; per_image {(backbone, method, budget): the 0/1 table
    (correct, knn_correct; index key) of the setting that matches it}."""
    points, matches, flops, per_image, cells = [], [], {}, {}, {}
    for params, f in records(inputs.get("reduction", [])):
        b, m = params["backbone"], read_json(f / "metrics.json")
        pred = pd.read_parquet(f / "predictions.parquet")
        tables = {s: t.set_index("key")[["correct", "knn_correct"]].astype(float)
                  for s, t in pred.groupby("point", observed=True)}
        flops |= {(b, int(n)): v for n, v in m["budget_flops"].items()}
        matches += [dict(backbone=b, **{k: r[k] for k in ("method", "budget", "target", "flops", "error", "reachable",
                                                          "cheapest")}) for r in m["matches"]]
        for r in m["points"]:
            for n in r["budgets"] or [pd.NA]:
                points.append(dict(backbone=b, method=r["method"], setting=str(r["setting"]), name=r["name"],
                                   flops=r["flops"], budget=n, top1=r["top1"], knn=r["knn"], source=r["source"]))
                if n is not pd.NA:
                    per_image[b, r["method"], int(n)] = tables[r["source"]]
            cells |= {(b, r["source"], c): tables[r["source"]][c].to_numpy() for c in ("correct", "knn_correct")}
    iv = intervals(cells, **options) if cells else pd.DataFrame(columns=["low", "high"])
    pts = pd.DataFrame(points, columns=[*POINT_COLUMNS, "source"])
    for column, source in (("top1", "correct"), ("knn", "knn_correct")):
        for bound in ("low", "high"):
            pts[f"{column}_{bound}"] = [iv[bound].get((b, s, source), np.nan) for b, s in zip(pts.backbone, pts.source)]
    rank = {m: i for i, m in enumerate(NAMES)}
    pts = pts[POINT_COLUMNS].astype({"budget": "Int64"}).sort_values(
        ["backbone", "method", "flops"], key=lambda c: in_order(order)(c) if c.name == "backbone" else
        c.map(rank) if c.name == "method" else c, ignore_index=True)
    return pts, pd.DataFrame(matches), flops, per_image


def add_evidence(ev: Evidence, per_image: dict) -> None:
    """The matched settings' per-image tables as evidence rows `(backbone, method, False, budget)`."""
    for (b, method, n), t in per_image.items():
        ev.rows[b, method, False, n] = t


def with_flops(results: pd.DataFrame, budget_flops: dict) -> pd.DataFrame:
    """`results` with `flops`, inference FLOPs per image, after `budget`: SPoT's at the row's budget
    (`spot.core.cost.vit_flops`), times 1 + extra_flops for a label-free placement (its placer or
    search counted); SPoT-ON's is the forward at its found positions (its search uses labels). NaN
    where no reduction job recorded the backbone's budgets."""
    base = [budget_flops.get((b, int(n)), np.nan) for b, n in zip(results.backbone, results.budget)]
    extra = results.extra_flops.where(results.prior.isin(LABEL_FREE), 0).fillna(0)
    out = results.copy()
    flops = pd.Series(np.round(np.asarray(base, dtype=float) * (1 + extra.to_numpy())), index=out.index)
    out.insert(out.columns.get_loc("budget") + 1, "flops", flops.astype("Int64"))
    return out


def frontier_rows(points: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """The reduction settings as rows of results.csv: prior = the method, budget = the SPoT budget the
    setting matches (empty for a sweep setting), `setting` its parameters, flops, top-1 and kNN with
    intervals; `replicate_of` and `seed` as the backbone's other rows."""
    if points.empty:
        return pd.DataFrame(columns=results.columns)
    meta = results.drop_duplicates("backbone").set_index("backbone")
    rows = points.rename(columns={"method": "prior"}).drop(columns="name").assign(
        oracle=False, replicate_of=lambda d: d.backbone.map(meta.replicate_of) if "replicate_of" in meta else np.nan,
        seed=lambda d: d.backbone.map(meta.seed) if "seed" in meta else np.nan)
    return rows


def results_table(results: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """results.csv: `results` (with `flops`) then the reduction rows, budgets as integers (empty for
    the sweep settings), a `setting` column (empty for SPoT's rows)."""
    rows = frontier_rows(points, results)
    out = pd.concat([results.astype({"budget": "Int64"}), rows[[c for c in rows.columns if c in results or
                                                                   c == "setting"]]], ignore_index=True)
    return out[[*results.columns, "setting"]] if "setting" in out else out


def best_spot(results: pd.DataFrame, backbone: str, budget: int, tol: float) -> tuple[pd.Series | None, list[str]]:
    """The best label-free SPoT row of `backbone` at `budget` within `tol` of the budget's FLOPs
    (fixed off-grid priors, label-free placements with extra_flops <= tol), and the placements left
    out for costing more ('SPoT-placer +6.1%')."""
    mine = results[(results.backbone == backbone) & (results.budget == budget) & ~results.oracle]
    free = mine[mine.prior.isin(LABEL_FREE)]
    over = free[free.extra_flops.fillna(0) > tol]
    rows = pd.concat([fixed_priors(mine)[lambda d: d.prior != "grid"], free.drop(over.index)])
    best = rows.loc[rows.top1.idxmax()] if not rows.empty else None
    return best, [f"SPoT-{r.prior} {100 * r.extra_flops:+.1f}%" for r in over.itertuples()]


def matched_table(results: pd.DataFrame, points: pd.DataFrame, matches: pd.DataFrame, budget_flops: dict,
                  tol: float) -> pd.DataFrame:
    """Top-1 (%) at each budget's FLOPs, a row per backbone (that replicates none) and budget: the best
    label-free SPoT method there (fixed off-grid prior or placement within tol), and each reduction
    method at its matching setting, or 'unreachable (cheapest +x%)'; ± half the 95% interval."""
    primary = results[results.replicate_of.isna()] if "replicate_of" in results else results
    rows = []
    for (b, n), _ in primary.groupby(["backbone", "budget"], sort=False):
        best, _ = best_spot(results, b, n, tol)
        flops = budget_flops.get((b, int(n)), np.nan)
        row = {"backbone": b, "tokens": n, "MFLOPs": f"{flops / 1e6:.2f}",
               "best label-free SPoT": "" if best is None else f"{percent_pm(best.top1, best.top1_low, best.top1_high)} "
                                                                f"({best.prior})"}
        for method, name in NAMES.items():
            m = matches[(matches.backbone == b) & (matches.method == method) & (matches.budget == n)]
            if m.empty:
                continue
            p = points[(points.backbone == b) & (points.method == method) & (points.budget == n)]
            row[name] = (f"unreachable (cheapest {100 * (m.cheapest.iloc[0] / m.target.iloc[0] - 1):+.0f}%)"
                         if not m.reachable.iloc[0] or p.empty else
                         f"{percent_pm(p.top1.iloc[0], p.top1_low.iloc[0], p.top1_high.iloc[0])} "
                         f"({100 * m.error.iloc[0]:+.1f}% FLOPs)")
        rows.append(row)
    return pd.DataFrame(rows)


def frontier_markdown(table: pd.DataFrame, tol: float) -> str:
    """The section of tables.md with the table at matched FLOPs (empty without reduction results)."""
    if table.empty:
        return ""
    return ("\n## Accuracy at matched FLOPs (token reduction on the same weights)\n\n"
            f"Top-1 (%) ± half the 95% interval over the val images, at the FLOPs per image of SPoT at each budget: "
            f"each reduction method at its setting nearest them (its FLOPs beside it), or unreachable when no setting "
            f"lands within ±{100 * tol:.0f}%; random drop is the grid prior. Best label-free SPoT: the best fixed "
            f"off-grid prior or label-free placement whose FLOPs are within +{100 * tol:.0f}% of the budget's. "
            f"Accuracy against FLOPs: plots/frontier.png.\n\n" + table.to_markdown(index=False) + "\n")
