"""Saliency from a model of the pipeline itself: input-gradient magnitude of a trained SPoT/ViT backbone.

Label-free: the gradient is that of the model's own top logit, on the full patch grid (the plain
ViT). Beside `spot.saliency.spectral_residual`, which needs no model; the `model_salient` prior
draws positions from these maps as `salient` does from spectral residual's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spot.model import frozen
from spot.saliency import gaussian_blur


def input_gradient(model, images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(B, C, H, W) normalised images -> (B, size, size) maps in [0, 1]: |d top logit / d pixel| summed
    over channels, resized to size x size (area), blurred (sigma size/25, as spectral residual) and
    scaled to [0, 1] per image. `model` is a `SPoTViT`, evaluated on its full patch grid; no parameter
    gets a gradient."""
    x = images.detach().float().clone().requires_grad_(True)
    with frozen(model), torch.enable_grad():
        logits = model(x, model.grid_positions(len(x), x.device))
        logits.max(1).values.sum().backward()
    g = x.grad.abs().sum(1, keepdim=True)
    g = F.interpolate(g, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    g = gaussian_blur(g, sigma=size / 25)[:, 0]
    lo, hi = g.flatten(1).amin(1), g.flatten(1).amax(1)
    return (g - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]


class SaliencyMaps:
    """The maps a model-saliency job wrote (`<split>-saliency.npy` uint8 (n, s, s), `<split>-keys.npy`),
    looked up by image key: `maps("val", keys)` -> (B, s, s) float in [0, 1]."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.rows: dict[str, dict[str, int]] = {}

    def __call__(self, split: str, keys: list[str]) -> torch.Tensor:
        if split not in self.rows:
            self.rows[split] = {str(k): i for i, k in enumerate(np.load(self.folder / f"{split}-keys.npy"))}
        missing = [k for k in keys if k not in self.rows[split]]
        if missing:
            raise ValueError(f"{self.folder} has no {split} map for {len(missing)} images (e.g. {missing[0]!r}): "
                             "the kNN bank is larger than the maps made (eval.knn.bank_size)?")
        maps = np.load(self.folder / f"{split}-saliency.npy", mmap_mode="r")
        return torch.from_numpy(maps[[self.rows[split][k] for k in keys]]).float() / 255
