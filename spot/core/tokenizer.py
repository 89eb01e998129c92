"""Subpixel tokenizer: k x k windows read by bilinear interpolation at continuous positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spot.core.devices import to_device


def extract_windows(images: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Read one k x k window per position.

    images: (B, C, H, W). positions: (B, N, 2) window centres as (y, x) normalised to [0, 1]
    (0 = top/left image edge, 1 = bottom/right edge; pixel r's centre is at (r + 0.5) / H).
    Returns (B, N, C, k, k): sample (i, j) is the bilinear value at pixel coordinates
    (y*H + i - (k-1)/2, x*W + j - (k-1)/2) in the pixel-centre convention. Samples outside the
    image read zero. A window centred on a cell of the k-stride patch grid reads exactly that patch
    (its interpolation weights are exactly 0 and 1). Differentiable with respect to positions
    (almost everywhere) and images.

    How: the window's top-left sample sits at continuous pixel index u = y*H - k/2; every token
    gathers its integer (k+1) x (k+1) window at floor(u) from a strided view of the zero-padded
    image (no copy), then two lerps by frac(u) give the k x k samples. Computed in float32
    (float64 for float64 images) whatever the autocast state; the result has the images' dtype.
    """
    if images.ndim != 4 or positions.ndim != 3 or positions.shape[-1] != 2 or positions.shape[0] != images.shape[0]:
        raise ValueError(f"extract_windows: need images (B, C, H, W) and positions (B, N, 2), "
                         f"got {tuple(images.shape)} and {tuple(positions.shape)}")
    if k < 1:
        raise ValueError(f"extract_windows: window size k must be >= 1, got {k}")
    B, C, H, W = images.shape
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    with torch.autocast(images.device.type, enabled=False):
        size = to_device(torch.tensor([H, W], dtype=dtype), images.device)
        # Top-left sample in pixel indices; beyond [-(k+1), size] every sample reads zero anyway.
        u = (positions.to(dtype) * size - k / 2).clamp(min=-(k + 1)).minimum(size)   # (B, N, 2)
        start = u.detach().floor()
        frac = u - start                                                             # (B, N, 2) in [0, 1)
        idx = start.long() + (k + 1)                                                 # into the padded image
        padded = F.pad(images.to(dtype), (k + 1,) * 4)                               # zeros outside
        windows = padded.unfold(2, k + 1, 1).unfold(3, k + 1, 1)                     # (B, C, H', W', k+1, k+1) view
        batch = torch.arange(B, device=images.device)[:, None]
        win = windows[batch, :, idx[..., 0], idx[..., 1]]                            # (B, N, C, k+1, k+1)
        fy, fx = frac[..., 0, None, None, None], frac[..., 1, None, None, None]
        rows = torch.lerp(win[..., :-1, :], win[..., 1:, :], fy)                     # (B, N, C, k, k+1)
        out = torch.lerp(rows[..., :-1], rows[..., 1:], fx)                          # (B, N, C, k, k)
    return out.to(images.dtype)
