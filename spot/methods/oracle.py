"""SPoT-ON: gradient search over token positions for a frozen model (an oracle: it uses labels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spot.core.devices import autocast_for, to_device
from spot.core.model import frozen

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class OracleResult:
    """Outcome of `oracle_search` for B images, N tokens, `steps` steps. Positions are (y, x) in [0, 1]."""
    positions: torch.Tensor      # (B, N, 2) final positions
    trajectory: torch.Tensor     # (B, steps + 1, N, 2), index 0 = initial positions
    loss: torch.Tensor           # (steps + 1,) mean cross-entropy at each step's positions
    accuracy: torch.Tensor       # (steps + 1,) top-1 at each step's positions
    correct: torch.Tensor        # (B, steps + 1) bool, per image and step
    snapped: torch.Tensor        # (B, N, 2) final positions moved to the nearest patch-cell centre
    snapped_correct: torch.Tensor  # (B,) bool, top-1 at the snapped positions
    features: torch.Tensor       # (B, D) pooled features at the final positions


def snap_to_grid(positions: torch.Tensor, img_size: tuple[int, int], k: int) -> torch.Tensor:
    """(B, N, 2) positions moved to the centre of the nearest cell of the k-stride patch grid."""
    size = to_device(torch.tensor(img_size, dtype=positions.dtype), positions.device)
    cells = (positions * size / k).floor().clamp(min=0).minimum(size // k - 1)   # (B, N, 2) cell index
    return (cells * k + k / 2) / size


def search_positions(model, images: torch.Tensor, positions: torch.Tensor, objective, steps: int, lr: float,
                     optimizer: str, what: str = "oracle"):
    """Gradient steps on the token positions only: minimise objective(logits) for a frozen `model`.

    model: a `SPoTViT` (frozen and in eval mode for the search, restored after: no parameter receives
    a gradient). images (B, C, H, W), positions (B, N, 2) initial (y, x) in [0, 1]; `objective` maps
    logits (B, classes) float32 to a scalar, a sum over the images of a per-image value, so images do
    not interact (Adam/AdamW are per coordinate, without weight decay): an image's result does not
    depend on its batch. Positions are clamped to [0, 1] after every step; `lr` is in normalised
    units. steps + 1 forward and `steps` backward passes (to the positions only), bf16 autocast on
    CUDA (the tokenizer samples in float32). `what` names the search in errors. Returns the
    trajectory (B, steps + 1, N, 2) (index 0: the start), the logits of every step [(B, classes)] and
    the pooled features (B, D) at the final positions.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown {what} optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"{what}: need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if positions.ndim != 3 or positions.shape[-1] != 2 or len(images) != len(positions):
        raise ValueError(f"{what}: need images (B, C, H, W) and positions (B, N, 2), got "
                         f"{tuple(images.shape)}, {tuple(positions.shape)}")
    images = images.detach()
    pos = positions.detach().clone().float().requires_grad_(True)
    opt = OPTIMIZERS[optimizer]([pos], lr=lr, **({"weight_decay": 0.0} if optimizer != "sgd" else {}))
    traj, logits_per_step = [], []
    with frozen(model, images.device):
        for step in range(steps + 1):
            last = step == steps
            with torch.set_grad_enabled(not last), autocast_for(images.device):
                tokens = model.forward_features(images, pos)
                logits = model.vit.forward_head(tokens).float()
                total = objective(logits)
            traj.append(pos.detach().clone())
            logits_per_step.append(logits.detach())
            if last:
                break
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            with torch.no_grad():
                pos.clamp_(0, 1)
        with torch.no_grad(), autocast_for(images.device):
            features = model.vit.forward_head(tokens, pre_logits=True).float()
    return torch.stack(traj, 1), logits_per_step, features


def oracle_search(model, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                  steps: int = 5, lr: float = 3e-3, optimizer: str = "adamw") -> OracleResult:
    """Minimise cross-entropy(model(images, S), labels) over the token positions S only
    (`search_positions`), then one forward at the snapped positions.

    images (B, C, H, W), labels (B,), positions (B, N, 2) initial (y, x) in [0, 1]. Deterministic
    for a fixed input. Returns tensors on the images' device (nothing waits for the GPU).
    """
    if len(labels) != len(images):
        raise ValueError(f"oracle_search: need images (B, C, H, W) and labels (B,), got {tuple(images.shape)}, "
                         f"{tuple(labels.shape)}")
    traj, logits, features = search_positions(
        model, images, positions, lambda z: F.cross_entropy(z, labels, reduction="sum"), steps, lr, optimizer)
    final = traj[:, -1]
    snapped = snap_to_grid(final, model.img_size, model.k)
    with frozen(model, images.device), torch.no_grad(), autocast_for(images.device):
        snapped_correct = model(images.detach(), snapped).argmax(1) == labels
    correct = torch.stack([z.argmax(1) == labels for z in logits], 1)
    loss = torch.stack([F.cross_entropy(z, labels) for z in logits])
    return OracleResult(positions=final, trajectory=traj, loss=loss, accuracy=correct.float().mean(0),
                        correct=correct, snapped=snapped, snapped_correct=snapped_correct, features=features)
