"""Saliency from a model of the pipeline itself: input-gradient magnitude of a trained SPoT/ViT backbone.

Label-free: the gradient is that of the model's own top logit, on the full patch grid (the plain
ViT). Beside `spot.core.saliency.spectral_residual`, which needs no model; the `model_salient` prior
draws positions from these maps as `salient` does from spectral residual's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spot.core.model import frozen
from spot.core.saliency import gaussian_blur


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
