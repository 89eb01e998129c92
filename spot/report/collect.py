"""Collect: the results of the job folders the report reads, as tidy tables.

`inputs` is the report job's: input name -> folder or list of folders (`spot.workflow.stage_table`).
Backbones come in the config's `order`, the order of every table, plot and finding.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from spot.methods import LABEL_FREE
from spot.utils.io import read_json
from spot.utils.records import as_list

COLUMNS = ["backbone", "prior", "oracle", "budget", "top1", "knn", "top1_init", "top1_snapped", "extra_flops"]


def records(folders: list[Path]) -> list[tuple[dict, Path]]:
    """(run.json params, folder) of each input folder."""
    return [(read_json(f / "run.json")["params"], f) for f in folders]


def in_order(order: list[str], *columns: str):
    """A `sort_values` key that sorts the backbone names of `columns` (default: backbone) in the
    config's `order`, other columns as they sort."""
    rank, columns = {b: i for i, b in enumerate(order)}, columns or ("backbone",)
    return lambda c: c.map(rank) if c.name in columns else c


def collect(inputs: dict, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, transfer, saliency) tables from the folders of eval, oracle, transfer, analysis and
    the label-free placements (rows whose prior is the method's name, with their extra_flops)."""
    rows = []
    for params, f in records(inputs["eval"]):
        m = read_json(f / "metrics.json")
        rows.append(dict(backbone=params["backbone"], prior=params["prior"], oracle=False, budget=params["budget"],
                         top1=m["top1"], knn=m["knn"]))
    for method in LABEL_FREE:
        for params, f in records(inputs.get(method, [])):
            m = read_json(f / "metrics.json")
            rows.append(dict(backbone=params["backbone"], prior=method, oracle=False, budget=params["budget"],
                             top1=m["top1"], knn=m["knn"], extra_flops=m["extra_flops"]))
    oracle_prior = {}
    for params, f in records(inputs["oracle"]):
        m = read_json(f / "metrics.json")
        oracle_prior[params["backbone"], params["budget"]] = params["oracle.prior"]
        rows.append(dict(backbone=params["backbone"], prior=params["oracle.prior"], oracle=True,
                         budget=params["budget"], top1=m["top1"], knn=m["knn"], top1_init=m["top1_init"],
                         top1_snapped=m["top1_snapped"]))
    results = pd.DataFrame(rows, columns=COLUMNS).sort_values(["backbone", "oracle", "prior", "budget"],
                                                              key=in_order(order), ignore_index=True)
    trans = [dict(src=params["src"], dst=params["dst"], budget=params["budget"], **read_json(f / "metrics.json"))
             for params, f in records(inputs["transfer"])]
    sal = [dict(backbone=params["backbone"], prior=oracle_prior[params["backbone"], params["budget"]],
                budget=params["budget"], **read_json(f / "saliency.json")) for params, f in records(inputs["analysis"])]
    trans.sort(key=lambda r: (order.index(r["src"]), order.index(r["dst"]), r["budget"]))
    sal.sort(key=lambda r: (order.index(r["backbone"]), r["prior"], r["budget"]))
    return results, pd.DataFrame(trans), pd.DataFrame(sal)


def placer_transfers(inputs: dict, order: list[str]) -> pd.DataFrame:
    """src, dst, budget, top1, top1_own (dst's own placer), gain of each placer-transfer job."""
    rows = [dict(src=params["src"], dst=params["dst"], budget=params["budget"],
                 **{k: read_json(f / "metrics.json")[k] for k in ("top1", "top1_own", "gain")})
            for params, f in records(inputs.get("placer_transfer", []))]
    return pd.DataFrame(rows, columns=["src", "dst", "budget", "top1", "top1_own", "gain"]).sort_values(
        ["dst", "budget", "src"], key=in_order(order, "src", "dst"), ignore_index=True)


def oracle_curves(inputs: dict, order: list[str]) -> pd.DataFrame:
    """SPoT-ON top-1 per search step: backbone, budget, step, top1 (and top1_snapped, the same on
    every row of a search)."""
    rows = []
    for params, f in records(inputs["oracle"]):
        m = read_json(f / "metrics.json")
        rows += [dict(backbone=params["backbone"], budget=params["budget"], step=i, top1=a,
                      top1_snapped=m["top1_snapped"]) for i, a in enumerate(m["accuracy_per_step"])]
    return pd.DataFrame(rows, columns=["backbone", "budget", "step", "top1", "top1_snapped"]).sort_values(
        ["backbone", "budget", "step"], key=in_order(order), ignore_index=True)


def environments(inputs: dict) -> list[dict]:
    """The recorded environment (run.json) of every job upstream of the report: its input folders,
    theirs, and so on."""
    todo = [Path(f) for v in inputs.values() for f in as_list(v)]
    seen, envs = set(), []
    while todo:
        folder = todo.pop()
        if folder in seen or not (folder / "run.json").is_file():
            continue
        seen.add(folder)
        record = read_json(folder / "run.json")
        envs.append(record.get("environment") or {})
        todo += [Path(f) for v in record.get("inputs", {}).values() for f in as_list(v)]
    return envs
