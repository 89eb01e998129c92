"""Subpixel tokenizer: k x k windows read by bilinear interpolation at continuous positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_offsets(k: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(k*k, 2) pixel offsets (dy, dx) of a window's samples from its centre: 1 px apart, centred."""
    d = torch.arange(k, device=device, dtype=dtype) - (k - 1) / 2
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=-1)


def extract_windows(images: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Read one k x k window per position.

    images: (B, C, H, W). positions: (B, N, 2) window centres as (y, x) normalised to [0, 1]
    (0 = top/left image edge, 1 = bottom/right edge; pixel r's centre is at (r + 0.5) / H).
    Returns (B, N, C, k, k): sample (i, j) is the bilinear value at pixel coordinates
    (y*H + i - (k-1)/2, x*W + j - (k-1)/2), so a window centred on a patch cell of a k-stride
    grid reads exactly that patch. Samples outside the image read zero. Differentiable with
    respect to images and positions. One fused `F.grid_sample` call in float32 (or float64).
    """
    B, C, H, W = images.shape
    N = positions.shape[1]
    dtype = images.dtype if images.dtype == torch.float64 else torch.float32
    size = torch.tensor([H, W], device=images.device, dtype=dtype)
    centres = positions.to(dtype) * size                                   # (B, N, 2) pixels
    pts = centres[:, :, None, :] + window_offsets(k, images.device, dtype)  # (B, N, k*k, 2)
    grid = (2 * pts / size - 1).flip(-1)                                    # (x, y) in [-1, 1]
    out = F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)                                 # (B, C, N, k*k)
    return out.permute(0, 2, 1, 3).reshape(B, N, C, k, k).to(images.dtype)
