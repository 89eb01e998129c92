"""Plots: accuracy against token budget, and SPoT-ON's accuracy per search step."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import NullLocator

from spot.methods import LABEL_FREE
from spot.report.summary import PAPER_ORDER
from spot.utils.figures import save_fig

MARKERS = "osD^v<>pPXh*"


def series_styles(names: list[str]) -> dict[str, dict]:
    """A colour and a marker per series name, none alike: matplotlib's 10 tab10 colours, then their
    10 lighter tab20 partners (up to 20 colours), and 12 markers, each cycling."""
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[::2] + tab20[1::2]
    return {n: dict(color=colors[i % len(colors)], marker=MARKERS[i % len(MARKERS)]) for i, n in enumerate(names)}


def series_name(prior: str, oracle: bool) -> str:
    return f"{prior} (SPoT-ON)" if oracle else prior


def plot_budgets(results: pd.DataFrame, path: Path, reps: pd.DataFrame | None = None):
    """Accuracy against token budget, one line per prior (dashed: oracle) with its 95% interval as a
    band (`top1_low`, `top1_high`, where results has them), one panel per backbone that replicates
    none (in the order of `results`); every series has its own colour and marker, the same in every
    panel. With replicates (`reps`, `spot.report.evidence.replicates`), error bars show the mean ± sd
    over training seeds. Returns the (closed) figure."""
    if "replicate_of" in results:
        results = results[results.replicate_of.isna()]
    backbones, budgets = list(results.backbone.unique()), sorted(results.budget.unique())
    rank = {p: i for i, p in enumerate(PAPER_ORDER + LABEL_FREE)}
    series = sorted(set(zip(results.prior, results.oracle)), key=lambda s: (s[1], rank.get(s[0], len(rank)), s[0]))
    styles = series_styles([series_name(*s) for s in series])
    fig, axes = plt.subplots(1, max(1, len(backbones)), figsize=(4.5 * max(1, len(backbones)), 3.6), squeeze=False)
    for ax, b in zip(axes[0], backbones):
        mine = results[results.backbone == b]
        for prior, oracle in series:
            g = mine[(mine.prior == prior) & (mine.oracle == oracle)].sort_values("budget")
            if not g.empty:
                name = series_name(prior, oracle)
                ax.plot(g.budget, 100 * g.top1, "--" if oracle else "-", ms=4, label=name, **styles[name])
                if "top1_low" in g:
                    ax.fill_between(g.budget, 100 * g.top1_low, 100 * g.top1_high, color=styles[name]["color"],
                                    alpha=0.15, lw=0)
                seeds = None if reps is None else reps[(reps.group == b) & (reps.kind == "training seeds") & (
                    reps.prior == prior) & (reps.oracle == oracle)].sort_values("budget")
                if seeds is not None and not seeds.empty:
                    ax.errorbar(seeds.budget, 100 * seeds.top1_mean, 100 * seeds.top1_sd, fmt="none", capsize=3,
                                color=styles[name]["color"], lw=1)
        spread = reps is not None and ((reps.group == b) & (reps.kind == "training seeds")).any()
        ax.set(title=b + (" (bars: mean ± sd over seeds)" if spread else ""), xlabel="tokens",
               ylabel="top-1 (%), band: 95% interval", xscale="log")
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    save_fig(fig, path)
    return fig


def plot_oracle_steps(curves: pd.DataFrame, path: Path) -> None:
    """SPoT-ON top-1 against search step, one line per budget, one panel per backbone (in the order of
    `curves`); a cross at the last step marks the found positions snapped to the patch grid."""
    backbones = list(curves.backbone.unique()) or ["(no SPoT-ON runs)"]
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.5 * len(backbones), 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, b in zip(axes[0], backbones):
        for i, (n, g) in enumerate(curves[curves.backbone == b].groupby("budget")):
            g = g.sort_values("step")
            color = f"C{i}"
            ax.plot(g.step, 100 * g.top1, "-", marker="o", ms=3, color=color, label=f"{n} tokens")
            ax.plot(g.step.iloc[-1], 100 * g.top1_snapped.iloc[-1], "x", ms=7, color=color)
        ax.set(title=b, xlabel="SPoT-ON step", ylabel="top-1 (%)" if ax is axes[0][0] else None)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.plot([], [], "x", color="grey", label="snapped to grid")
            ax.legend(fontsize=7, loc="best")
    save_fig(fig, path)


REDUCTION_NAMES = {"tome": "ToMe", "evit": "EViT top-k", "lowres": "low resolution", "drop": "random drop (grid)"}


def plot_frontier(points: pd.DataFrame, results: pd.DataFrame, path: Path):
    """Top-1 against inference FLOPs per image, one panel per backbone that replicates none (in the order
    of `results`): each token-reduction method a curve over its settings with its 95% interval as a band
    (`points`, `spot.report.frontier.read_frontier`); SPoT's fixed priors (but the grid, which is random
    drop) and label-free placements as points at their FLOPs (`results.flops`, placer or search
    included); SPoT-ON apart, as open stars (it uses labels). Returns the (closed) figure."""
    if "replicate_of" in results:
        results = results[results.replicate_of.isna()]
    backbones = list(results.backbone.unique()) or ["(no results)"]
    spot = results[~results.oracle & (results.prior != "grid")]
    rank = {p: i for i, p in enumerate(PAPER_ORDER + LABEL_FREE)}
    priors = sorted(spot.prior.unique(), key=lambda p: (rank.get(p, len(rank)), p))
    styles = series_styles([*REDUCTION_NAMES, *priors])
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.8 * len(backbones), 3.8), squeeze=False)
    for ax, b in zip(axes[0], backbones):
        mine = points[points.backbone == b].drop_duplicates(["method", "setting"])
        for method, name in REDUCTION_NAMES.items():
            g = mine[mine.method == method].sort_values("flops")
            if g.empty:
                continue
            x = g.flops / 1e6
            ax.plot(x, 100 * g.top1, "-", ms=4, label=name, **styles[method])
            ax.fill_between(x, 100 * g.top1_low.astype(float), 100 * g.top1_high.astype(float),
                            color=styles[method]["color"], alpha=0.12, lw=0)
        for prior in priors:
            g = spot[(spot.backbone == b) & (spot.prior == prior)]
            if not g.empty:
                ax.errorbar(g.flops / 1e6, 100 * g.top1, [100 * (g.top1 - g.top1_low), 100 * (g.top1_high - g.top1)],
                            fmt=styles[prior]["marker"], color=styles[prior]["color"], ms=5, lw=1, capsize=2,
                            label=f"SPoT-{prior}" if prior in LABEL_FREE else f"SPoT {prior}")
        on = results[(results.backbone == b) & results.oracle]
        if not on.empty:
            ax.plot(on.flops / 1e6, 100 * on.top1, "*", mfc="none", color="black", ms=9,
                    label="SPoT-ON (uses labels)")
        ax.set(title=b, xlabel="MFLOPs per image", ylabel="top-1 (%), band: 95% interval", xscale="log")
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        axes[0][-1].legend(handles.values(), handles.keys(), fontsize=6, loc="lower right")
    save_fig(fig, path)
    return fig
