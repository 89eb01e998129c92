"""Token merging (ToMe; Bolya et al., ICLR 2023), off the shelf on a timm ViT's own weights.

In every block, after attention and before the MLP, bipartite soft matching merges r tokens: the
patch tokens alternate into sets A and B, each A token's most similar B token by cosine similarity
of the attention keys (mean over heads) is its match, and the r A tokens with the most similar
matches are merged into them as size-weighted averages. Prefix tokens (class, registers) are never
merged. Proportional attention adds log(size) to the scores (turn it off for MAE models).
Written from the paper; the reference code is not used.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from spot.core.cost import vit_flops
from spot.core.model import SPoTViT
from spot.methods.reduction import check_reducible, pooled_head, reduced_tokens, take


def merge_schedule(r: int | Sequence[int], depth: int, patches: int) -> list[int]:
    """Per-block merge counts from a constant r or a per-block list, each clipped so that at most half
    of the block's patch tokens (floor) merge. patches: patch tokens entering the first block."""
    rs = [r] * depth if isinstance(r, int) else list(r)
    if len(rs) != depth or min(rs, default=0) < 0:
        raise ValueError(f"ToMe: r must be an int >= 0 or {depth} per-block counts >= 0, got {r}")
    out = []
    for ri in rs:
        out.append(min(ri, patches // 2))
        patches -= out[-1]
    return out


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, prefix: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r of the patch tokens by bipartite soft matching.

    x (B, P + T, D) tokens, size (B, P + T) patches per token, keys (B, P + T, d) the matching metric,
    prefix P tokens kept as they are; r <= T // 2. Returns (B, P + T - r, D) tokens and their sizes:
    prefix, the unmerged A tokens in their order, then the B tokens, each the size-weighted mean of
    itself and the A tokens merged into it.
    """
    if r == 0:
        return x, size
    metric = keys[:, prefix:] / keys[:, prefix:].norm(dim=-1, keepdim=True)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)             # (B, |A|, |B|) cosine
    best, match = similarity.max(-1)                                           # (B, |A|)
    order = best.argsort(-1, descending=True)
    merged, kept = order[:, :r], order[:, r:].sort(-1).values
    tokens, sizes = x[:, prefix:] * size[:, prefix:, None], size[:, prefix:, None]   # size-weighted sums
    a_x, a_s, b_x, b_s = tokens[:, ::2], sizes[:, ::2], tokens[:, 1::2], sizes[:, 1::2]
    dst = match.gather(1, merged)                                              # (B, r) index into B
    b_x = b_x.scatter_add(1, dst[..., None].expand(-1, -1, x.shape[-1]), take(a_x, merged))
    b_s = b_s.scatter_add(1, dst[..., None], take(a_s, merged))
    a_x, a_s = take(a_x, kept), take(a_s, kept)
    x = torch.cat([x[:, :prefix], a_x / a_s, b_x / b_s], dim=1)
    return x, torch.cat([size[:, :prefix], a_s[..., 0], b_s[..., 0]], dim=1)


def tome_tokens(model: SPoTViT, images: torch.Tensor, r: int | Sequence[int], positions: torch.Tensor | None = None,
                prop_attn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed output tokens (B, P + n, D) and sizes (B, P + n) of `model` with ToMe at merge schedule r
    (an int for every block, or a per-block list; clipped by `merge_schedule`) on images (B, C, H, W),
    tokens at positions (B, N, 2) (None = the grid). n = N - sum of the clipped schedule."""
    vit = model.vit
    check_reducible(vit, "ToMe")
    patches = model.num_tokens if positions is None else positions.shape[1]
    schedule = merge_schedule(r, len(vit.blocks), patches)

    def merge(i, x, size, q, k):
        return bipartite_merge(x, size, k.mean(1), schedule[i], vit.num_prefix_tokens)
    return reduced_tokens(model, images, merge, positions, prop_attn)


def tome_forward(model: SPoTViT, images: torch.Tensor, r: int | Sequence[int], positions: torch.Tensor | None = None,
                 prop_attn: bool = True, pre_logits: bool = False) -> torch.Tensor:
    """(B, num_classes) logits (pre_logits: (B, D) pooled features) of `model` with ToMe, as `tome_tokens`."""
    return pooled_head(model.vit, *tome_tokens(model, images, r, positions, prop_attn), pre_logits=pre_logits)


def tome_flops(model: SPoTViT, r: int | Sequence[int], patches: int | None = None) -> int:
    """Analytic FLOPs per image of `tome_forward` at schedule r on `patches` tokens (None = the grid):
    the ViT with each block's attention on its tokens before merging and its MLP after, plus the
    matching matrices, 2·|A|·|B|·head_dim in a block that merges."""
    vit, prefix = model.vit, model.vit.num_prefix_tokens
    t = model.num_tokens if patches is None else patches
    blocks, matching = [], 0
    for block, ri in zip(vit.blocks, merge_schedule(r, len(vit.blocks), t)):
        blocks.append((prefix + t, prefix + t - ri))
        matching += 2 * ((t + 1) // 2) * (t // 2) * block.attn.head_dim if ri else 0
        t -= ri
    return vit_flops(vit, model.num_tokens if patches is None else patches, blocks) + matching
