"""Settings of the reduction baselines that land on a FLOPs budget (e.g. SPoT's at N tokens), or none.

Each method's settings form one ordered ladder from its full cost down to its cheapest; the
analytic counts (`tome_flops`, `evit_flops`, `low_res_flops`, checked against the FLOP counter in
tests) price every rung, and the rung nearest the target is taken if it is within the tolerance.
A budget below a method's cheapest rung is unreachable, a result in itself: ToMe merges at most half
of a block's tokens, and pruning cannot skip the full-grid attention of the block it prunes at.
"""
from __future__ import annotations

from dataclasses import dataclass

from spot.core.cost import vit_flops
from spot.core.model import SPoTViT
from spot.methods.merging import merge_schedule, tome_flops
from spot.methods.pruning import evit_flops
from spot.methods.resolution import grid_for, low_res_flops

METHODS = ("tome", "evit", "lowres", "drop")


@dataclass(frozen=True)
class Match:
    """The setting of `method` nearest `target` FLOPs per image, and whether it is within tolerance.

    setting: tome, the per-block merge counts; evit, the keep rate at `block`; lowres, the token count
    (of the grid `grid_for` gives); drop, the patch tokens kept (random drop: the grid prior).
    cheapest: the method's least FLOPs on this model."""
    method: str
    target: float
    setting: list[int] | float | int
    flops: int
    cheapest: int
    reachable: bool

    @property
    def error(self) -> float:
        """flops / target - 1."""
        return self.flops / self.target - 1


def ladder(model: SPoTViT, method: str, block: int = 0) -> list[tuple[object, int]]:
    """Every (setting, FLOPs per image) of `method` on `model`'s grid, most expensive first.

    tome: r + 1 merges in the first m blocks and r in the rest, r = 0, 1, ... and m = 0..depth - 1
    (clipped schedules that repeat are left out); evit: keep rate j / T at `block`, j = T..0 but T - 1
    (which fuses one token into one, at the cost of the class attention);
    lowres: n = T..1 tokens, where `grid_for` gives a grid of exactly n; drop: n = T..1 random patches
    (the plain ViT on n tokens, SPoT's own cost at n)."""
    depth, T = len(model.vit.blocks), model.num_tokens
    if method == "tome":
        schedules, seen = [], set()
        for r in range(T // 2 + 1):
            for m in range(depth):
                s = merge_schedule([r + 1] * m + [r] * (depth - m), depth, T)
                if tuple(s) not in seen:
                    seen.add(tuple(s))
                    schedules.append(s)
        return [(s, tome_flops(model, s)) for s in schedules]
    if method == "evit":
        if not 0 <= block < depth:
            raise ValueError(f"EViT: block {block} is not in 0..{depth - 1}")
        return [(j / T, evit_flops(model, {block: j / T})) for j in range(T, -1, -1) if j != T - 1]
    if method == "lowres":
        exact = [n for n in range(T, 0, -1) if grid_for(model, n)[0] * grid_for(model, n)[1] == n]
        return [(n, low_res_flops(model, n)) for n in exact]
    if method == "drop":
        return [(n, vit_flops(model.vit, n)) for n in range(T, 0, -1)]
    raise ValueError(f"unknown reduction method {method!r}; choose one of {', '.join(METHODS)}")


def match_flops(model: SPoTViT, method: str, target: float, tol: float = 0.02, block: int = 0) -> Match:
    """The setting of `method` whose FLOPs per image are nearest `target` (FLOPs per image), reachable
    when within ±tol of it. block: where EViT prunes (its keep rate is the setting)."""
    rungs = ladder(model, method, block)
    setting, flops = min(rungs, key=lambda t: abs(t[1] - target))
    return Match(method, target, setting, flops, min(f for _, f in rungs), abs(flops / target - 1) <= tol)


@dataclass(frozen=True)
class Point:
    """One setting of a reduction method to evaluate: `name` (unique per method and setting, e.g.
    'tome r=2,1,1,0'), its FLOPs per image, and the SPoT budgets whose FLOPs it matches."""
    method: str
    setting: list[int] | float | int
    flops: int
    budgets: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        s = self.setting
        return f"{self.method} " + {"tome": lambda: "r=" + ",".join(map(str, s)), "evit": lambda: f"keep={s:.4g}",
                                    "lowres": lambda: f"n={s}", "drop": lambda: f"n={s}"}[self.method]()


def plan(model: SPoTViT, budgets, methods=METHODS, sweep: int = 0, tol: float = 0.02, block: int = 0
         ) -> tuple[list[Point], list[Match]]:
    """The settings to evaluate and the matches behind them. For each method: its setting nearest the
    FLOPs of SPoT at each of `budgets` tokens (`vit_flops`), kept where within ±tol (`match_flops`), and
    `sweep` more rungs of its ladder, nearest to FLOPs spread evenly from its full cost down to its
    cheapest (the last one; so each method draws a curve to its floor); duplicates merged. Returns
    (points, matches: one per method and budget, in that order, reachable or not)."""
    points: dict[tuple, Point] = {}
    matches = []
    for method in methods:
        rungs = ladder(model, method, block)
        full, cheapest = rungs[0][1], min(f for _, f in rungs)
        chosen: dict[int, tuple] = {}
        for n in budgets:
            m = match_flops(model, method, vit_flops(model.vit, n), tol, block)
            matches.append(m)
            if m.reachable:
                chosen.setdefault(rungs.index((m.setting, m.flops)), ())
                chosen[rungs.index((m.setting, m.flops))] += (n,)
        for i in range(1, sweep + 1):
            target = full - (full - cheapest) * i / sweep
            chosen.setdefault(min(range(len(rungs)), key=lambda j: abs(rungs[j][1] - target)), ())
        for j, ns in sorted(chosen.items()):
            setting, flops = rungs[j]
            points[method, str(setting)] = Point(method, setting, flops, tuple(sorted(ns)))
    return list(points.values()), matches
