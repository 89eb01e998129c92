"""Picture sheets: the tokens each prior and placement put on the first val images, the learned
global priors, and the SPoT-ON trajectories of every backbone and budget."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from spot.data.decoded import Decoded
from spot.data.imagenet import short_name
from spot.methods import LABEL_FREE
from spot.report.collect import records
from spot.report.summary import model_name
from spot.training.backbones import read_meta
from spot.utils.figures import draw_tokens, save_fig, to_display
from spot.utils.io import read_json


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
