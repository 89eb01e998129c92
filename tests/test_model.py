"""SPoTViT: equal to the wrapped timm ViT on the full grid; exact on grid subsets; trainable."""
import pytest
import timm
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import spot.core.devices
from spot.core.devices import autocast_for
from spot.core.model import SPoTViT, frozen
from spot.core.priors import grid_centers

SMALL = dict(embed_dim=48, depth=2, num_heads=3)
CASES = {                                                         # name -> (timm name, kwargs)
    "vit_tiny_patch16_224": ("vit_tiny_patch16_224", {}),
    "global_pool": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, fc_norm=True, **SMALL)),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4, **SMALL)),
    "no_embed_class": ("vit_tiny_patch16_224", dict(no_embed_class=True, reg_tokens=2, **SMALL)),
    "32px_patch4": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, **SMALL)),
    "28px_patch4": ("vit_tiny_patch16_224", dict(img_size=28, patch_size=4, **SMALL)),
    "non_square": ("vit_tiny_patch16_224", dict(img_size=(32, 48), patch_size=8, **SMALL)),
}


def make_vit(case: str, num_classes: int = 10) -> nn.Module:
    """A timm ViT (pretrained=False) with every parameter randomised, so that no entry is trivially 0 or 1."""
    torch.manual_seed(0)
    name, kw = CASES[case]
    vit = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_full_grid_equals_the_timm_model(case):
    vit = make_vit(case)
    model = SPoTViT(vit)
    images = torch.randn(2, 3, *model.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, ref = model(images), vit(images)
        feats = model.features(images)
        ref_feats = vit.forward_head(vit.forward_features(images), pre_logits=True)
        explicit = model(images, model.grid_positions(2, images.device))
    assert logits.shape == (2, 10) and feats.shape == (2, vit.embed_dim)
    assert rel_err(logits, ref) <= 1e-5
    assert rel_err(feats, ref_feats) <= 1e-5
    assert torch.equal(explicit, logits)


def test_attributes_and_no_copied_weights():
    vit = make_vit("non_square")
    model = SPoTViT(vit)
    assert model.vit is vit and model.k == 8 and model.img_size == (32, 48) and model.grid_size == (4, 6)
    assert model.num_tokens == 24 and model.num_classes == 10
    timm_cfg = timm.data.resolve_data_config(model=vit)      # says 224 px: the pretrained cfg's size
    assert model.data_config == dict(timm_cfg, input_size=(3, 32, 48))   # the images this model reads
    assert {n for n, _ in model.named_parameters()} == {f"vit.{n}" for n, _ in vit.named_parameters()}
    assert torch.equal(model.grid_positions(3, "cpu"), grid_centers(32, 48, 8).expand(3, -1, -1))


@pytest.mark.parametrize("case", ["vit_tiny_patch16_224", "no_embed_class"])
def test_a_subset_of_grid_cells_is_the_vit_with_those_patches_kept(case):
    """Tokens on random grid cells = timm's own patch tokens (with their pos_embed rows), the rest dropped."""
    vit = make_vit(case)
    model = SPoTViT(vit)
    images = torch.randn(2, 3, *model.img_size, generator=torch.Generator().manual_seed(2))
    keep = torch.stack([torch.randperm(model.num_tokens, generator=torch.Generator().manual_seed(i))[:7]
                        for i in range(2)])                                     # (B, 7) cell indices
    positions = grid_centers(*model.img_size, model.k)[keep]
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))                             # (B, P + G, D)
        p = vit.num_prefix_tokens
        x = torch.cat([x[:, :p], torch.gather(x[:, p:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))], 1)
        ref = vit.forward_head(vit.norm(vit.blocks(x)))
        got = model(images, positions)
    assert rel_err(got, ref) <= 1e-5


def test_position_encoding_interpolates_between_cell_centres():
    vit = make_vit("32px_patch4")
    model = SPoTViT(vit)
    table = vit.pos_embed[0, 1:].reshape(8, 8, -1)
    between = torch.tensor([[[(4 * 2 + 2) / 32, (4 * 3 + 4) / 32],             # halfway between cells (2,3), (2,4)
                             [0.0, 1.0]]])                                      # the top-right corner: edge entry
    enc = model.pos_encoding(between)[0].detach()
    torch.testing.assert_close(enc[0], (table[2, 3] + table[2, 4]).detach() / 2)
    torch.testing.assert_close(enc[1], table[0, 7].detach())


def test_gradients_reach_the_timm_parameters_and_the_positions():
    vit = make_vit("28px_patch4").train()
    model = SPoTViT(vit)
    images = torch.randn(4, 3, 28, 28)
    positions = torch.rand(4, 9, 2, requires_grad=True)
    nn.functional.cross_entropy(model(images, positions), torch.arange(4)).backward()
    assert positions.grad is not None and positions.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fewer_tokens_and_other_window_size():
    vit = make_vit("28px_patch4")
    images = torch.randn(2, 3, 28, 28)
    model = SPoTViT(vit, k=6)                                                   # FlexiViT-resampled embedding
    assert model.k == 6 and model.grid_size == (4, 4)
    assert model(images, torch.rand(2, 5, 2)).shape == (2, 10)
    assert SPoTViT(vit)(images, torch.rand(2, 1, 2)).shape == (2, 10)


def test_rejects_a_model_that_is_not_a_vit():
    with pytest.raises(ValueError, match="SPoTViT needs a timm VisionTransformer"):
        SPoTViT(nn.Linear(3, 3))


class Casts(TorchDispatchMode):
    """Counts the dtype casts (aten._to_copy: a kernel each on a GPU) run in the block, in `.n`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n = getattr(self, "n", 0) + (func.overloadpacket is torch.ops.aten._to_copy)
        return func(*args, **(kwargs or {}))


def test_frozen_casts_the_linear_weights_once_with_the_same_numbers(monkeypatch):
    """Autocast casts a weight that takes no gradient at every forward; `frozen(model, device)` holds
    the nn.Linear weights in the autocast dtype instead: the same logits and position gradients, one
    cast fewer per Linear weight and bias, the float32 weights back after. CUDA's bf16 autocast is
    emulated on the CPU (the same casting rules)."""
    monkeypatch.setitem(spot.core.devices.AUTOCAST, "cpu", "bfloat16")
    torch.manual_seed(0)
    model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                      num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, p = torch.randn(2, 3, 32, 32), torch.rand(2, 5, 2)

    def step(*device):
        pos = p.clone().requires_grad_(True)
        with frozen(model, *device), Casts() as casts, autocast_for("cpu"):
            logits = model(x, pos)
            logits.float().sum().backward()
        return logits, pos.grad, casts.n

    logits, grad, casts = step()
    held_logits, held_grad, held_casts = step("cpu")
    assert logits.dtype == torch.bfloat16 and torch.equal(held_logits, logits) and torch.equal(held_grad, grad)
    linear = sum(1 for m in model.modules() if isinstance(m, nn.Linear) for _ in m.parameters(recurse=False))
    assert casts - held_casts == linear
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(q.requires_grad for q in model.parameters())
