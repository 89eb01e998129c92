"""Token-reduction baselines on the same weights (ToMe, EViT top-k, low resolution, random drop) and
the one FLOP counter: each against the plain timm model, hand computations, and the analytic count."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchDropout

from spot.core.cost import count_flops, flops_per_image, unfused_attention, vit_flops
from spot.core.model import SPoTViT
from spot.core.priors import grid_centers, sample_positions
from spot.methods.budget import ladder, match_flops
from spot.methods.merging import bipartite_merge, merge_schedule, tome_flops, tome_forward, tome_tokens
from spot.methods.pruning import evit_flops, evit_forward, prune_tokens
from spot.methods.reduction import attend
from spot.methods.resolution import grid_for, low_res_flops, low_res_forward

ARCH = dict(img_size=28, patch_size=4, embed_dim=48, depth=3, num_heads=3)
CASES = {                                                    # name -> timm kwargs on top of ARCH
    "plain": {},
    "layerscale_qknorm": dict(init_values=0.5, qk_norm=True),
    "registers": dict(reg_tokens=2),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=1),
    "avg_pool": dict(class_token=False, global_pool="avg", fc_norm=True),
}
DEFAULT = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)   # params.yaml's spot


def make(case: str = "plain", **kw) -> SPoTViT:
    """SPoTViT around a small timm ViT with randomised parameters (no entry trivially 0 or 1)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **ARCH, **CASES[case], **kw).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return SPoTViT(vit)


def on_meta(name: str, **kw) -> SPoTViT:
    """SPoTViT around a timm model built on the meta device: shapes only, for analytic counts."""
    with torch.device("meta"):
        return SPoTViT(timm.create_model(name, pretrained=False, **kw))


