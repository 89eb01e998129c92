"""SPoT on the accuracy-FLOPs frontier: the settings stage reduction evaluates (within ±2 % of each
budget's FLOPs or unreachable), its outputs, and case study 6's wording on constructed data."""
import json

import pandas as pd
import pytest
import timm
import torch

from spot.cli import main
from spot.core.cost import flops_per_image, vit_flops
from spot.core.model import SPoTViT
from spot.methods.budget import ladder, plan
from spot.methods.merging import tome_forward
from spot.methods.pruning import evit_forward
from spot.methods.resolution import low_res_forward
from spot.report.findings import findings
from spot.report.frontier import add_evidence, with_flops
from tests.test_report import evidence

DEFAULT = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)   # params.yaml's spot


def on_meta(**kw) -> SPoTViT:
    with torch.device("meta"):
        return SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw))


def test_plan_lands_each_budget_within_2_percent_or_marks_it_unreachable():
    model = on_meta(**DEFAULT)
    points, matches = plan(model, [4, 16, 49], ["tome", "evit", "lowres", "drop"], sweep=2)
    for m in matches:
        assert m.reachable == (abs(m.flops / m.target - 1) <= 0.02)
        assert m.flops == min((f for _, f in ladder(model, m.method)), key=lambda f: abs(f - m.target))
    unreachable = {(m.method, int(round(m.target))) for m in matches if not m.reachable}
    assert unreachable == {("tome", vit_flops(model.vit, 4)), ("tome", vit_flops(model.vit, 16)),
                           ("evit", vit_flops(model.vit, 4))}
    for p in points:                                  # a point that matches a budget is within 2 % of its FLOPs
        assert all(abs(p.flops / vit_flops(model.vit, n) - 1) <= 0.02 for n in p.budgets)
    for method in ("tome", "evit", "lowres"):        # the sweep reaches each method's cheapest setting
        mine = [p.flops for p in points if p.method == method]
        assert min(mine) == min(f for _, f in ladder(model, method)) and max(mine) == vit_flops(model.vit, 49)
    drop, _ = plan(model, [4, 16, 49], ["drop"])                 # without a sweep: the budgets' settings only
    assert sorted(p.setting for p in drop) == [4, 16, 49] and all(p.budgets == (p.setting,) for p in drop)
    assert len({p.name for p in points}) == len(points)


def test_a_planned_setting_costs_what_the_counter_counts():
    torch.manual_seed(0)
    model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **DEFAULT).eval())
    x = torch.randn(2, 3, 28, 28)
    points, _ = plan(model, [16], ["tome", "evit", "lowres"], sweep=1)
    run = {"tome": lambda p: lambda im: tome_forward(model, im, p.setting),
           "evit": lambda p: lambda im: evit_forward(model, im, {0: p.setting}),
           "lowres": lambda p: lambda im: low_res_forward(model, im, p.setting)}
    for p in points:
        assert flops_per_image(run[p.method](p), x, model) == p.flops, p.name


def test_results_flops_count_the_placers_overhead():
    df = pd.DataFrame(dict(backbone=["b", "b", "b"], prior=["isotropic", "placer", "isotropic"],
                           oracle=[False, False, True], budget=[4, 4, 4], extra_flops=[float("nan"), 0.5, float("nan")]))
    out = with_flops(df, {("b", 4): 1000})
    assert out.flops.tolist() == [1000, 1500, 1000] and list(out.columns).index("flops") == 4


def frontier_case(reach: dict[str, float], matches: list[tuple], extra: float = 0.0):
    """Backbone 'b' at 4 tokens: fixed priors, a placer costing `extra` more, and reduction methods
    ({method: accuracy}) on the same 1000 images; matches (method, reachable, cheapest / target)."""
    cells = {("b", "grid", False, 4): 0.40, ("b", "sobol", False, 4): 0.60, ("b", "isotropic", False, 4): 0.50,
             ("b", "placer", False, 4): 0.70}
    df, ev = evidence(cells | {("b", m, False, 4): a for m, a in reach.items()})
    df = df[~df.prior.isin(list(reach))].assign(extra_flops=lambda d: d.prior.map({"placer": extra}))
    add_evidence(ev, {})
    m = pd.DataFrame([dict(backbone="b", method=name, budget=4, target=100, flops=100 if ok else int(100 * c),
                           error=0.0 if ok else c - 1, reachable=ok, cheapest=int(100 * c)) for name, ok, c in matches])
    return findings(df, ev, seed=0, resamples=1000, matches=m, budget_flops={("b", 4): 2.5e6})


