"""Figures: saving them atomically, and drawing tokens and trajectories on images (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spot.utils.io import atomic_path  # noqa: E402


def save_fig(fig, path: str | Path, dpi: int = 110) -> None:
    """Write `fig` as PNG to `path` atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def to_display(images, mean, std) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) floats in [0, 1] for display."""
    import torch
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def draw_tokens(ax, image: np.ndarray, positions: np.ndarray, k: int, color: str = "red") -> None:
    """`image` (H, W, 3) with a k x k box per position (N, 2) (y, x) in [0, 1]."""
    h, w = image.shape[:2]
    ax.imshow(image)
    for y, x in positions:
        ax.add_patch(mpatches.Rectangle((x * w - k / 2 - 0.5, y * h - k / 2 - 0.5), k, k, fill=False, ec=color,
                                        lw=0.8))
    ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5))                # boxes at the border do not rescale
    ax.set_xticks([]), ax.set_yticks([])


def draw_trajectories(ax, image: np.ndarray, trajectory: np.ndarray, k: int) -> None:
    """Trajectories (steps+1, N, 2) (y, x) in [0, 1] on `image`: start dots, paths, end boxes of k px."""
    h, w = image.shape[:2]
    draw_tokens(ax, image, trajectory[-1], k)
    ys, xs = trajectory[..., 0] * h - 0.5, trajectory[..., 1] * w - 0.5
    ax.plot(xs, ys, color="yellow", lw=0.8, alpha=0.8)
    ax.scatter(xs[0], ys[0], s=6, c="cyan", zorder=3)
    ax.axis("off")


def save_preview(pairs: list, path: Path) -> None:
    """A picture grid: each image above its saliency map."""
    n = max(1, len(pairs))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for j, (im, m) in enumerate(pairs):
        axes[0, j].imshow(im)
        axes[1, j].imshow(m.numpy(), cmap="inferno", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("images (top) and their saliency maps (bottom)")
    save_fig(fig, path, dpi=100)