def images(batch: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return ((a - b).abs().max() / b.abs().max()).item() <= tol


# ---- the methods at no reduction equal the model ----------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_tome_at_r0_equals_the_timm_model(case, fused):
    model, x = make(case), images()
    with torch.no_grad(), (unfused_attention(model) if not fused else torch.enable_grad()):
        assert close(tome_forward(model, x, 0), model.vit(x))
        assert close(tome_forward(model, x, [0, 0, 0], pre_logits=True), model.vit.forward_head(
            model.vit.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("case", ["plain", "layerscale_qknorm", "registers"])
def test_evit_at_keep_rate_1_equals_the_timm_model(case):
    model, x = make(case), images()
    with torch.no_grad():
        assert close(evit_forward(model, x, {0: 1.0, 1: 1.0, 2: 1.0}), model.vit(x))


@pytest.mark.parametrize("case", ["plain", "registers", "no_embed_class"])
def test_low_res_at_full_resolution_equals_the_timm_model(case):
    model, x = make(case), images()
    with torch.no_grad():
        assert torch.allclose(low_res_forward(model, x, model.num_tokens), model.vit(x), atol=1e-6)


# ---- ToMe ----------------------------------------------------------------------------------------

def test_merge_schedule_clips_to_half_of_each_blocks_patch_tokens():
    assert merge_schedule(30, 4, 49) == [24, 12, 6, 3]
    assert merge_schedule([2, 0, 40, 1], 4, 49) == [2, 0, 23, 1]
    with pytest.raises(ValueError, match="per-block"):
        merge_schedule([1, 2], 4, 49)


def test_merged_tokens_are_size_weighted_means_of_their_best_match():
    # patch tokens t0..t3 (after one prefix token): A = t0, t2; B = t1, t3. t0's key is nearest t1's.
    keys = torch.tensor([[[5., 5.], [1., 0.], [1., .1], [0., 1.], [-1., .05]]])
    x = torch.tensor([[[9., 9.], [2., 0.], [0., 4.], [1., 1.], [7., 7.]]])
    size = torch.tensor([[1., 3., 1., 2., 1.]])
    out, s = bipartite_merge(x, size, keys, r=1, prefix=1)
    merged = (3 * x[0, 1] + 1 * x[0, 2]) / 4                           # not the plain mean (1, 2)
    assert torch.equal(out[0], torch.stack([x[0, 0], x[0, 3], merged, x[0, 4]]))
    assert torch.equal(s[0], torch.tensor([1., 2., 4., 1.]))


@pytest.mark.parametrize("case", ["plain", "registers"])
def test_tome_sizes_sum_to_the_token_count_after_each_block(case):
    model, x = make(case), images()
    prefix, full = model.vit.num_prefix_tokens, merge_schedule(99, 3, model.num_tokens)
    for depth in range(1, 4):                                          # merge in blocks 0..depth-1 only
        r = full[:depth] + [0] * (3 - depth)
        with torch.no_grad():
            tokens, size = tome_tokens(model, x, r)
        assert tokens.shape[1] == size.shape[1] == prefix + model.num_tokens - sum(r)
        assert torch.equal(size.sum(1), torch.full((2,), float(prefix + model.num_tokens)))
        assert torch.equal(size[:, :prefix], torch.ones(2, prefix))   # prefix tokens never merge


def test_proportional_attention_reads_a_token_of_size_s_as_s_copies():
    attn = make("plain").vit.blocks[0].attn
    x = torch.randn(1, 5, 48)
    dup = torch.cat([x, x[:, 2:3], x[:, 2:3]], 1)                      # token 2 three times
    size = torch.tensor([[1., 1., 3., 1., 1.]])
    with torch.no_grad(), unfused_attention(attn):
        out, _, _ = attend(attn, x, size.log()[:, None, None])
        ref, _, _ = attend(attn, dup)
        plain, _, _ = attend(attn, x)
    assert close(out, ref[:, :5]) and not close(plain, ref[:, :5], 1e-3)


def test_tome_proportional_attention_is_a_switch():
    model, x = make(), images()
    with torch.no_grad():
        assert torch.equal(tome_forward(model, x, 0, prop_attn=True), tome_forward(model, x, 0, prop_attn=False))
        assert not close(tome_forward(model, x, 8, prop_attn=True), tome_forward(model, x, 8, prop_attn=False), 1e-4)


def test_avg_pool_weights_merged_tokens_by_size():
    model, x = make("avg_pool"), images()
    vit = model.vit
    with torch.no_grad():
        tokens, size = tome_tokens(model, x, 10)
        w = size[:, :, None]
        ref = vit.head(vit.fc_norm((tokens * w).sum(1) / w.sum(1)))
        assert close(tome_forward(model, x, 10), ref)


@pytest.mark.parametrize("method, run", [("ToMe", lambda m, x: tome_forward(m, x, 2)),
                                         ("EViT", lambda m, x: evit_forward(m, x, {0: 0.5}))])
def test_unsupported_models_are_refused_in_one_line_naming_the_model(method, run):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="map", **ARCH).eval()
    with pytest.raises(ValueError, match=f"^{method} does not run on vit_tiny_patch16_224: pooling 'map'[^\n]*$"):
        run(SPoTViT(vit), images())
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, block_fn=timm.models.vision_transformer.ResPostBlock,
                            **ARCH).eval()
    with pytest.raises(ValueError, match=f"^{method} does not run on vit_small_patch16_224: its blocks are ResPostBlock"):
        run(SPoTViT(vit), images())


def test_evit_refuses_a_model_without_class_token():
    with pytest.raises(ValueError, match="^EViT does not run on vit_tiny_patch16_224: .*class attention"):
        evit_forward(make("avg_pool"), images(), {0: 0.5})


# ---- EViT ----------------------------------------------------------------------------------------

def test_fused_token_is_the_attention_weighted_mean_of_the_dropped_tokens():
    x = torch.randn(2, 1 + 6, 4)
    size = torch.ones(2, 7)
    attn = torch.tensor([[.1, .4, .05, .2, .15, .1], [.3, .1, .1, .2, .25, .05]])
    out, s = prune_tokens(x, size, attn, keep=2, prefix=1)
    for b, (top, rest) in enumerate([([1, 3], [0, 2, 4, 5]), ([0, 4], [1, 2, 3, 5])]):
        w = attn[b, rest, None]
        fused = (w * x[b, 1:][rest]).sum(0) / w.sum()
        assert torch.allclose(out[b], torch.cat([x[b, :1], x[b, 1:][top], fused[None]]))
        assert torch.equal(s[b], torch.tensor([1., 1., 1., 4.]))


def test_evit_keeps_the_tokens_the_class_token_attends_to_most():
    """Block 0 pruned at keep 10/49, computed from timm's own modules: attention probabilities read
    from the unfused timm attention, the rest of the blocks as timm runs them."""
    model, x = make(), images()
    vit, kept = model.vit, 10
    probs = []
    block = vit.blocks[0]
    hook = block.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o))
    with torch.no_grad(), unfused_attention(vit):
        t = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))
        t = t + block.ls1(block.attn(block.norm1(t)))
        hook.remove()
        t, _ = prune_tokens(t, torch.ones(t.shape[:2]), probs[0].mean(1)[:, 0, 1:], kept, 1)
        t = t + block.ls2(block.mlp(block.norm2(t)))
        ref = vit.forward_head(vit.norm(vit.blocks[1:](t)))
        assert t.shape[1] == 1 + kept + 1
        assert close(evit_forward(model, x, {0: kept / 49}), ref)


