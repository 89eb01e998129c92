"""Label-free test-time search: SPoT-ON's loop with the label replaced by the model's own confidence.

Gradient steps on the token positions that lower the entropy of the frozen model's prediction. It
takes no label, so it can run at inference; its cost is `steps` forward + backward passes more.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spot.methods.oracle import search_positions, snap_to_grid


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
    """Minimise the entropy of softmax(model(images, S)) over the token positions S only; no labels
    (`spot.methods.oracle.search_positions`).

    images (B, C, H, W), positions (B, N, 2) initial (y, x) in [0, 1], e.g. a prior's or the learned
    global prior's. The prediction is the last forward's. Deterministic for a fixed input; an image's
    result does not depend on its batch. Tensors on the images' device, entropy on the CPU.
    """
    traj, logits, features = search_positions(model, images, positions, lambda z: prediction_entropy(z).sum(),
                                              steps, lr, optimizer, what="entropy search")
    final = traj[:, -1]
    image_entropy = torch.stack([prediction_entropy(z) for z in logits], 1)
    return EntropyResult(positions=final, trajectory=traj, entropy=image_entropy.mean(0).cpu(),
                         image_entropy=image_entropy, predictions=torch.stack([z.argmax(1) for z in logits], 1),
                         logits=logits[-1], snapped=snap_to_grid(final, model.img_size, model.k), features=features)
