"""FLOPs: one counter for every method, and the analytic count of a timm ViT that it checks.

The measure is FLOPs per image: matrix-multiply and convolution FLOPs (2 per multiply-add), forward
and any backward the method runs, counted by torch's `FlopCounterMode`. Element-wise work
(tokenizer gathers and lerps, norms, softmax, activations, pooling, the weighted sums of merged or
fused tokens, image and position-table resampling) is not counted. timm's fused attention is
switched off while counting, so that Q·Kᵀ and A·V are counted on every device (the counter does not
see the CPU kernel of `scaled_dot_product_attention`). Wall time on a shared CPU is too noisy to state.

`vit_flops` is the same count in closed form, for a ViT whose blocks see given token counts: the
counter checks it in tests, and budgets are matched with it (spot.methods.budget).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
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


def flops_per_image(fn: Callable[[torch.Tensor], object], images: torch.Tensor, *modules: torch.nn.Module) -> float:
    """Counted FLOPs of fn(images) without gradients, divided by the batch size (images (B, C, H, W))."""
    with torch.no_grad():
        return count_flops(lambda: fn(images), *modules) / len(images)


def relative_flops(predict: Callable[[], object], model, images: torch.Tensor, positions: torch.Tensor) -> dict:
    """FLOPs of a method's whole inference `predict()` (placement + classification, e.g.
    `lambda: model(images, placer(images))`) against the backbone's forward `model(images, positions)`
    with positions (B, N, 2) at the same budget N. Returns {"flops", "backbone_flops", "extra"}, where
    extra = flops / backbone_flops - 1 is the added cost as a fraction of the backbone's forward."""
    with torch.no_grad():
        base = count_flops(lambda: model(images, positions), model)
    total = count_flops(predict, model)
    return dict(flops=int(total), backbone_flops=int(base), extra=total / base - 1)


def _linear_flops(module: nn.Module) -> int:
    """FLOPs per token of every nn.Linear in `module` (2 per weight)."""
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def vit_flops(vit: nn.Module, patches: int, blocks: Sequence[tuple[int, int]] | None = None) -> int:
    """Analytic FLOPs per image of a timm VisionTransformer's forward on `patches` patch tokens.

    blocks: per block, (tokens its attention sees, tokens its MLP sees), prefix tokens included;
    None = every block on all tokens (the plain ViT, or SPoT, at N = patches). Per block of width
    A = heads x head_dim: the attention's linears (qkv, proj) per attended token, 2·n²·A for Q·Kᵀ and
    again for A·V, the MLP's linears per MLP token. Plus the patch embedding (2·C·k²·D per token) and
    one pooled vector through the head. A method's own matmuls (matching, class attention) are added
    by the method (spot.methods.merging, spot.methods.pruning).
    """
    n = patches + vit.num_prefix_tokens
    blocks = [(n, n)] * len(vit.blocks) if blocks is None else blocks
    if len(blocks) != len(vit.blocks):
        raise ValueError(f"vit_flops: {len(blocks)} token counts for {len(vit.blocks)} blocks")
    total = 2 * vit.patch_embed.proj.weight.numel() * patches + _linear_flops(vit.head)
    for block, (n_attn, n_mlp) in zip(vit.blocks, blocks):
        width = block.attn.num_heads * block.attn.head_dim
        total += n_attn * _linear_flops(block.attn) + 4 * n_attn ** 2 * width + n_mlp * _linear_flops(block.mlp)
    return total