# ---- low resolution and random drop --------------------------------------------------------------

def test_low_res_equals_timm_at_the_resized_image_with_its_own_pos_embed_resampling():
    model, x = make(), images()
    dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, dynamic_img_size=True, **ARCH).eval()
    dyn.load_state_dict(model.vit.state_dict())
    small = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert grid_for(model, 16) == (4, 4) and grid_for(model, 17) == (4, 4) and grid_for(model, 2) == (1, 2)
    with torch.no_grad():
        assert close(low_res_forward(model, x, 16), dyn(small))


def test_grid_prior_keeps_exactly_n_cells_where_patch_dropout_keeps_fewer():
    """Random drop of exactly N grid tokens is the 'grid' prior in SPoTViT (patch dropout at inference):
    25 of the 196 cells of ViT-B/16 stay 25, where timm's PatchDropout keeps int(196·(1 - p)) = 24."""
    pos = sample_positions("grid", 8, 25, 224, 224, k=16, generator=torch.Generator().manual_seed(0))
    cells = grid_centers(224, 224, 16)
    hits = (pos[:, :, None] == cells[None, None]).all(-1)                # (8, 25, 196)
    assert torch.equal(hits.sum(-1), torch.ones(8, 25, dtype=torch.long))            # every token on a cell
    assert all(len(set(h.nonzero()[:, 1].tolist())) == 25 for h in hits)            # 25 distinct cells
    assert PatchDropout(prob=1 - 25 / 196, num_prefix_tokens=0).train()(torch.zeros(1, 196, 1)).shape[1] == 24


def test_random_drop_is_the_plain_vit_on_the_kept_patches():
    model, x = make(), images()
    vit = model.vit
    pos = sample_positions("grid", 2, 20, 28, 28, k=4, generator=torch.Generator().manual_seed(3))
    idx = ((pos * 28 - 2) / 4).round().long()
    idx = idx[..., 0] * 7 + idx[..., 1]                                  # (2, 20) cells
    with torch.no_grad():
        t = vit.patch_embed(x) + vit.pos_embed[:, 1:]
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)
        t = torch.cat([cls, t.gather(1, idx[..., None].expand(-1, -1, 48))], 1)
        assert close(model(x, pos), vit.forward_head(vit.norm(vit.blocks(t))))


# ---- the FLOP counter and its analytic count ------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "registers", "avg_pool", "layerscale_qknorm"])
@pytest.mark.parametrize("n", [49, 16, 3])
def test_counted_flops_of_the_plain_vit_at_n_tokens_equal_the_analytic_count(case, n):
    model = make(case)
    pos = sample_positions("grid", 2, n, 28, 28, k=4, generator=torch.Generator().manual_seed(0))
    assert flops_per_image(lambda im: model(im, pos), images(), model) == vit_flops(model.vit, n)


@pytest.mark.parametrize("case", ["plain", "registers"])
def test_counted_flops_of_each_method_equal_its_analytic_count(case):
    model, x = make(case), images()
    for r in (0, 5, [24, 0, 7], 99):
        assert flops_per_image(lambda im: tome_forward(model, im, r), x, model) == tome_flops(model, r)
    for keep in ({0: 1.0}, {0: 0.2}, {1: 0.5, 2: 0.5}, {0: 0.0}, {0: 48 / 49}):
        assert flops_per_image(lambda im: evit_forward(model, im, keep), x, model) == evit_flops(model, keep)
    for n in (49, 16, 5):
        assert flops_per_image(lambda im: low_res_forward(model, im, n), x, model) == low_res_flops(model, n)


