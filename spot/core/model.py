"""SPoT ViT: any timm VisionTransformer reading its tokens at continuous positions."""
from __future__ import annotations

import contextlib

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from timm.models import checkpoint_seq

from spot.core.devices import autocast_dtype, to_device
from spot.core.priors import grid_centers
from spot.core.tokenizer import extract_windows


class SPoTViT(nn.Module):
    """Wrap a timm `VisionTransformer` so that tokens are k x k windows at subpixel positions.

    The patch embedding (`patch_embed.proj`, a stride-k conv) is applied as the linear map it is to
    each window; the learned `pos_embed` table is read by bilinear interpolation at each position
    (cell centres map exactly to table entries); prefix tokens (class, registers) keep their own
    entries. On the full patch grid the output equals the wrapped model's. No weights are copied.
    """

    def __init__(self, vit: nn.Module, k: int | None = None):
        super().__init__()
        pe = getattr(vit, "patch_embed", None)
        if getattr(pe, "proj", None) is None or not isinstance(pe.proj, nn.Conv2d):
            raise ValueError(f"SPoTViT needs a timm VisionTransformer with a conv patch embedding, got {type(vit).__name__}")
        self.vit = vit
        self.patch_size = tuple(pe.patch_size)
        self.k = int(k or self.patch_size[0])
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"SPoTViT needs square patches, got patch_size={self.patch_size}")
        self.img_size = tuple(pe.img_size)
        self.grid_size = (self.img_size[0] // self.k, self.img_size[1] // self.k)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.num_classes = vit.num_classes
        cfg = timm.data.resolve_data_config(model=vit)       # from the pretrained cfg: may name another size
        self.data_config = dict(cfg, input_size=(cfg["input_size"][0], *self.img_size))

    def embed_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(D, C*k*k) linear map of the patch embedding (resampled if k != patch size), and its bias."""
        w = self.vit.patch_embed.proj.weight
        if self.k != self.patch_size[0]:
            w = resample_patch_embed(w, [self.k, self.k])
        return w.flatten(1), self.vit.patch_embed.proj.bias

    def grid_positions(self, batch: int, device=None) -> torch.Tensor:
        """(batch, Gh*Gw, 2) centres of the patch grid, row-major (the plain ViT's tokens)."""
        pos = grid_centers(self.img_size[0], self.img_size[1], self.k)
        return to_device(pos, device).expand(batch, -1, -1)

    def pos_encoding(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, N, D) position encoding: the pos_embed table sampled bilinearly at positions (B, N, 2).

        The table is viewed as a (D, Gh, Gw) image whose entries sit at the patch-cell centres
        (align_corners=False), so a cell centre reads its own entry; beyond the outer centres the
        edge entries extend (border padding). Sampled in float32 (float64 for a float64 model) whatever
        the autocast state.
        """
        vit = self.vit
        table = vit.pos_embed[:, 0 if vit.no_embed_class else vit.num_prefix_tokens:]
        gh, gw = vit.patch_embed.grid_size
        dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
        table = table.reshape(1, gh, gw, -1).permute(0, 3, 1, 2).to(dtype)    # (1, D, gh, gw)
        with torch.autocast(positions.device.type, enabled=False):
            grid = (2 * positions.to(dtype) - 1).flip(-1)[:, None]            # (B, 1, N, 2) as (x, y)
            out = F.grid_sample(table.expand(positions.shape[0], -1, -1, -1), grid, mode="bilinear",
                                padding_mode="border", align_corners=False)   # (B, D, 1, N)
        return out[:, :, 0].transpose(1, 2)

    def tokens(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, P + N, D) input sequence for the transformer blocks: prefix tokens then N window tokens."""
        vit = self.vit
        w, b = self.embed_weight()
        x = F.linear(extract_windows(images, positions, self.k).flatten(2), w, b)   # (B, N, D)
        x = vit.patch_embed.norm(x)
        if vit.pos_embed is not None:
            x = x + self.pos_encoding(positions).to(x.dtype)
        return self.with_prefix(x)

    def with_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P + N, D) input sequence from N position-encoded patch tokens x (B, N, D): the prefix
        tokens (class, registers; with their pos_embed entries) first, then timm's pos/patch dropout
        and pre-norm."""
        vit = self.vit
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if vit.pos_embed is not None and not vit.no_embed_class:
                prefix = prefix + vit.pos_embed[:, :vit.num_prefix_tokens]
            x = torch.cat([prefix, x], dim=1)
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))

    def forward_features(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P + N, D) normalised output tokens. positions (B, N, 2) (y, x) in [0, 1]; None = full grid."""
        if positions is None:
            positions = self.grid_positions(images.shape[0], images.device)
        x = self.tokens(images, positions)
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.vit.blocks, x)
        else:
            x = self.vit.blocks(x)
        return self.vit.norm(x)

    def features(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) pooled feature (class token or global pool, per the timm model) used for kNN."""
        return self.vit.forward_head(self.forward_features(images, positions), pre_logits=True)

    def forward(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_classes) logits for images (B, C, H, W) with tokens at positions (B, N, 2)."""
        return self.vit.forward_head(self.forward_features(images, positions))


def compile_features(model: SPoTViT, backend: str | None) -> SPoTViT:
    """`model` with `forward_features` run through `torch.compile(backend=backend)` ('inductor' for
    speed, 'cudagraphs', or 'eager' to check the graph capture); None leaves it eager."""
    if backend is not None:
        model.forward_features = torch.compile(model.forward_features, backend=backend)
    return model


@contextlib.contextmanager
def frozen(model: nn.Module, device=None):
    """Eval mode and requires_grad=False on every parameter for the block; restores both after.

    With a `device` that `autocast_for` computes in bf16 (CUDA), the nn.Linear weights and biases
    are also held in that dtype for the block: autocast casts a weight that takes no gradient again
    at every forward (ViT-B: 98 of the 272 kernel launches of a forward), so this is the same cast,
    once, and the same numbers. Every forward in the block must then run under `autocast_for(device)`.
    """
    dtype = None if device is None else autocast_dtype(device)
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.eval().requires_grad_(False)
    held = [] if dtype is None else [(p, p.data) for m in model.modules() if isinstance(m, nn.Linear)
                                     for p in m.parameters(recurse=False)]
    for p, data in held:
        p.data = data.to(dtype)
    try:
        yield model
    finally:
        for p, data in held:
            p.data = data
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(training)
