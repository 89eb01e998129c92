"""Saliency maps of images without a model: spectral residual (Hou & Zhang, CVPR 2007), batched."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, h, w) maps, reflect padding."""
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))


def spectral_residual(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Spectral residual saliency (Hou & Zhang, CVPR 2007), batched.

    images (B, C, H, W) in any range -> (B, size, size) in [0, 1]: the log-amplitude spectrum minus
    its 3x3 local mean, back through the inverse FFT with the original phase, squared, blurred.
    """
    g = F.interpolate(images.float().mean(1, keepdim=True), size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)
    spec = torch.fft.fft2(g)
    amp = spec.abs()
    log_amp = torch.log(amp + 0.1 * amp.flatten(1).mean(1)[:, None, None, None] + 1e-12)
    residual = log_amp - F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    sal = torch.fft.ifft2(torch.exp(residual + 1j * spec.angle())).abs() ** 2
    sal = gaussian_blur(sal, sigma=size / 25)[:, 0]
    lo, hi = sal.flatten(1).amin(1), sal.flatten(1).amax(1)
    return (sal - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]


METHODS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"spectral_residual": spectral_residual}


def saliency_maps(images: torch.Tensor, method: str = "spectral_residual", size: int = 64) -> torch.Tensor:
    """(B, C, H, W) images -> (B, size, size) maps in [0, 1] with a method from `METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](images, size)