def test_tome_counts_attention_at_the_token_count_before_merging_and_the_matching():
    model = make()                                                       # 1 + 49 tokens, head_dim 16
    blocks = [(50, 46), (46, 46), (46, 46)]                             # block 0 attends to 50, its MLP sees 46
    assert tome_flops(model, [4, 0, 0]) == vit_flops(model.vit, 49, blocks) + 2 * 25 * 24 * 16


def test_budget_sums_of_vit_b16():
    """The issue's budgets: ViT-B/16 17.6 GMACs at 196 tokens, 8.8 at about 100, 2.2 at 25. At 25
    tokens' compute, pruning keeps under a tenth of the tokens after block 0; ToMe gets there only by
    merging about half of the tokens in each of the first blocks (constant r = 16 leaves 8.8 GMACs)."""
    model = on_meta("vit_base_patch16_224")
    gmacs = {n: vit_flops(model.vit, n) / 2e9 for n in (196, 100, 25)}
    assert gmacs[196] == pytest.approx(17.56, abs=0.01) and gmacs[100] == pytest.approx(8.83, abs=0.01)
    assert gmacs[25] == pytest.approx(2.24, abs=0.01)
    assert tome_flops(model, 16) / 2e9 == pytest.approx(8.77, abs=0.01)
    evit, tome = (match_flops(model, m, vit_flops(model.vit, 25)) for m in ("evit", "tome"))
    assert evit.reachable and evit.setting < 0.1
    assert tome.reachable and tome.setting[:3] == [94, 51, 25] and tome.cheapest / 2e9 == pytest.approx(2.18, abs=0.01)


def test_budget_sums_of_the_default_backbone():
    """One block at 49 tokens costs more than the whole model at 4: neither ToMe nor pruning reaches 4
    tokens' compute, only pruning after the first block reaches 16 tokens', lower resolution every budget."""
    model = on_meta("vit_tiny_patch16_224", **DEFAULT)
    one_block = vit_flops(model.vit, 49, [(50, 50)] + [(0, 0)] * 3) - vit_flops(model.vit, 49, [(0, 0)] * 4)
    assert one_block > vit_flops(model.vit, 4)
    reach = {(m, n): match_flops(model, m, vit_flops(model.vit, n)).reachable
             for m in ("tome", "evit", "lowres") for n in (4, 16, 49)}
    assert reach == {("tome", 4): False, ("tome", 16): False, ("tome", 49): True,
                     ("evit", 4): False, ("evit", 16): True, ("evit", 49): True,
                     ("lowres", 4): True, ("lowres", 16): True, ("lowres", 49): True}
    assert not match_flops(model, "evit", vit_flops(model.vit, 16), block=1).reachable


def test_match_flops_lands_within_2_percent_on_the_nearest_rung_and_the_counter_agrees():
    model, x = make(), images()
    for method in ("tome", "evit", "lowres"):
        target = vit_flops(model.vit, 30)
        m = match_flops(model, method, target)
        assert m.reachable and abs(m.error) <= 0.02
        assert all(abs(f - target) >= abs(m.flops - target) for _, f in ladder(model, method))
        run = {"tome": lambda im: tome_forward(model, im, m.setting),
               "evit": lambda im: evit_forward(model, im, {0: m.setting}),
               "lowres": lambda im: low_res_forward(model, im, m.setting)}[method]
        assert flops_per_image(run, x, model) == m.flops
    far = match_flops(model, "tome", vit_flops(model.vit, 2))
    assert not far.reachable and far.flops == far.cheapest > far.target
    assert math.isclose(far.error, far.flops / far.target - 1)


def test_ladders_run_from_the_full_cost_down():
    model = make()
    for method in ("tome", "evit", "lowres"):
        flops = [f for _, f in ladder(model, method)]
        assert flops[0] == vit_flops(model.vit, 49) and flops == sorted(flops, reverse=True)
    with pytest.raises(ValueError, match="unknown reduction method"):
        ladder(model, "dynamicvit")


def test_count_flops_sees_no_sdpa_on_cpu_unless_unfused():
    """Why the counter unfuses attention: FlopCounterMode counts no FLOPs for CPU fused attention."""
    q = torch.randn(1, 3, 10, 8)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 0