def test_case_study_6_pits_the_best_label_free_spot_against_the_best_baseline_that_reaches_the_compute():
    text, claims = frontier_case({"lowres": 0.45, "drop": 0.40},
                                 [("tome", False, 1.08), ("evit", True, 0.5), ("lowres", True, 0.1), ("drop", True, 0.01)])
    line = next(x for x in text.splitlines() if x.startswith("- b, 4 tokens (2.50 MFLOPs): best label-free SPoT vs"))
    assert "placer vs lowres +25.0 [" in line and ": holds at n = 1000 (one training run)" in line
    assert line.endswith("; unreachable at this compute: ToMe (cheapest +8%).")      # evit reached, but not run here
    assert claims[claims.case == 6].verdict.tolist() == ["holds"]
    assert "## 6. Does placing few tokens off the grid beat token reduction at equal compute?" in text


def test_case_study_6_leaves_out_a_placement_above_the_compute_and_states_an_unreachable_budget():
    text, _ = frontier_case({"lowres": 0.80}, [("lowres", True, 0.1)], extra=0.06)
    line = next(x for x in text.splitlines() if x.startswith("- b, 4 tokens (2.50 MFLOPs)"))
    assert "sobol vs lowres -20.0 [" in line and ": reversed at n = 1000" in line
    assert line.endswith("; left out, above this compute: SPoT-placer (+6.0% FLOPs).")
    text, claims = frontier_case({}, [("tome", False, 3.75), ("evit", False, 1.5)])
    assert ("- b, 4 tokens (2.50 MFLOPs): no reduction baseline reaches this compute; unreachable at this compute: "
            "ToMe (cheapest +275%), EViT (cheapest +50%).") in text
    assert 6 not in set(claims.case)


def test_findings_without_reduction_results_are_as_before():
    cells = {("b", "grid", False, 4): 0.40, ("b", "sobol", False, 4): 0.60}
    df, ev = evidence(cells)
    assert findings(df, ev, seed=0, resamples=1000)[0] == findings(df, ev, seed=0, resamples=1000,
                                                                   matches=pd.DataFrame())[0]
    assert "## 6." not in findings(df, ev, seed=0, resamples=1000)[0]


@pytest.mark.stage
def test_reduction_stage_writes_every_setting_and_takes_random_drop_from_the_grid_prior(smoke_stages):
    params, cfg, root = smoke_stages
    for argv in (["evaluate", "--backbone", "spot-a"], ["reduction", "--backbone", "spot-a"]):
        assert main([*argv, "--params", str(params)]) == 0
    out = root / "reduction" / "spot-a"
    m = json.loads((out / "metrics.json").read_text())
    pred = pd.read_parquet(out / "predictions.parquet")
    assert {r["method"] for r in m["points"]} == set(cfg["reduction"]["methods"])
    assert {(r["method"], r["budget"]) for r in m["matches"]} == {(x, n) for x in cfg["reduction"]["methods"]
                                                                 for n in cfg["eval"]["budgets"]}
    assert all(r["reachable"] == (abs(r["error"]) <= 0.02) for r in m["matches"])
    for r in m["points"]:
        rows = pred[pred.point == r["source"]]
        assert len(rows) == m["n_val"] and rows.correct.mean() == pytest.approx(r["top1"])
    grid = pd.read_parquet(root / "eval" / "spot-a" / "grid" / "4" / "predictions.parquet")
    drop = pred[pred.point == "grid 4"].set_index("key").loc[grid.key]
    assert (drop.correct.to_numpy() == grid.correct.to_numpy()).all()
    assert set(m["budget_flops"]) == {str(n) for n in {*cfg["eval"]["budgets"], *cfg["oracle"]["budgets"]}}
