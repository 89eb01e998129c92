"""Saliency analysis of oracle placements (case study 3) and trajectory pictures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from spot.backbones import load_backbone
from spot.data.loading import make_loader
from spot.utils import read_json, write_json, write_run_record


def saliency_at(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, N) saliency read bilinearly at positions (B, N, 2) (y, x) in [0, 1] from maps (B, H, W)."""
    grid = (2 * positions - 1).flip(-1)[:, None]
    return F.grid_sample(maps[:, None], grid, mode="bilinear", align_corners=False)[:, 0, 0]


def denormalise(images: torch.Tensor, data_config: dict) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) floats in [0, 1] for display."""
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def draw_trajectories(ax, image: np.ndarray, traj: np.ndarray, k: int) -> None:
    """Draw trajectories (steps+1, N, 2) (y, x) in [0, 1] on `image`: start dots, end boxes of k px, paths."""
    h, w = image.shape[:2]
    ax.imshow(image)
    ys, xs = traj[..., 0] * h - 0.5, traj[..., 1] * w - 0.5
    ax.plot(xs, ys, color="yellow", lw=0.8, alpha=0.8)
    ax.scatter(xs[0], ys[0], s=6, c="cyan", zorder=3)
    for y, x in zip(ys[-1], xs[-1]):
        ax.add_patch(plt_rect(x - k / 2, y - k / 2, k))
    ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5))                # boxes at the border do not rescale
    ax.axis("off")


def plt_rect(x: float, y: float, k: float):
    import matplotlib.patches as mpatches
    return mpatches.Rectangle((x, y), k, k, fill=False, ec="red", lw=0.8)


def analyze(oracle_dir: str | Path, backbone_dir: str | Path, shards_dir: str | Path, saliency_dir: str | Path,
            out_dir: str | Path, pictures: int = 8) -> dict:
    """Mean saliency under the initial vs the final oracle positions, and a trajectory picture sheet."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spot.utils import atomic_path
    oracle_dir = Path(oracle_dir)
    found = pd.read_parquet(oracle_dir / "results.parquet").set_index("key")
    params = read_json(oracle_dir / "run.json")["params"]
    model = load_backbone(backbone_dir)
    init_s, final_s, shown = [], [], []
    for b in make_loader(shards_dir, "val", model.data_config, 256, saliency_dir=saliency_dir):
        rows = found.loc[b.keys]
        init = torch.from_numpy(np.stack(rows["init"].to_numpy()).astype(np.float32)).view(len(b.keys), -1, 2)
        final = torch.from_numpy(np.stack(rows["final"].to_numpy()).astype(np.float32)).view(len(b.keys), -1, 2)
        init_s.append(saliency_at(b.saliency, init).mean(1))
        final_s.append(saliency_at(b.saliency, final).mean(1))
        if len(shown) < pictures:
            imgs = denormalise(b.images[:pictures - len(shown)], model.data_config)
            shown += [(im, np.stack([i, f])) for im, i, f in zip(imgs, init.numpy(), final.numpy())]
    init_s, final_s = torch.cat(init_s), torch.cat(final_s)
    metrics = dict(saliency_init=init_s.mean().item(), saliency_final=final_s.mean().item(),
                   saliency_delta=(final_s - init_s).mean().item(),
                   frac_images_more_salient=(final_s > init_s).float().mean().item(), n=len(init_s))
    out = Path(out_dir)
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(2 * max(1, len(shown)), 2.3), squeeze=False)
    for ax, (im, traj) in zip(axes[0], shown):
        draw_trajectories(ax, im, traj, model.k)
    fig.suptitle(f"SPoT-ON {params['backbone']} {params['prior']} N={params['budget']}: start (cyan) -> end (red)")
    with atomic_path(out / "trajectories.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_json(out / "saliency.json", metrics)
    write_run_record(out, stage="analysis", job=f"analysis/{params['backbone']}/{params['prior']}/{params['budget']}",
                     params=dict(backbone=params["backbone"], prior=params["prior"], budget=params["budget"]),
                     metrics=metrics, artifacts=["saliency.json", "trajectories.png"])
    return metrics
