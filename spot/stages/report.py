"""The report: every result in one tidy table, the paper's tables, plots, pictures and findings."""
from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import NullLocator

from spot.backbones import read_meta
from spot.data.decoded import Decoded
from spot.data.imagenet import short_name
from spot.environment import environment
from spot.figures import draw_tokens, save_fig, to_display
from spot.outputs import Record
from spot.utils import atomic_path, read_json, write_json

OBJECT_CENTRIC = ("center", "gaussian", "salient", "model_salient")
COVERAGE = ("isotropic", "sobol", "uniform")
PAPER_ORDER = ("grid", "uniform", "gaussian", "sobol", "isotropic", "center", "salient", "model_salient")
LABEL_FREE = ("learned", "placer", "entropy")     # label-free placement stages: rows whose `prior` is the method


def records(folders: list[Path]) -> list[tuple[dict, Path]]:
    """(run.json params, folder) of each input folder."""
    return [(read_json(f / "run.json")["params"], f) for f in folders]


def in_order(order: list[str], *columns: str):
    """A `sort_values` key that sorts the backbone names of `columns` (default: backbone) in the
    config's `order`, other columns as they sort."""
    rank, columns = {b: i for i, b in enumerate(order)}, columns or ("backbone",)
    return lambda c: c.map(rank) if c.name in columns else c


