"""Label-free test-time search: SPoT-ON's loop with the label replaced by the model's own confidence.

Gradient steps on the token positions that lower the entropy of the frozen model's prediction. It
takes no label, so it can run at inference; its cost is `steps` forward + backward passes more.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spot.model import autocast_for
from spot.oracle import OPTIMIZERS, frozen, snap_to_grid


@dataclass
class EntropyResult:
    """Outcome of `entropy_search` for B images, N tokens, `steps` steps. Positions are (y, x) in [0, 1]."""
    positions: torch.Tensor      # (B, N, 2) final positions
    trajectory: torch.Tensor     # (B, steps + 1, N, 2), index 0 = initial positions
    entropy: torch.Tensor        # (steps + 1,) mean prediction entropy (nats) at each step's positions, CPU
    image_entropy: torch.Tensor  # (B, steps + 1) per image and step
    predictions: torch.Tensor    # (B, steps + 1) argmax class at each step (compare with labels afterwards)
    logits: torch.Tensor         # (B, classes) float32 at the final positions
    snapped: torch.Tensor        # (B, N, 2) final positions moved to the nearest patch-cell centre
    features: torch.Tensor       # (B, D) pooled features at the final positions


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) entropy in nats of softmax(logits) for logits (B, classes)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_search(model, images: torch.Tensor, positions: torch.Tensor, steps: int = 5, lr: float = 3e-3,
                   optimizer: str = "adamw") -> EntropyResult:
    """Minimise the entropy of softmax(model(images, S)) over the token positions S only; no labels.

    model: a `SPoTViT` (frozen and in eval mode for the search, restored after: no parameter receives
    a gradient). images (B, C, H, W), positions (B, N, 2) initial (y, x) in [0, 1], e.g. a prior's or
    the learned global prior's. Each image's entropy is summed, so images do not interact (Adam/AdamW
    are per coordinate, without weight decay): an image's result does not depend on its batch. The
    positions are clamped to [0, 1] after every step; `lr` is in normalised units. steps + 1 forward
    and `steps` backward passes (to the positions only); the prediction is the last forward's. bf16
    autocast on CUDA. Deterministic for a fixed input. Tensors on the images' device, entropy on the CPU.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown entropy-search optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"entropy search: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if positions.ndim != 3 or positions.shape[-1] != 2 or len(images) != len(positions):
        raise ValueError(f"entropy_search: need images (B, C, H, W) and positions (B, N, 2), got "
                         f"{tuple(images.shape)}, {tuple(positions.shape)}")
    images = images.detach()
    pos = positions.detach().clone().float().requires_grad_(True)
    opt = OPTIMIZERS[optimizer]([pos], lr=lr, **({"weight_decay": 0.0} if optimizer != "sgd" else {}))
    traj, ents, preds = [], [], []
    with frozen(model):
        for step in range(steps + 1):
            last = step == steps
            with torch.set_grad_enabled(not last), autocast_for(images.device):
                tokens = model.forward_features(images, pos)
                logits = model.vit.forward_head(tokens).float()
                ent = prediction_entropy(logits)
                total = ent.sum()                           # images do not interact
            traj.append(pos.detach().clone())
            ents.append(ent.detach())
            preds.append(logits.detach().argmax(1))
            if last:
                break
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            with torch.no_grad():
                pos.clamp_(0, 1)
        with torch.no_grad(), autocast_for(images.device):
            features = model.vit.forward_head(tokens, pre_logits=True).float()
    final = pos.detach()
    image_entropy = torch.stack(ents, 1)
    return EntropyResult(positions=final, trajectory=torch.stack(traj, 1), entropy=image_entropy.mean(0).cpu(),
                         image_entropy=image_entropy, predictions=torch.stack(preds, 1), logits=logits.detach(),
                         snapped=snap_to_grid(final, model.img_size, model.k), features=features)
