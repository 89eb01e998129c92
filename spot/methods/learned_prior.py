"""Learned global prior: N token positions shared by every image, fitted through a frozen SPoT model.

The positions are found by gradient descent on the classification loss of training batches (labels
are used while fitting only); at inference they cost nothing: feed them to every image. Also holds
the small pieces the other label-free placements share (batch unpacking, endless batch iteration).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from spot.core.devices import autocast_for, to_device
from spot.core.model import frozen
from spot.core.priors import NEEDS_SALIENCY, sample_positions
from spot.methods.oracle import OPTIMIZERS


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(images, labels, targets or None) of a batch given as a tuple (images, labels[, targets]) or an
    object with `.images`, `.labels` (and optionally `.targets`), like `spot.data` batches.
    targets are (B, M, 2) positions to imitate (e.g. SPoT-ON's final placements)."""
    if hasattr(batch, "images"):
        return batch.images, getattr(batch, "labels", None), getattr(batch, "targets", None)
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(f"a batch must be (images, labels[, targets]) or have .images/.labels, got {type(batch).__name__}")
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


def batches_forever(batches: Iterable) -> Iterator:
    """Endless iterator over `batches`, starting a new pass when one ends (a list or a loader is
    re-iterated); ValueError if a pass yields nothing (an empty or already spent iterable)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("the batches ran out (empty, or a generator already consumed): pass a re-iterable")


def initial_positions(init: str | torch.Tensor, n: int, img_size: tuple[int, int], k: int, seed: int = 0) -> torch.Tensor:
    """(n, 2) starting positions, (y, x) in [0, 1]: a (n, 2) tensor as given, or one draw of the named
    prior (`spot.core.priors`; not the map priors) from a CPU generator seeded by `seed`."""
    if isinstance(init, torch.Tensor):
        if init.shape != (n, 2):
            raise ValueError(f"init positions must be ({n}, 2), got {tuple(init.shape)}")
        return init.detach().float().cpu().clamp(0, 1)
    if init in NEEDS_SALIENCY + ("edge",):
        raise ValueError(f"init prior {init!r} depends on the image; a global prior needs an image-free one")
    gen = torch.Generator().manual_seed(seed)
    return sample_positions(init, 1, n, *img_size, k=k, generator=gen)[0]


def fit_global_prior(model, batches: Iterable, n: int, steps: int = 200, lr: float = 1e-2,
                     init: str | torch.Tensor = "isotropic", optimizer: str = "adamw", seed: int = 0,
                     cosine: bool = True, log: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """Fit N positions shared by all images: minimise mean cross-entropy(model(images, S), labels) over S.

    model: a `SPoTViT`, frozen and in eval mode while fitting (restored after; no parameter gets a
    gradient). batches: re-iterable of (images (B, C, H, W), labels (B,)) on any device, cycled for
    `steps` optimiser steps (one batch each), the learning rate decayed from `lr` to 0 on a half
    cosine (`cosine=False`: constant). init: a prior name or (n, 2) positions (see
    `initial_positions`; `seed` draws a random prior). `lr` is in normalised position units; positions
    are clamped to [0, 1] after every step, as in SPoT-ON. `log(step, {"loss": float})` after each step.
    Deterministic for fixed inputs and seed (on CPU). bf16 autocast on CUDA.
    Returns (n, 2) float32 positions (y, x) in [0, 1], on the CPU.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if steps < 0 or lr <= 0 or n < 1:
        raise ValueError(f"fit_global_prior: need n >= 1, steps >= 0, lr > 0; got n={n}, steps={steps}, lr={lr}")
    device = next(model.parameters()).device
    pos = initial_positions(init, n, model.img_size, model.k, seed).to(device).requires_grad_(True)
    opt = OPTIMIZERS[optimizer]([pos], lr=lr, **({"weight_decay": 0.0} if optimizer != "sgd" else {}))
    stream = batches_forever(batches)
    with frozen(model, device):
        for step in range(steps):
            images, labels, _ = unpack_batch(next(stream))
            images, labels = to_device(images, device), to_device(labels, device)
            if cosine:
                opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            with autocast_for(device):
                logits = model(images, pos.expand(len(images), -1, -1)).float()
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                pos.clamp_(0, 1)
            if log is not None:
                log(step, {"loss": loss.item()})
    return pos.detach().cpu()
