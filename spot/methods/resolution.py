"""Lower resolution: the image resized so that the patch grid holds about N tokens, on the same weights.

The image is resized (bilinear, antialiased) to the grid times the patch size, embedded by the
model's own patch embedding, and the position table resampled to that grid as timm does
(`timm.layers.resample_abs_pos_embed`: bicubic, antialiased). Prefix tokens keep their entries. At
the model's own grid nothing is resampled and the output is the model's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from spot.core.cost import vit_flops
from spot.core.model import SPoTViT


def grid_for(model: SPoTViT, n: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid with about n tokens and the model's aspect ratio (at least 1 x 1)."""
    gh, gw = model.grid_size
    rows = max(1, round(math.sqrt(n * gh / gw)))
    return rows, max(1, round(n / rows))


def low_res_tokens(model: SPoTViT, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, P + rows·cols, D) input tokens of images (B, C, H, W) resized to the patch grid `grid`."""
    vit, k = model.vit, model.patch_size[0]
    size = (grid[0] * k, grid[1] * k)
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    x = vit.patch_embed.norm(vit.patch_embed.proj(images).flatten(2).transpose(1, 2))   # (B, rows·cols, D)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    if vit.pos_embed is not None:
        pos = resample_abs_pos_embed(vit.pos_embed, list(grid), list(vit.patch_embed.grid_size), num_prefix_tokens=prefix)
        x = x + pos[:, prefix:]
    return model.with_prefix(x)


def low_res_forward(model: SPoTViT, images: torch.Tensor, n: int, pre_logits: bool = False) -> torch.Tensor:
    """(B, num_classes) logits (pre_logits: (B, D) pooled features) of `model` on images (B, C, H, W)
    at the resolution of about n tokens (`grid_for`)."""
    vit = model.vit
    x = vit.norm(vit.blocks(low_res_tokens(model, images, grid_for(model, n))))
    return vit.forward_head(x, pre_logits=pre_logits)


def low_res_flops(model: SPoTViT, n: int) -> int:
    """Analytic FLOPs per image of `low_res_forward` at about n tokens: the plain ViT on rows·cols tokens."""
    rows, cols = grid_for(model, n)
    return vit_flops(model.vit, rows * cols)
