"""SPoT-ON: gradient search over token positions for a frozen model (an oracle: it uses labels)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spot.model import autocast_for

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


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and requires_grad=False on every parameter for the block; restores both after."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(training)


def snap_to_grid(positions: torch.Tensor, img_size: tuple[int, int], k: int) -> torch.Tensor:
    """(B, N, 2) positions moved to the centre of the nearest cell of the k-stride patch grid."""
    size = torch.tensor(img_size, device=positions.device, dtype=positions.dtype)
    cells = (positions * size / k).floor().clamp(min=0).minimum(size // k - 1)   # (B, N, 2) cell index
    return (cells * k + k / 2) / size


def oracle_search(model, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                  steps: int = 5, lr: float = 3e-3, optimizer: str = "adamw") -> OracleResult:
    """Minimise cross-entropy(model(images, S), labels) over the token positions S only.

    model: a `SPoTViT` (frozen and in eval mode for the search, restored after: no parameter receives
    a gradient). images (B, C, H, W), labels (B,), positions (B, N, 2) initial (y, x) in [0, 1].
    Each image's loss is summed, so images do not interact (Adam/AdamW are per coordinate, without
    weight decay); positions are clamped to [0, 1] after every step; `lr` is in normalised units.
    steps + 1 forward passes and `steps` backward passes (to the positions only), plus one forward
    at the snapped positions. bf16 autocast on CUDA (the tokenizer samples in float32).
    Deterministic for a fixed input. Returns tensors on the images' device, loss/accuracy on the CPU.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown oracle optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if steps < 0:
        raise ValueError(f"oracle steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"oracle lr must be > 0, got {lr}")
    if positions.ndim != 3 or positions.shape[-1] != 2 or not len(images) == len(labels) == len(positions):
        raise ValueError(f"oracle_search: need images (B, C, H, W), labels (B,), positions (B, N, 2), got "
                         f"{tuple(images.shape)}, {tuple(labels.shape)}, {tuple(positions.shape)}")
    images = images.detach()
    pos = positions.detach().clone().float().requires_grad_(True)
    kw = {"weight_decay": 0.0} if optimizer != "sgd" else {}
    opt = OPTIMIZERS[optimizer]([pos], lr=lr, **kw)
    autocast = autocast_for(images.device)
    traj, losses, correct = [], [], []
    with frozen(model):
        for step in range(steps + 1):
            last = step == steps
            with torch.set_grad_enabled(not last), autocast:
                tokens = model.forward_features(images, pos)
                logits = model.vit.forward_head(tokens).float()
                loss = F.cross_entropy(logits, labels, reduction="sum")
            traj.append(pos.detach().clone())
            losses.append(loss.detach() / len(labels))
            correct.append(logits.argmax(1) == labels)
            if last:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                pos.clamp_(0, 1)
        final = pos.detach()
        snapped = snap_to_grid(final, model.img_size, model.k)
        with torch.no_grad(), autocast:
            features = model.vit.forward_head(tokens, pre_logits=True).float()
            snapped_correct = model(images, snapped).argmax(1) == labels
    correct = torch.stack(correct, 1)
    return OracleResult(positions=final, trajectory=torch.stack(traj, 1), loss=torch.stack(losses).cpu(),
                        accuracy=correct.float().mean(0).cpu(), correct=correct, snapped=snapped,
                        snapped_correct=snapped_correct, features=features)
