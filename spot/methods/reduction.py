"""The shared block loop of the token-reduction baselines (ToMe, EViT top-k) on a timm ViT.

Each block runs as timm's `Block` does, x + ls1(attn(norm1(x))) then x + ls2(mlp(norm2(x))), with a
reduction step between the two, where both methods act: it sees the block's queries and keys and
returns fewer tokens. Every token carries a size (how many input patches it stands for; prefix
tokens 1), which proportional attention adds to the scores as log(size) and which weights the
average pool. LayerScale, q/k norm, the attention output norm and gate, and prefix tokens (class and
registers: never reduced) are the block's own modules, so they work; other blocks are refused.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from spot.core.model import SPoTViT

# (block index, tokens (B, n, D) after attention, sizes (B, n), queries and keys (B, H, n, hd)) -> (tokens, sizes)
Reduce = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def model_name(vit: nn.Module) -> str:
    """The timm architecture name of `vit` (its class name when it has none)."""
    return (getattr(vit, "pretrained_cfg", None) or {}).get("architecture", type(vit).__name__)


def check_reducible(vit: nn.Module, method: str, needs_class_token: bool = False) -> None:
    """One-line ValueError naming the model when `method` cannot run on it: blocks other than timm's
    pre-norm `Block` with plain `Attention`, pooling other than class token or average, or (EViT) no
    class token."""
    name = model_name(vit)
    odd = {type(b).__name__ for b in vit.blocks if type(b) is not Block or type(b.attn) is not Attention}
    if odd:
        raise ValueError(f"{method} does not run on {name}: its blocks are {', '.join(sorted(odd))}, not timm's Block")
    if vit.attn_pool is not None or vit.global_pool not in ("token", "avg"):
        raise ValueError(f"{method} does not run on {name}: pooling {vit.global_pool!r} (token or avg only)")
    if needs_class_token and vit.cls_token is None:
        raise ValueError(f"{method} does not run on {name}: it ranks tokens by class attention; the model has none")


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx (B, m) of t (B, n, ...) per batch element: (B, m, ...)."""
    return t.gather(1, idx.reshape(*idx.shape, *[1] * (t.ndim - 2)).expand(-1, -1, *t.shape[2:]))


def attend(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm `Attention` on x (B, n, D) with an additive score bias (B, 1, 1, n) or None.

    Returns the output (B, n, D) and the normed queries and keys (B, H, n, hd). Fused
    (scaled_dot_product_attention) when the module is, else unfused, as timm computes it."""
    B, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if bias is None else bias.to(q.dtype)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        out = attn.attn_drop((scores if bias is None else scores + bias).softmax(-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, n, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k


def reduced_features(vit: nn.Module, x: torch.Tensor, reduce: Reduce, prop_attn: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the blocks of `vit` on input tokens x (B, P + N, D) with `reduce` after each attention.

    prop_attn adds log(size) of each key to the attention scores. Returns the normed output tokens
    (B, P + n, D) and their sizes (B, P + n), which sum to P + N."""
    size = torch.ones(x.shape[:2], device=x.device)                           # float32 whatever x is
    for i, block in enumerate(vit.blocks):
        bias = size.log()[:, None, None, :] if prop_attn else None
        out, q, k = attend(block.attn, block.norm1(x), bias)
        x = x + block.drop_path1(block.ls1(out))
        x, size = reduce(i, x, size, q, k)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return vit.norm(x), size


def pooled_head(vit: nn.Module, x: torch.Tensor, size: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's `forward_head` on output tokens x (B, n, D) with sizes (B, n): the average pool weights
    each token by its size (so a merged token counts for the patches it holds); token pooling is timm's."""
    if vit.global_pool != "avg":
        return vit.forward_head(x, pre_logits=pre_logits)
    start = 0 if vit.pool_include_prefix else vit.num_prefix_tokens
    w = size[:, start:, None]
    x = vit.head_drop(vit.fc_norm((x[:, start:] * w).sum(1) / w.sum(1)))
    return x if pre_logits else vit.head(x)


def reduced_tokens(model: SPoTViT, images: torch.Tensor, reduce: Reduce, positions: torch.Tensor | None = None,
                   prop_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`reduced_features` of `model` on images (B, C, H, W), tokens at positions (B, N, 2) (None = the
    full patch grid): the normed output tokens (B, P + n, D) and their sizes (B, P + n)."""
    if positions is None:
        positions = model.grid_positions(images.shape[0], images.device)
    return reduced_features(model.vit, model.tokens(images, positions), reduce, prop_attn)
