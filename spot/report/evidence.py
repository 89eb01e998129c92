"""Evidence: the per-image files behind the report's numbers, and their intervals (`spot.report.stats`).

Every accuracy of `results` is a mean over the same val images, so each row keeps its per-image 0/1
vectors, indexed by image key: `correct`, `knn_correct` (and SPoT-ON's `correct_init`,
`snapped_correct`). Replicates of a backbone (`backbones.<name>.seeds`) are rows of their own; extra
draws of a seeded prior (`eval.prior_seeds`) are kept beside their row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from spot.methods import LABEL_FREE
from spot.report.collect import records
from spot.report.stats import intervals

ORACLE_COLUMNS = {"correct": "correct", "knn_correct": "knn_correct", "correct_init": "correct_init",
                  "snapped_correct": "snapped_correct"}
INTERVALS = {"top1": "correct", "knn": "knn_correct", "top1_init": "correct_init", "top1_snapped": "snapped_correct"}


@dataclass
class Evidence:
    """Per-image tables (index: image key) of a run. `rows[(backbone, prior, oracle, budget)]`: the
    0/1 columns of a results row; `draws[(backbone, prior, budget)]`: key, draw, correct,
    knn_correct of the extra prior draws; `transfer[(src, dst, budget)]`, `placer_transfer[...]`:
    `correct`; `saliency[(backbone, budget)]`: init, final (and model_init, model_final)."""
    rows: dict = field(default_factory=dict)
    draws: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)
    placer_transfer: dict = field(default_factory=dict)
    saliency: dict = field(default_factory=dict)

    def row(self, backbone: str, prior: str, budget: int, oracle: bool = False) -> pd.DataFrame | None:
        return self.rows.get((backbone, prior, oracle, budget))


def table(path, columns) -> pd.DataFrame:
    """The `columns` of a per-image parquet file, indexed by key, as floats."""
    return pd.read_parquet(path, columns=["key", *columns]).set_index("key").astype(float)


def read_evidence(inputs: dict) -> Evidence:
    """The per-image files of the report's input folders (`spot.workflow.stage_table.report_inputs`)."""
    ev = Evidence()
    for params, f in records(inputs["eval"]):
        key = (params["backbone"], params["prior"], False, params["budget"])
        ev.rows[key] = table(f / "predictions.parquet", ["correct", "knn_correct"])
        if (f / "draws.parquet").is_file():
            ev.draws[key[0], key[1], key[3]] = pd.read_parquet(f / "draws.parquet")
    for method in LABEL_FREE:
        for params, f in records(inputs.get(method, [])):
            ev.rows[params["backbone"], method, False, params["budget"]] = table(f / "predictions.parquet",
                                                                                 ["correct", "knn_correct"])
    for params, f in records(inputs["oracle"]):
        ev.rows[params["backbone"], params["oracle.prior"], True, params["budget"]] = table(
            f / "results.parquet", list(ORACLE_COLUMNS))
    for name in ("transfer", "placer_transfer"):
        for params, f in records(inputs.get(name, [])):
            getattr(ev, name)[params["src"], params["dst"], params["budget"]] = table(f / "predictions.parquet",
                                                                                      ["correct"]).correct
    for params, f in records(inputs.get("analysis", [])):
        path = f / "saliency.parquet"
        ev.saliency[params["backbone"], params["budget"]] = pd.read_parquet(path).set_index("key")
    return ev


def with_intervals(results: pd.DataFrame, ev: Evidence, **options) -> pd.DataFrame:
    """`results` with a `<column>_low` and `<column>_high` beside each accuracy (top1, knn, top1_init,
    top1_snapped): the bootstrap interval over the row's val images, all cells in one stacked
    call per n (`spot.report.stats.intervals`). `options`: seed, resamples, confidence."""
    cells = {}
    for i, r in enumerate(results.itertuples()):
        per_image = ev.row(r.backbone, r.prior, r.budget, r.oracle)
        for column, source in INTERVALS.items():
            if per_image is not None and source in per_image:
                cells[i, column] = per_image[source].to_numpy()
    iv = intervals(cells, **options) if cells else pd.DataFrame(columns=["low", "high"])
    out = results.copy()
    for column in INTERVALS:
        for bound in ("low", "high"):
            out.insert(out.columns.get_loc(column) + (1 if bound == "low" else 2), f"{column}_{bound}",
                       [iv[bound].get((i, column), float("nan")) for i in range(len(out))])
    return out


def replicates(results: pd.DataFrame, ev: Evidence, replicate_of: dict[str, str]) -> pd.DataFrame:
    """Mean and sd (ddof 1) of top1 and knn over replicates, a row per group, kind, prior, oracle and
    budget with r >= 2: kind 'training seeds' over a backbone and its replicates (`replicate_of`:
    replicate -> backbone), 'prior seeds' over the draws of a seeded prior (`eval.prior_seeds`,
    draw 0 the row itself)."""
    group = results.backbone.map(lambda b: replicate_of.get(b, b))
    seeds = (results.assign(group=group, kind="training seeds")
             .groupby(["group", "kind", "prior", "oracle", "budget"], sort=False)[["top1", "knn"]])
    rows = [seeds.agg(["mean", "std", "count"])]
    draws = []
    for (b, prior, n), d in ev.draws.items():
        first = ev.row(b, prior, n)
        acc = d.groupby("draw")[["correct", "knn_correct"]].mean()
        acc.loc[0] = first[["correct", "knn_correct"]].mean()
        draws += [dict(group=b, kind="prior seeds", prior=prior, oracle=False, budget=n, top1=t, knn=k)
                  for t, k in zip(acc.correct, acc.knn_correct)]
    if draws:
        rows.append(pd.DataFrame(draws).groupby(["group", "kind", "prior", "oracle", "budget"], sort=False)[
            ["top1", "knn"]].agg(["mean", "std", "count"]))
    out = pd.concat(rows)
    out.columns = [f"{c}_{s}".replace("_std", "_sd").replace("top1_count", "r") for c, s in out.columns]
    out = out[out.r >= 2].drop(columns="knn_count").reset_index()
    return out[["group", "kind", "prior", "oracle", "budget", "r", "top1_mean", "top1_sd", "knn_mean", "knn_sd"]]
