"""Amortised placer: a tiny CNN that reads a low-resolution copy of an image and places N tokens.

Trained with the backbone frozen, end to end through the subpixel tokenizer (classification loss),
and/or by imitating SPoT-ON's final placements with a symmetric Chamfer distance. No label at
inference: one placer forward, then the backbone at the placed positions.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from spot.core.devices import autocast_for, to_device
from spot.core.model import frozen
from spot.core.priors import lattice
from spot.methods.learned_prior import batches_forever, unpack_batch


class Placer(nn.Module):
    """images (B, C, H, W) -> (B, n, 2) token positions (y, x) in (0, 1), i.e. inside the image.

    The image is average-pooled to in_size x in_size, read by three 3x3 convs (width, 2 width,
    2 width channels; the last two stride 2, GELU) and a linear head to 2n logits, squashed by a
    sigmoid. The head starts at `init` (n, 2) (default: the square lattice of n points): its bias is
    logit(init) and its weights are tiny, so an untrained placer outputs ~init and training learns
    image-dependent moves from there (start it from the learned global prior to refine that). No
    batch statistics: each image's positions depend on that image only. Weights are drawn from
    `seed` (global RNG untouched); the head runs in float32 whatever the autocast state.
    """

    def __init__(self, n: int, in_chans: int = 3, in_size: int = 16, width: int = 8,
                 init: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if n < 1 or in_size < 1 or width < 1:
            raise ValueError(f"Placer: need n, in_size, width >= 1, got {n}, {in_size}, {width}")
        self.n, self.in_size = n, in_size
        self.config = dict(n=n, in_chans=in_chans, in_size=in_size, width=width)
        side = -(-in_size // 4)                                  # two stride-2 convs with padding 1: ceil(s / 4)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(in_chans, width, 3, padding=1), nn.GELU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(), nn.Flatten())
            self.head = nn.Linear(2 * width * side * side, 2 * n)
            nn.init.normal_(self.head.weight, std=1e-3)
        init = lattice(n, 1, 1) if init is None else init.detach().float().cpu()
        if init.shape != (n, 2):
            raise ValueError(f"Placer: init must be ({n}, 2) positions, got {tuple(init.shape)}")
        with torch.no_grad():
            self.head.bias.copy_(torch.logit(init.clamp(1e-3, 1 - 1e-3)).flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.body(F.adaptive_avg_pool2d(images, self.in_size))
        with torch.autocast(images.device.type, enabled=False):
            return torch.sigmoid(self.head(x.to(self.head.weight.dtype))).view(len(images), self.n, 2)


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) symmetric Chamfer distance between point sets a (B, N, 2) and b (B, M, 2): the mean squared
    distance from each point of a to its nearest in b, plus the same from b to a (normalised units²).
    Zero iff the sets coincide; invariant to the order of the points; differentiable a.e."""
    d = (a[:, :, None] - b[:, None]).pow(2).sum(-1)              # (B, N, M)
    return d.min(2).values.mean(1) + d.min(1).values.mean(1)


def train_placer(model, placer: Placer, batches: Iterable, steps: int, lr: float = 1e-3, weight_decay: float = 0.0,
                 classification: float = 1.0, imitation: float = 0.0,
                 log: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """Train `placer` in place with the backbone `model` (a `SPoTViT`) frozen; returns the (steps,) loss.

    Loss per batch = classification * cross-entropy(model(images, placer(images)), labels)
                   + imitation * mean chamfer_distance(placer(images), targets),
    the first back-propagated through the frozen backbone and the subpixel tokenizer into the placer
    (the backbone gets no gradient), the second needing batches (images, labels, targets (B, M, 2)),
    e.g. SPoT-ON's final positions (M may differ from N). With classification = 0 the backbone is not
    run. batches are cycled for `steps` AdamW steps at constant `lr`. `log(step, {"loss", "ce",
    "chamfer"})` after each step. Deterministic on CPU for fixed placer weights and batches.
    """
    if steps < 0 or lr <= 0 or classification < 0 or imitation < 0 or classification + imitation == 0:
        raise ValueError(f"train_placer: need steps >= 0, lr > 0 and non-negative loss weights, not both 0; got "
                         f"steps={steps}, lr={lr}, classification={classification}, imitation={imitation}")
    device = next(model.parameters()).device
    placer.to(device).train()
    opt = torch.optim.AdamW(placer.parameters(), lr=lr, weight_decay=weight_decay)
    stream = batches_forever(batches)
    losses = []
    with frozen(model, device):
        for step in range(steps):
            images, labels, targets = unpack_batch(next(stream))
            images = to_device(images, device)
            parts = {}
            with autocast_for(device):
                pos = placer(images)
                if classification:
                    parts["ce"] = F.cross_entropy(model(images, pos).float(), to_device(labels, device))
            if imitation:
                if targets is None:
                    raise ValueError("train_placer: imitation > 0 needs batches (images, labels, targets)")
                parts["chamfer"] = chamfer_distance(pos, to_device(targets, device).float()).mean()
            loss = classification * parts.get("ce", 0.0) + imitation * parts.get("chamfer", 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if log is not None:
                log(step, {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}})
    placer.eval()
    return torch.stack(losses).cpu() if losses else torch.zeros(0)
