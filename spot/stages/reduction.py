"""Stage reduction: the token-reduction baselines (ToMe, EViT top-k, lower resolution, random drop) on one
backbone's own weights, at the FLOPs of each SPoT budget and along a sweep, all in one pass per split."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from spot.core.cost import vit_flops
from spot.core.devices import resolve_device
from spot.data.decoded import Decoded
from spot.methods.budget import plan
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.training.reduction import FULL, accuracies, as_setting, evaluate_points
from spot.utils.io import atomic_path, read_json, write_json

COLUMNS = ["key", "label", "pred", "correct", "knn_pred", "knn_correct"]


def run(p, inputs: dict, out: Path, backbone: str) -> Record:
    """Evaluate every method of `reduction.methods` at its setting nearest the FLOPs of SPoT at each of
    `eval.budgets` tokens (ToMe with proportional attention `reduction.prop_attn`, unless the backbone
    is in `reduction.plain_attn`; within ±`reduction.tolerance`, else that budget is unreachable for it) and,
    but random drop, at `reduction.sweep` more settings (`replicates.reduction_sweep` on a replicate
    backbone), as `spot.methods.budget.plan` chooses them; top-1 and kNN as for a prior (`eval.knn`).

    Random drop of n grid tokens is the grid prior at n: where stage evaluate ran it (`inputs["grid"]`),
    its per-image results are taken as they are, and the one at the full grid stands for every setting
    that reduces nothing; the rest is evaluated here, in one pass per split.

    Writes metrics.json: `points` (method, setting, name, flops per image, the budgets it matches, where
    its results come from, top1, knn), `matches` (per method and budget: target FLOPs, nearest
    setting's FLOPs, error, reachable, the method's cheapest), `budget_flops` (SPoT's FLOPs per image
    at each budget of eval and oracle, `vit_flops`); and predictions.parquet (key, label, point, pred,
    correct, knn_pred, knn_correct per val image and evaluation)."""
    device, prop_attn = resolve_device(p.device), p.prop_attn and backbone not in p.plain_attn
    model = load_backbone(inputs["backbone"], device)
    budgets, methods = p.budgets, p.methods
    points, matches = plan(model, budgets, [m for m in methods if m != "drop"], p.sweep, p.tolerance, p.evit_block)
    if "drop" in methods:
        drop, drop_matches = plan(model, budgets, ["drop"], 0, p.tolerance)
        points, matches = points + drop, matches + drop_matches
    full = vit_flops(model.vit, model.num_tokens)
    grid = {read_json(f / "run.json")["params"]["budget"]: f for f in inputs.get("grid", [])}
    taken = {f"grid {n}": pd.read_parquet(f / "predictions.parquet", columns=COLUMNS) for n, f in grid.items()}

    def source(point) -> str:
        n = model.num_tokens if point.flops == full else point.setting if point.method == "drop" else None
        return f"grid {n}" if n in grid else FULL if point.flops == full else point.name

    todo = {s: None if s == FULL else point for point in points if (s := source(point)) not in taken}
    data = Decoded(inputs["decoded"], model.data_config)
    per_image = evaluate_points(model, data, todo, batch_size=p.batch_size, knn=p.knn,
                                device=device, seed=p.seed, block=p.evit_block, prop_attn=prop_attn,
                                job=f"reduction {backbone}") if todo else pd.DataFrame()
    used = {source(point) for point in points}
    per_image = pd.concat([per_image.astype({"point": str}) if len(per_image) else per_image,
                           *[t.assign(point=s) for s, t in taken.items() if s in used]], ignore_index=True)
    acc = accuracies(per_image)
    rows = [dict(method=q.method, setting=as_setting(q.setting), name=q.name, flops=int(q.flops),
                 budgets=list(q.budgets), source=source(q), top1=acc[source(q)][0], knn=acc[source(q)][1])
            for q in points]
    per_method = [m for m in methods if m != "drop"] + (["drop"] if "drop" in methods else [])
    match_rows = [dict(method=m.method, budget=n, target=int(m.target), flops=int(m.flops), error=m.error,
                       reachable=bool(m.reachable), cheapest=int(m.cheapest), setting=as_setting(m.setting))
                  for m, n in zip(matches, [n for _ in per_method for n in budgets])]
    metrics = dict(points=rows, matches=match_rows, full_flops=int(full), evaluated=list(todo),
                   budget_flops={str(n): int(vit_flops(model.vit, n))
                                 for n in sorted({*budgets, *p.oracle_budgets})},
                   tolerance=p.tolerance, evit_block=p.evit_block, prop_attn=prop_attn,
                   n_val=int(per_image.key.nunique()) if len(per_image) else 0, k=p.knn["k"],
                   temperature=p.knn["temperature"])
    with atomic_path(out / "predictions.parquet") as tmp:
        per_image.astype({"point": "category"}).to_parquet(tmp, index=False)
    write_json(out / "metrics.json", metrics)
    logged = {f"{r['method']}/{n}/{c}": r[c] for r in rows for n in r["budgets"] for c in ("top1", "knn")}
    return Record(dict(logged, points=len(rows), evaluations=len(todo),
                       unreachable=sum(not m["reachable"] for m in match_rows)),
                  ["metrics.json", "predictions.parquet"])