def collect(inputs: dict, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, transfer, saliency) tables from the input folders of eval, oracle, transfer, analysis
    and the label-free placements (rows whose prior is the method's name, with their extra_flops),
    backbones in the config's `order`."""
    rows = []
    for p, f in records(inputs["eval"]):
        m = read_json(f / "metrics.json")
        rows.append(dict(backbone=p["backbone"], prior=p["prior"], oracle=False, budget=p["budget"], top1=m["top1"],
                         knn=m["knn"]))
    for method in LABEL_FREE:
        for p, f in records(inputs.get(method, [])):
            m = read_json(f / "metrics.json")
            rows.append(dict(backbone=p["backbone"], prior=method, oracle=False, budget=p["budget"], top1=m["top1"],
                             knn=m["knn"], extra_flops=m["extra_flops"]))
    oracle_prior = {}
    for p, f in records(inputs["oracle"]):
        m = read_json(f / "metrics.json")
        oracle_prior[p["backbone"], p["budget"]] = p["oracle.prior"]
        rows.append(dict(backbone=p["backbone"], prior=p["oracle.prior"], oracle=True, budget=p["budget"],
                         top1=m["top1"], knn=m["knn"], top1_init=m["top1_init"], top1_snapped=m["top1_snapped"]))
    columns = ["backbone", "prior", "oracle", "budget", "top1", "knn", "top1_init", "top1_snapped", "extra_flops"]
    results = pd.DataFrame(rows, columns=columns).sort_values(["backbone", "oracle", "prior", "budget"],
                                                              key=in_order(order), ignore_index=True)
    trans = [dict(src=p["src"], dst=p["dst"], budget=p["budget"], **read_json(f / "metrics.json"))
             for p, f in records(inputs["transfer"])]
    sal = [dict(backbone=p["backbone"], prior=oracle_prior[p["backbone"], p["budget"]], budget=p["budget"],
                **read_json(f / "saliency.json")) for p, f in records(inputs["analysis"])]
    trans.sort(key=lambda r: (order.index(r["src"]), order.index(r["dst"]), r["budget"]))
    sal.sort(key=lambda r: (order.index(r["backbone"]), r["prior"], r["budget"]))
    return results, pd.DataFrame(trans), pd.DataFrame(sal)


def environments(inputs: dict) -> list[dict]:
    """The recorded environment (run.json) of every job upstream of the report: its input folders,
    theirs, and so on."""
    todo = [Path(f) for v in inputs.values() for f in (v if isinstance(v, list) else [v])]
    seen, envs = set(), []
    while todo:
        folder = todo.pop()
        if folder in seen or not (folder / "run.json").is_file():
            continue
        seen.add(folder)
        record = read_json(folder / "run.json")
        envs.append(record.get("environment") or {})
        todo += [Path(f) for v in record.get("inputs", {}).values() for f in (v if isinstance(v, list) else [v])]
    return envs


def describe_environments(envs: list[dict]) -> str:
    """One line naming the machines and software of `envs`: each value, with its job count where
    the jobs differ ('threads 1 (30 jobs) / 2 (3 jobs)')."""
    def values(key, fmt=str):
        counts = pd.Series([fmt(e.get(key)) for e in envs]).value_counts(sort=False)
        if len(counts) == 1:
            return counts.index[0]
        return " / ".join(f"{v} ({n} jobs)" for v, n in counts.items())
    software = ", ".join(f"{k} {values(k)}" for k in ("python", "torch", "timm", "numpy", "mlflow", "snakemake", "dvc"))
    lock = values("lock_mismatches", lambda m: "as installed" if not m else "installed: " + ", ".join(m))
    return (f"Computed on {values('device')} (CPU {values('cpu')}, torch kernels {values('cpu_capability')}, "
            f"threads {values('threads')}, kernel settings {values('kernels', lambda k: k or 'default')}; "
            f"CUDA {values('cuda')}, cuDNN {values('cudnn')}) with {software}; lock file {values('lock')} "
            f"({lock}), in {len(envs)} jobs.")


def placer_transfers(inputs: dict, order: list[str]) -> pd.DataFrame:
    """src, dst, budget, top1, top1_own (dst's own placer), gain of each placer-transfer job, backbones
    in the config's `order`."""
    rows = [dict(src=p["src"], dst=p["dst"], budget=p["budget"], **{k: read_json(f / "metrics.json")[k]
                                                                       for k in ("top1", "top1_own", "gain")})
            for p, f in records(inputs.get("placer_transfer", []))]
    return pd.DataFrame(rows, columns=["src", "dst", "budget", "top1", "top1_own", "gain"]).sort_values(
        ["dst", "budget", "src"], key=in_order(order, "src", "dst"), ignore_index=True)


def model_name(prior: str, oracle: bool) -> str:
    if prior in LABEL_FREE:
        return f"SPoT-{prior}"
    return "SPoT-ON" if oracle else ("ViT" if prior == "grid" else "SPoT")


def fixed_priors(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of fixed priors (neither SPoT-ON nor a label-free placement)."""
    return results[~results.oracle & ~results.prior.isin(LABEL_FREE)]


def paper_table(df: pd.DataFrame) -> str:
    """Markdown in the paper's layout for one backbone: rows model . prior . oracle; Acc@1 and kNN per
    budget in percent; the best non-oracle value of each column in bold, once: where values tie (as
    shown, to 0.01), the first row in the table's order, and a line under the table names the ties."""
    budgets = sorted(df.budget.unique())
    rank = {p: i for i, p in enumerate(PAPER_ORDER)}
    keys = sorted(df[["prior", "oracle"]].drop_duplicates().itertuples(index=False),
                  key=lambda r: (r.oracle, r.prior in LABEL_FREE, rank.get(r.prior, len(rank)), r.prior))
    columns = [(n, c) for n in budgets for c in ("top1", "knn")]
    names = {(n, c): f"{n} T {'Acc@1' if c == 'top1' else 'kNN'}" for n, c in columns}
    shown = {}                                            # (row, column) -> the value as printed
    for row in keys:
        for n, c in columns:
            v = df[(df.prior == row.prior) & (df.oracle == row.oracle) & (df.budget == n)][c]
            if not v.empty:
                shown[row, (n, c)] = f"{100 * v.iloc[0]:.2f}"
    bold, ties = {}, []
    for col in columns:
        cells = [(row, float(shown[row, col])) for row in keys if not row.oracle and (row, col) in shown]
        if not cells:
            continue
        top = max(v for _, v in cells)
        best = [row for row, v in cells if v == top]
        bold[col] = best[0]
        if len(best) > 1:
            ties.append(f"{names[col]} {top:.2f}: " + ", ".join(row_name(r) for r in best))
    head = ["Model", "Prior", "Oracle"] + [names[col] for col in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in keys:
        cells = [model_name(row.prior, row.oracle), "" if row.prior in LABEL_FREE else row.prior,
                 "✓" if row.oracle else ""]
        for col in columns:
            text = shown.get((row, col), "")
            cells.append(f"**{text}**" if bold.get(col) == row else text)
        lines.append("| " + " | ".join(cells) + " |")
    if ties:
        lines += ["", "Tied best values (bold on the first): " + "; ".join(ties) + "."]
    return "\n".join(lines)


def row_name(row) -> str:
    """'SPoT isotropic', 'ViT grid', 'SPoT-placer': a table row of `paper_table` in words."""
    return " ".join(filter(None, (model_name(row.prior, row.oracle), "" if row.prior in LABEL_FREE else row.prior)))


def findings(results: pd.DataFrame, trans: pd.DataFrame, sal: pd.DataFrame,
             ptrans: pd.DataFrame | None = None) -> str:
    """One computed paragraph per case study of the paper, and a fifth: the label-free placements.
    Backbones in the order of `results` (`collect`: the config's)."""
    ev = fixed_priors(results)
    out = ["# Findings (computed from results.csv)", ""]
    out.append("## 1. Are grids an inherent limitation of ViTs?")
    for b, g in ev.groupby("backbone", sort=False):
        parts = []
        for n, gn in g.groupby("budget"):
            grid, off = gn[gn.prior == "grid"], gn[gn.prior != "grid"]
            if grid.empty or off.empty:
                continue
            best = off.loc[off.top1.idxmax()]
            parts.append(f"{n} tokens: best off-grid prior {best.prior} {100 * best.top1:.2f} vs grid "
                         f"{100 * grid.top1.iloc[0]:.2f} ({100 * (best.top1 - grid.top1.iloc[0]):+.2f} points)")
        out.append(f"- {b}: " + ("; ".join(parts) or "no grid row to compare") + ".")
    out += ["", "## 2. Do object-centric priors improve predictions?"]
    for b, g in ev.groupby("backbone", sort=False):
        budgets = sorted(g.budget.unique())
        parts = []
        for n in (budgets[0], budgets[-1]) if budgets else ():
            gn = g[g.budget == n]
            oc, cov = gn[gn.prior.isin(OBJECT_CENTRIC)].top1.max(), gn[gn.prior.isin(COVERAGE)].top1.max()
            if np.isnan(oc) or np.isnan(cov):
                continue
            parts.append(f"at {n} tokens object-centric best {100 * oc:.2f} vs coverage best {100 * cov:.2f} "
                         f"({'object-centric' if oc > cov else 'coverage'} wins by {100 * abs(oc - cov):.2f})")
        out.append(f"- {b}: " + ("; ".join(parts) or "not enough priors") + ".")
    out += ["", "## 3. Does oracle guidance prefer salient regions?"]
    for r in sal.itertuples() if not sal.empty else ():
        out.append(f"- {r.backbone} {r.prior} N={r.budget}: mean saliency {r.saliency_init:.4f} at the start -> "
                   f"{r.saliency_final:.4f} after the search ({r.saliency_delta:+.4f}; "
                   f"{100 * r.frac_images_more_salient:.1f}% of images moved to more salient pixels).")
        if not np.isnan(getattr(r, "model_saliency_init", np.nan)):
            out[-1] = out[-1][:-1] + (f"; under the model's input-gradient maps {r.model_saliency_init:.4f} -> "
                                      f"{r.model_saliency_final:.4f} ({r.model_saliency_delta:+.4f}; "
                                      f"{100 * r.model_frac_images_more_salient:.1f}% more salient).")
    for (b, n), g in ev[ev.prior.isin(("salient", "model_salient"))].groupby(["backbone", "budget"], sort=False):
        top = dict(zip(g.prior, g.top1))
        if len(top) == 2:
            out.append(f"- salient prior {b} N={n}: spectral residual maps {100 * top['salient']:.2f} vs the model's "
                       f"input-gradient maps (model_salient) {100 * top['model_salient']:.2f} top-1.")
    orc = results[results.oracle]
    for r in orc.itertuples():
        out.append(f"- SPoT-ON {r.backbone} {r.prior} N={r.budget}: top-1 {100 * r.top1_init:.2f} -> {100 * r.top1:.2f} "
                   f"(upper bound, uses labels); snapped to the grid {100 * r.top1_snapped:.2f}.")
    out += ["", "## 4. Do oracle-guided placements transfer?"]
    for r in trans.itertuples() if not trans.empty else ():
        out.append(f"- {r.src} -> {r.dst}, N={r.budget}: {100 * r.top1_transfer:.2f} with {r.src}'s oracle "
                   f"placements vs {100 * r.top1_prior:.2f} on its own prior ({100 * r.gain:+.2f} points).")
    if trans.empty:
        out.append("- no transfer results in this run.")
    out += ["", "## 5. How much of the oracle gap can be closed without labels?",
            "Gap closed = (top-1 − best fixed prior) / (SPoT-ON − best fixed prior), same backbone and budget; "
            "extra compute = the method's inference FLOPs over one backbone forward at that budget, minus 1."]
    gaps = gap_closed(results)
    for r in gaps.itertuples():
        oracle = "no SPoT-ON at this budget" if np.isnan(r.oracle_top1) else f"SPoT-ON {100 * r.oracle_top1:.2f}"
        out.append(f"- {model_name(r.method, False)} {r.backbone} N={r.budget}: top-1 {100 * r.top1:.2f} vs best fixed "
                   f"prior {r.best_prior} {100 * r.best_fixed:.2f} and {oracle}: {gap_words(r)}, "
                   f"{100 * r.extra_flops:+.1f}% FLOPs.")
    if gaps.empty:
        out.append("- no label-free placement in this run (placement.methods).")
    else:
        sparse = gaps[gaps.budget == gaps.budget.min()]
        met = sparse[(sparse.gap_closed >= 0.3) & (sparse.extra_flops <= 0.25)]
        valid = sparse.dropna(subset=["gap_closed"])
        best = valid.loc[valid.groupby("backbone").gap_closed.idxmax()] if not valid.empty else valid
        out.append(f"- At {sparse.budget.min()} tokens a method closes >= 30% of the gap at <= 25% extra FLOPs on "
                   f"{met.backbone.nunique()} of {sparse.backbone.nunique()} backbones; best per backbone: " +
                   ", ".join(f"{r.backbone} {model_name(r.method, False)} {100 * r.gap_closed:.0f}%"
                             for r in best.itertuples()) + ".")
        out += why_label_free(gaps, ev, results[results.oracle].prior.unique())
    fixed = fixed_priors(results)
    for r in ptrans.itertuples() if ptrans is not None else ():
        same = fixed[(fixed.backbone == r.dst) & (fixed.budget == r.budget)].top1
        out.append(f"- placer transfer {r.src} -> {r.dst}, N={r.budget}: {100 * r.top1:.2f} with {r.src}'s placer vs "
                   f"{100 * r.top1_own:.2f} with {r.dst}'s own ({100 * r.gain:+.2f} points)" +
                   (f" and {100 * same.max():.2f} with its best fixed prior." if not same.empty else "."))
    return "\n".join(out) + "\n"


def gap_words(r) -> str:
    """What a `gap_closed` row's numbers say: the fraction of the gap it closes, and in words where it
    passes SPoT-ON, falls below the best fixed prior, or there is no gap to close."""
    if np.isnan(r.oracle_top1):
        return "no gap to measure"
    if r.oracle_top1 <= r.best_fixed:
        return (f"no gap to close (SPoT-ON {100 * (r.oracle_top1 - r.best_fixed):+.2f} points from the best fixed "
                f"prior); {100 * (r.top1 - r.best_fixed):+.2f} points from that prior")
    closed = f"{100 * r.gap_closed:.0f}% of the gap"
    if r.top1 > r.oracle_top1:
        return f"beats SPoT-ON by {100 * (r.top1 - r.oracle_top1):.2f} points ({closed})"
    if r.top1 < r.best_fixed:
        return f"falls {100 * (r.best_fixed - r.top1):.2f} points below the best fixed prior ({closed})"
    return closed


def why_label_free(gaps: pd.DataFrame, fixed: pd.DataFrame, starts) -> list[str]:
    """Lines that read the gap numbers: what seeing the image adds (placer over the learned prior),
    and what the entropy search does to its start prior (the search's start, `oracle.prior`)."""
    top = gaps.pivot_table(index=["backbone", "budget"], columns="method", values="top1", sort=False)
    lines = []
    for (b, n), row in top.iterrows():
        if {"learned", "placer"} <= set(row.dropna().index):
            lines.append(f"- Why per image: on {b} N={n} the placer, which sees the image, adds "
                         f"{100 * (row.placer - row.learned):+.2f} points to the learned prior (one layout for all images).")
        start = fixed[(fixed.backbone == b) & (fixed.budget == n) & fixed.prior.isin(starts)]
        if "entropy" in row.dropna().index and not start.empty:
            lines.append(f"- Why not entropy: on {b} N={n} lowering the prediction's entropy takes top-1 from "
                         f"{100 * start.top1.iloc[0]:.2f} ({start.prior.iloc[0]}, its start) to {100 * row.entropy:.2f}; "
                         "a confident wrong prediction is a minimum of its objective, so confidence is not correctness.")
    return lines


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


MARKERS = "osD^v<>pPXh*"


def series_styles(names: list[str]) -> dict[str, dict]:
    """A colour and a marker per series name, none alike: matplotlib's 10 tab10 colours, then their
    10 lighter tab20 partners (up to 20 colours), and 12 markers, each cycling."""
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[::2] + tab20[1::2]
    return {n: dict(color=colors[i % len(colors)], marker=MARKERS[i % len(MARKERS)]) for i, n in enumerate(names)}


def series_name(prior: str, oracle: bool) -> str:
    return f"{prior} (SPoT-ON)" if oracle else prior


def plot_budgets(results: pd.DataFrame, path: Path):
    """Accuracy against token budget, one line per prior (dashed: oracle), one panel per backbone (in
    the order of `results`); every series has its own colour and marker, the same in every panel.
    Returns the (closed) figure."""
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
        ax.set(title=b, xlabel="tokens", ylabel="top-1 (%)", xscale="log")
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    save_fig(fig, path)
    return fig


def prior_sheet(inputs: dict, path: Path, priors: list[str], budget: int, pictures: int):
    """The first val images, titled with their class names, with the tokens each prior placed in the
    evaluation of the config's first backbone at `budget`, then those of each label-free placement
    and SPoT-ON's final positions where they ran at `budget`, drawn as k x k boxes. Returns the
    (closed) figure."""
    backbone = inputs["backbone"]
    meta = read_meta(backbone)
    dc = meta["data_config"]
    data = Decoded(inputs["decoded"], dc)
    b = next(data.batches("val", pictures))
    mine = lambda p: p["backbone"] == backbone.name and p["budget"] == budget
    placed = {p["prior"]: pd.read_parquet(f / "predictions.parquet").set_index("key").positions
              for p, f in records(inputs["eval"]) if mine(p)}
    placed |= {model_name(m, False): pd.read_parquet(f / "predictions.parquet").set_index("key").positions
               for m in LABEL_FREE for p, f in records(inputs.get(m, [])) if mine(p)}
    for p, f in records(inputs["oracle"]):
        if mine(p):
            placed["SPoT-ON"] = pd.read_parquet(f / "results.parquet").set_index("key").final
    rows = [p for p in priors if p in placed] + [r for r in placed if r not in priors]
    imgs = to_display(b.images, dc["mean"], dc["std"])
    fig, axes = plt.subplots(len(rows), len(imgs), figsize=(1.5 * len(imgs), 1.55 * len(rows)), squeeze=False)
    for row, name in zip(axes, rows):
        for ax, im, key in zip(row, imgs, b.keys):
            draw_tokens(ax, im, np.asarray(placed[name].loc[key]).reshape(-1, 2), meta["patch_size"])
        row[0].set_ylabel(name, fontsize=8)
    for ax, label in zip(axes[0], b.labels.tolist()):
        ax.set_title(short_name(data.class_names[label]), fontsize=7)
    fig.suptitle(f"{budget} tokens per prior and placement ({backbone.name})")
    save_fig(fig, path)
    return fig


def learned_sheet(inputs: dict, path: Path, pictures: int, order: list[str]) -> None:
    """The learned global prior's positions, one panel per backbone (rows, in the config's `order`)
    and budget (columns), drawn on the mean of the first val images."""
    found = [((p["backbone"], p["budget"]), f) for p, f in records(inputs.get("learned", []))]
    if not found:
        return
    meta = read_meta(inputs["backbone"])
    dc = meta["data_config"]
    mean = to_display(next(Decoded(inputs["decoded"], dc).batches("val", pictures)).images, dc["mean"], dc["std"]).mean(0)
    backbones = [b for b in order if b in {b for (b, _), _ in found}]
    budgets = sorted({n for (_, n), _ in found})
    fig, axes = plt.subplots(len(backbones), len(budgets), figsize=(2 * len(budgets), 2.1 * len(backbones)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (b, n), f in found:
        ax = axes[backbones.index(b), budgets.index(n)]
        draw_tokens(ax, mean, np.asarray(read_json(f / "positions.json")["positions"]), meta["patch_size"])
        ax.set_title(f"{b}, {n} tokens", fontsize=8)
    fig.suptitle("learned global prior: the same positions for every image")
    save_fig(fig, path)


def trajectory_sheet(inputs: dict, path: Path, order: list[str]) -> None:
    """All analysis trajectory pictures stacked into one sheet, by backbone (in the config's `order`)
    and budget."""
    pics = [f / "trajectories.png" for p, f in sorted(records(inputs["analysis"]),
                                                      key=lambda r: (order.index(r[0]["backbone"]), r[0]["budget"]))]
    if not pics:
        return
    fig, axes = plt.subplots(len(pics), 1, figsize=(12, 2.2 * len(pics)), squeeze=False)
    for ax, p in zip(axes[:, 0], pics):
        ax.imshow(plt.imread(p))
        ax.axis("off")
    save_fig(fig, path)


def oracle_curves(inputs: dict, order: list[str]) -> pd.DataFrame:
    """SPoT-ON top-1 per search step: backbone (in the config's `order`), budget, step, top1 (and
    top1_snapped, the same on every row of a search)."""
    rows = []
    for p, f in records(inputs["oracle"]):
        m = read_json(f / "metrics.json")
        rows += [dict(backbone=p["backbone"], budget=p["budget"], step=i, top1=a, top1_snapped=m["top1_snapped"])
                 for i, a in enumerate(m["accuracy_per_step"])]
    return pd.DataFrame(rows, columns=["backbone", "budget", "step", "top1", "top1_snapped"]).sort_values(
        ["backbone", "budget", "step"], key=in_order(order), ignore_index=True)


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


def metric_rows(results: pd.DataFrame, trans: pd.DataFrame, sal: pd.DataFrame,
                ptrans: pd.DataFrame | None = None) -> dict[str, dict]:
    """The DVC metrics: one small file per backbone and way of placing tokens, keyed by budget
    (zero-padded, so `dvc metrics show` sorts its columns by budget) then top1 / knn / saliency, so
    that `dvc metrics show` prints the paper's table, a row per file. Rows: each prior, `spot-on`
    (the oracle), `spot-on-snapped` (its positions snapped to the grid), `transfer-from-<src>`
    (another backbone's oracle positions), `learned`, `placer`, `entropy` (label-free placements; their
    gap closed and extra FLOPs are in results.csv and tables.md, not here: a column each would widen
    every row of `dvc metrics show`), `placer-from-<src>` (another backbone's placer).
    `saliency` (and `model_saliency`, under the model's maps): mean saliency under the tokens, where
    the analysis measured it (the oracle's start prior and `spot-on`)."""
    budgets = list(results.budget) + (list(trans.budget) if not trans.empty else [])
    width = len(str(max(budgets)))
    rows: dict[str, dict] = {}

    def put(backbone, row, budget, **values):
        cell = rows.setdefault(f"{backbone}/{row}.json", {}).setdefault(f"{int(budget):0{width}d}", {})
        cell.update({k: round(float(v), 6) for k, v in values.items()})

    for r in results.itertuples():
        if r.oracle:
            put(r.backbone, "spot-on", r.budget, top1=r.top1, knn=r.knn)
            put(r.backbone, "spot-on-snapped", r.budget, top1=r.top1_snapped)
        else:
            put(r.backbone, r.prior, r.budget, top1=r.top1, knn=r.knn)
    for r in trans.itertuples() if not trans.empty else ():
        if r.src != r.dst:
            put(r.dst, f"transfer-from-{r.src}", r.budget, top1=r.top1_transfer)
    for r in sal.itertuples() if not sal.empty else ():
        put(r.backbone, r.prior, r.budget, saliency=r.saliency_init)
        put(r.backbone, "spot-on", r.budget, saliency=r.saliency_final)
        if not np.isnan(getattr(r, "model_saliency_init", np.nan)):
            put(r.backbone, r.prior, r.budget, model_saliency=r.model_saliency_init)
            put(r.backbone, "spot-on", r.budget, model_saliency=r.model_saliency_final)
    for r in ptrans.itertuples() if ptrans is not None else ():
        put(r.dst, f"placer-from-{r.src}", r.budget, top1=r.top1)
    return {k: dict(sorted(v.items())) for k, v in sorted(rows.items())}


def write_metrics(folder: Path, rows: dict[str, dict]) -> None:
    """`folder` holding exactly the files of `rows` (an earlier run's files are removed first)."""
    shutil.rmtree(folder, ignore_errors=True)
    for name, data in rows.items():
        write_json(folder / name, data)


def inline(text: str) -> str:
    """Markdown `**bold**` and `code` in one escaped line of HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_html(text: str, title: str) -> str:
    """A standalone HTML page of the markdown this stage writes (headings, paragraphs, bullet lists,
    pipe tables, bold), for the Snakemake report and browsers."""
    body, table, items = [], [], []

    def flush():
        if items:
            body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            head, *rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                           if not re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())]
            numeric = r"[-+]?[\d.]+%?|<b>[-+]?[\d.]+</b>"
            cells = lambda row, tag: "".join(
                f"<{tag}{' class=num' if re.fullmatch(numeric, inline(c)) else ''}>{inline(c)}</{tag}>" for c in row)
            body.append("<table><thead><tr>" + cells(head, "th") + "</tr></thead><tbody>" +
                        "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if m := re.match(r"(#{1,3}) (.*)", line):
            level = len(m[1])
            body.append(f"<h{level}>{inline(m[2])}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
            "th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f2f2f2}td.num{text-align:right}"
            "tbody tr:nth-child(even){background:#fafafa}li{margin:.2em 0}"
            "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def run(cfg: dict, inputs: dict, out: Path) -> Record:
    """Gather every result into `out`: results.{parquet,csv}, tables.{md,html}, findings.{md,html},
    metrics.json (every number, flat), metrics/<backbone>/<row>.json (the DVC metrics: `metric_rows`),
    plots/accuracy_vs_budget.{png,csv}, plots/oracle_steps.png, pictures/priors.png (priors in
    `eval.priors` order, then the label-free placements and SPoT-ON), pictures/trajectories.png,
    pictures/learned.png (the learned global priors, when stage learned ran)."""
    order = list(cfg["backbones"])
    results, trans, sal = collect(inputs, order)
    if results.empty:
        raise FileNotFoundError("no evaluation results: the report needs at least one evaluate job")
    with atomic_path(out / "results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    tables = ["# Results", "", describe_environments(environments(inputs) + [environment()]), "",
              "Top-1 and kNN accuracy (%) per token budget. SPoT-ON rows use labels "
              "(an oracle upper bound); bold: the best non-oracle value per column (ties: the first, and named "
              "under the table).", ""]
    for b, g in results.groupby("backbone", sort=False):
        tables += [f"## Backbone: {b}", "", paper_table(g), ""]
    if not trans.empty:
        tables += ["## Transfer of oracle placements", "", trans.to_markdown(index=False, floatfmt=".4f"), ""]
    gaps = gap_closed(results)
    if not gaps.empty:
        tables += ["## Label-free placement: the oracle gap closed and the extra compute", "",
                   gaps.to_markdown(index=False, floatfmt=".4f"), ""]
    ptrans = placer_transfers(inputs, order)
    if not ptrans.empty:
        tables += ["## Transfer of placers", "", ptrans.to_markdown(index=False, floatfmt=".4f"), ""]
    found = findings(results, trans, sal, ptrans)
    for name, text, title in (("tables", "\n".join(tables), "SPoT results"), ("findings", found, "SPoT findings")):
        with atomic_path(out / f"{name}.md") as tmp:
            tmp.write_text(text)
        with atomic_path(out / f"{name}.html") as tmp:
            tmp.write_text(markdown_html(text, title))
    plot_data = results[["backbone", "prior", "oracle", "budget", "top1", "knn"]].sort_values(
        ["backbone", "prior", "oracle", "budget"], key=in_order(order)).assign(series=lambda d: d.backbone + "/" + d.prior +
                                                          np.where(d.oracle, "/oracle", ""))
    with atomic_path(out / "plots" / "accuracy_vs_budget.csv") as tmp:
        plot_data.to_csv(tmp, index=False)
    plot_budgets(results, out / "plots" / "accuracy_vs_budget.png")
    plot_oracle_steps(oracle_curves(inputs, order), out / "plots" / "oracle_steps.png")
    budgets = sorted(results.budget.unique())
    prior_sheet(inputs, out / "pictures" / "priors.png", cfg["eval"]["priors"], int(budgets[len(budgets) // 2]),
                cfg["report"]["pictures"])
    trajectory_sheet(inputs, out / "pictures" / "trajectories.png", order)
    learned_sheet(inputs, out / "pictures" / "learned.png", cfg["report"]["pictures"], order)
    metrics = {f"{r.backbone}/{r.prior}{'/oracle' if r.oracle else ''}/{r.budget}/{c}": round(float(getattr(r, c)), 6)
               for r in results.itertuples() for c in ("top1", "knn")}
    metrics.update({f"transfer/{r.src}__{r.dst}/{r.budget}/gain": round(float(r.gain), 6) for r in trans.itertuples()})
    metrics.update({f"{r.backbone}/{r.method}/{r.budget}/{c}": round(float(getattr(r, c)), 6)
                    for r in gaps.itertuples() for c in ("gap_closed", "extra_flops") if not np.isnan(getattr(r, c))})
    write_json(out / "metrics.json", metrics)
    write_metrics(out / "metrics", metric_rows(results, trans, sal, ptrans))
    artifacts = [str(p.relative_to(out)) for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return Record(dict(rows=len(results), transfers=len(trans)), artifacts)
