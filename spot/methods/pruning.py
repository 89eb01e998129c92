"""Attention top-k pruning with a fused token (EViT; Liang et al., ICLR 2022), off the shelf on a timm ViT.

At chosen blocks, after attention and before the MLP, the patch tokens are ranked by the class
token's attention to them (softmax of its scores, mean over heads): the top ceil(rate·T) stay, in
their order, and the rest are fused into one token, their average weighted by that attention.
Prefix tokens (class, registers) always stay. A fused token of an earlier block is a patch token
like the others at the next. Written from the paper.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from spot.core.cost import vit_flops
from spot.core.model import SPoTViT
from spot.methods.reduction import check_reducible, pooled_head, reduced_tokens, take


def kept_count(rate: float, patches: int) -> int:
    """Patch tokens kept at keep rate `rate` in [0, 1] of `patches`: ceil(rate·patches), float noise rounded off."""
    if not 0 <= rate <= 1:
        raise ValueError(f"EViT: keep rate must be in [0, 1], got {rate}")
    return math.ceil(round(rate * patches, 6))


def check_blocks(keep: Mapping[int, float], depth: int) -> None:
    """ValueError unless every block index of `keep` is in 0..depth-1."""
    if not set(keep) <= set(range(depth)):
        raise ValueError(f"EViT: keep names blocks {sorted(keep)}; the model has blocks 0..{depth - 1}")


def prune_tokens(x: torch.Tensor, size: torch.Tensor, attn: torch.Tensor, keep: int, prefix: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` patch tokens of x (B, P + T, D) with the most attention attn (B, T) and fuse the
    others into one token, their attn-weighted mean (its size the sum of theirs). Returns
    (B, P + keep + 1, D) tokens and sizes (B, P + keep + 1); x and size as they are when keep = T."""
    T = x.shape[1] - prefix
    if keep >= T:
        return x, size
    order = attn.argsort(-1, descending=True)
    top, rest = order[:, :keep].sort(-1).values, order[:, keep:]
    tokens, sizes = x[:, prefix:], size[:, prefix:]
    w = attn.gather(1, rest)[..., None]                                               # (B, T - keep, 1)
    fused = (w * take(tokens, rest)).sum(1, keepdim=True) / w.sum(1, keepdim=True)   # (B, 1, D)
    x = torch.cat([x[:, :prefix], take(tokens, top), fused], dim=1)
    return x, torch.cat([size[:, :prefix], take(sizes, top), take(sizes, rest).sum(1, keepdim=True)], dim=1)


def evit_forward(model: SPoTViT, images: torch.Tensor, keep: Mapping[int, float], positions: torch.Tensor | None = None,
                 pre_logits: bool = False) -> torch.Tensor:
    """(B, num_classes) logits (pre_logits: (B, D) pooled features) of `model` on images (B, C, H, W),
    tokens at positions (B, N, 2) (None = the grid), pruned at the blocks of `keep` {block index: keep rate}."""
    vit = model.vit
    check_reducible(vit, "EViT", needs_class_token=True)
    check_blocks(keep, len(vit.blocks))
    prefix = vit.num_prefix_tokens

    def prune(i, x, size, q, k):
        n = kept_count(keep[i], x.shape[1] - prefix) if i in keep else x.shape[1]
        if n >= x.shape[1] - prefix:                                   # no block to prune, or nothing to drop
            return x, size
        scale = vit.blocks[i].attn.scale
        cls_attn = ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0]   # (B, P + T)
        return prune_tokens(x, size, cls_attn[:, prefix:], n, prefix)
    return pooled_head(vit, *reduced_tokens(model, images, prune, positions), pre_logits=pre_logits)


def evit_flops(model: SPoTViT, keep: Mapping[int, float], patches: int | None = None) -> int:
    """Analytic FLOPs per image of `evit_forward` with `keep` on `patches` tokens (None = the grid): the
    ViT with each block's MLP on the tokens left after pruning, plus the class attention row,
    2·n·heads·head_dim, at a block that prunes."""
    vit, prefix = model.vit, model.vit.num_prefix_tokens
    check_blocks(keep, len(vit.blocks))
    t = model.num_tokens if patches is None else patches
    blocks, extra = [], 0
    for i, block in enumerate(vit.blocks):
        n = kept_count(keep[i], t) if i in keep else t
        left = n + 1 if n < t else t
        blocks.append((prefix + t, prefix + left))
        extra += 2 * (prefix + t) * block.attn.num_heads * block.attn.head_dim if n < t else 0
        t = left
    return vit_flops(vit, model.num_tokens if patches is None else patches, blocks) + extra
