"""Inference cost of a placement method relative to the backbone's forward at the same token budget.

The measure is FLOPs for one batch of images with N tokens each: matrix-multiply and convolution
FLOPs (2 per multiply-add), forward and any backward the method runs, counted by torch's
`FlopCounterMode`. Element-wise work (tokenizer gathers and lerps, norms, softmax, activations,
pooling) is not counted. timm's fused attention is switched off while counting, so that Q·Kᵀ and
A·V are counted on every device. Wall time on a shared CPU is too noisy to state.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@contextlib.contextmanager
def unfused_attention(*modules: torch.nn.Module):
    """Set `fused_attn = False` on every submodule of `modules` that has it (timm attention) for the block."""
    found = [m for mod in modules for m in mod.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    flags = [m.fused_attn for m in found]
    for m in found:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, f in zip(found, flags):
            m.fused_attn = f


def count_flops(fn: Callable[[], object], *modules: torch.nn.Module) -> int:
    """Matmul/conv FLOPs of calling fn() (attention of `modules` unfused while counting)."""
    with unfused_attention(*modules), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def relative_flops(predict: Callable[[], object], model, images: torch.Tensor, positions: torch.Tensor) -> dict:
    """FLOPs of a method's whole inference `predict()` (placement + classification, e.g.
    `lambda: model(images, placer(images))`) against the backbone's forward `model(images, positions)`
    with positions (B, N, 2) at the same budget N. Returns {"flops", "backbone_flops", "extra"}, where
    extra = flops / backbone_flops - 1 is the added cost as a fraction of the backbone's forward."""
    with torch.no_grad():
        base = count_flops(lambda: model(images, positions), model)
    total = count_flops(predict, model)
    return dict(flops=int(total), backbone_flops=int(base), extra=total / base - 1)
