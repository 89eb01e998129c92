import copy
import inspect

import pytest
import timm
import torch
import torch.nn.functional as F

from spot.core.cost import relative_flops
from spot.core.model import SPoTViT, frozen
from spot.core.priors import lattice, sample_positions
from spot.data.sources import fashion_mnist_arrays
from spot.methods.entropy_search import entropy_search, prediction_entropy
from spot.methods.learned_prior import batches_forever, fit_global_prior, initial_positions
from spot.methods.placer import Placer, chamfer_distance, train_placer
from spot.training.placer_files import load_placer, save_placer
from tests.conftest import FASHION_MNIST


@pytest.fixture(scope="module")
def trained():
    """A tiny SPoT ViT trained for a few seconds on Fashion-MNIST with random sparse placements:
    (model, train batches of 100 (the images it was trained on), held-out images, held-out labels)."""
    images, labels = fashion_mnist_arrays(FASHION_MNIST, "train")
    x = (torch.from_numpy(images[:3000]).float() / 255 - 0.286) / 0.353
    x, y = x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels[:3000]).long()
    torch.manual_seed(0)
    model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4,
                                      embed_dim=32, depth=1, num_heads=2, num_classes=10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 2500, 100)]
    for _ in range(3):
        for xb, yb in batches:
            pos = sample_positions("uniform", len(yb), 8, 28, 28, k=4, generator=gen)
            loss = F.cross_entropy(model(xb, pos), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), batches, x[2500:], y[2500:]


def _scores(model, x, y, pos):
    """(mean cross-entropy, top-1) of model on x with positions (B, N, 2) or (N, 2) for all."""
    with torch.no_grad():
        logits = model(x, pos.expand(len(x), -1, -1) if pos.ndim == 2 else pos)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


# ---- learned global prior -------------------------------------------------------------------------

def test_learned_prior_beats_its_start_on_held_out_images(trained):
    model, batches, x, y = trained
    init = initial_positions("isotropic", 4, model.img_size, model.k)
    losses = []
    pos = fit_global_prior(model, batches, n=4, steps=100, lr=0.02, init="isotropic",
                           log=lambda step, m: losses.append(m["loss"]))
    assert pos.shape == (4, 2) and pos.dtype == torch.float32
    assert (pos >= 0).all() and (pos <= 1).all()
    assert len(losses) == 100
    assert all(p.grad is None for p in model.parameters())
    loss0, acc0 = _scores(model, x, y, init)
    loss1, acc1 = _scores(model, x, y, pos)
    print(f"\nlearned prior, 4 tokens, held-out: loss {loss0:.3f} -> {loss1:.3f}, top-1 {acc0:.3f} -> {acc1:.3f}")
    assert loss1 < loss0 - 0.04
    assert acc1 > acc0 + 0.02


def test_learned_prior_is_deterministic_for_a_seed(trained):
    model, batches, _, _ = trained
    a = fit_global_prior(model, batches[:3], n=5, steps=6, init="uniform", seed=3)
    b = fit_global_prior(model, batches[:3], n=5, steps=6, init="uniform", seed=3)
    c = fit_global_prior(model, batches[:3], n=5, steps=6, init="uniform", seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    start = torch.full((5, 2), 0.5)
    d = fit_global_prior(model, iter(batches[:2]), n=5, steps=0, init=start)    # zero steps: the start itself
    torch.testing.assert_close(d, start)


def test_learned_prior_bad_inputs(trained):
    model, batches, _, _ = trained
    with pytest.raises(ValueError, match="depends on the image"):
        fit_global_prior(model, batches, n=4, steps=1, init="salient")
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        fit_global_prior(model, batches, n=4, steps=1, init=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="optimizer"):
        fit_global_prior(model, batches, n=4, steps=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="ran out"):
        fit_global_prior(model, iter([]), n=4, steps=1)
    assert [b for _, b in zip(range(5), batches_forever([1, 2]))] == [1, 2, 1, 2, 1]


# ---- amortised placer -----------------------------------------------------------------------------

def test_placer_outputs_n_positions_inside_the_image_deterministically(trained):
    _, _, x, _ = trained
    a, b, c = Placer(6, in_size=14, seed=0), Placer(6, in_size=14, seed=0), Placer(6, in_size=14, seed=1)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        pa, pb, pc = a(x[:32]), b(x[:32]), c(x[:32])
    assert torch.equal(torch.random.get_rng_state(), state)            # the seed did not touch the global RNG
    assert pa.shape == (32, 6, 2) and pa.dtype == torch.float32
    assert (pa > 0).all() and (pa < 1).all()
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not torch.equal(pa, pc)
    torch.testing.assert_close(pa, lattice(6, 1, 1).expand(32, -1, -1), atol=0.01, rtol=0)  # starts at its init
    torch.testing.assert_close(a(x[:5]), pa[:5])                         # an image's positions ignore its batch
    init = torch.tensor([[0.2, 0.3], [0.7, 0.6]])
    torch.testing.assert_close(Placer(2, init=init)(x[:3]), init.expand(3, -1, -1), atol=0.01, rtol=0)


def test_placer_is_differentiable_end_to_end(trained):
    model, _, x, y = trained
    model = copy.deepcopy(model).double()
    # Bilinear reading is piecewise smooth: the tokenizer has kinks where a window's corner crosses a pixel
    # (pos * 28 - k/2 an integer) and the position encoding where a token crosses a table cell centre
    # (pos * 7 - 1/2 an integer). The lattice of 4 lies on tokenizer kinks, so start a quarter pixel off it.
    placer = Placer(4, in_size=14, seed=0, init=lattice(4, 1, 1) + 0.25 / 28).double()
    xb, yb = x[:16].double(), y[:16]
    with frozen(model):
        loss = F.cross_entropy(model(xb, placer(xb)), yb)
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        grads = {n: p.grad for n, p in placer.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items()]
        # the gradient reaching the head is the true one: a central difference along it agrees
        bias, g = placer.head.bias, grads["head.bias"]
        eps = 1e-5
        pieces = lambda pos: torch.cat([torch.floor(pos * 28 - 2), torch.floor(pos * 7 - 0.5)], -1)
        with torch.no_grad():
            step = eps * g / g.norm()
            start = pieces(placer(xb))
            bias += step
            assert torch.equal(pieces(placer(xb)), start), "the step crosses a kink: the check needs a smooth piece"
            up = F.cross_entropy(model(xb, placer(xb)), yb)
            bias -= 2 * step
            assert torch.equal(pieces(placer(xb)), start), "the step crosses a kink: the check needs a smooth piece"
            down = F.cross_entropy(model(xb, placer(xb)), yb)
            bias += step
        # On one smooth piece the central difference is off by O(eps^2) (float64): far below rtol.
        torch.testing.assert_close((up - down) / (2 * eps), g.norm(), rtol=1e-6, atol=1e-10)


def test_train_placer_lowers_the_loss_with_the_backbone_frozen(trained):
    model, batches, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    placer = Placer(4, in_size=14, seed=0, init=initial_positions("isotropic", 4, model.img_size, model.k))
    with torch.no_grad():
        start = _scores(model, x, y, placer(x))
    losses = train_placer(model, placer, batches, steps=60, lr=3e-3)
    assert losses.shape == (60,)
    assert losses[-10:].mean() < losses[:10].mean()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        pos = placer(x)
        end = _scores(model, x, y, pos)
    print(f"\nplacer, 4 tokens, held-out: loss {start[0]:.3f} -> {end[0]:.3f}, top-1 {start[1]:.3f} -> {end[1]:.3f}")
    assert (pos > 0).all() and (pos < 1).all()
    assert end[0] < start[0]


def test_train_placer_imitates_target_sets(trained, tmp_path):
    model, batches, _, _ = trained
    targets = torch.tensor([[0.25, 0.25], [0.25, 0.75], [0.75, 0.5]])           # M = 3 targets for N = 4 tokens
    data = [(xb, yb, targets.expand(len(xb), -1, -1)) for xb, yb in batches[:4]]
    placer = Placer(4, in_size=14, seed=0)
    logged = []
    losses = train_placer(model, placer, data, steps=40, lr=0.02, classification=0.0, imitation=1.0,
                          log=lambda step, m: logged.append(m))
    assert set(logged[0]) == {"loss", "chamfer"}
    assert losses[-1] < 0.3 * losses[0]
    save_placer(placer, tmp_path / "p", meta={"budget": 4})
    again = load_placer(tmp_path / "p")
    assert again.meta["budget"] == 4 and again.config == placer.config
    xb = data[0][0][:8]
    torch.testing.assert_close(again(xb), placer(xb), rtol=0, atol=0)
    with pytest.raises(ValueError, match="targets"):
        train_placer(model, placer, batches, steps=1, imitation=1.0)


def test_chamfer_distance():
    a = torch.rand(3, 5, 2, generator=torch.Generator().manual_seed(0))
    b = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(chamfer_distance(a, a), torch.zeros(3))
    torch.testing.assert_close(chamfer_distance(a, b), chamfer_distance(b, a))
    torch.testing.assert_close(chamfer_distance(a[:, [4, 2, 0, 1, 3]], b), chamfer_distance(a, b))
    one, two = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(chamfer_distance(one, two), torch.tensor([0.5]))   # 0 one way, (1 + 0) / 2 back


# ---- label-free test-time search ------------------------------------------------------------------

def test_entropy_search_uses_no_label_and_lowers_entropy(trained):
    model, _, x, y = trained
    assert not any(w in p for p in inspect.signature(entropy_search).parameters for w in ("label", "target"))
    x, y = x[:64], y[:64]
    init = sample_positions("uniform", 64, 4, 28, 28, k=4, generator=torch.Generator().manual_seed(2))
    r = entropy_search(model, x, init, steps=5, lr=0.03)
    assert r.trajectory.shape == (64, 6, 4, 2) and r.positions.shape == (64, 4, 2)
    assert r.entropy.shape == (6,) and r.image_entropy.shape == (64, 6) and r.predictions.shape == (64, 6)
    torch.testing.assert_close(r.trajectory[:, 0], init)
    torch.testing.assert_close(r.trajectory[:, -1], r.positions)
    assert (r.positions >= 0).all() and (r.positions <= 1).all()
    assert r.entropy[-1] < r.entropy[0] - 0.05
    with torch.no_grad():
        logits = model(x, r.positions)
    torch.testing.assert_close(r.logits, logits)
    torch.testing.assert_close(r.entropy[-1], prediction_entropy(logits).mean())
    assert all(p.grad is None for p in model.parameters())
    acc = (r.predictions == y[:, None]).float().mean(0)
    print(f"\nentropy search, 4 tokens: entropy {r.entropy[0]:.3f} -> {r.entropy[-1]:.3f}, "
          f"top-1 {acc[0]:.3f} -> {acc[-1]:.3f}")
    # the batch came with labels; shuffle images and labels together: the same positions per image
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    shuffled_x, shuffled_y = x[perm], y[perm]
    assert not torch.equal(shuffled_y, y)
    s = entropy_search(model, shuffled_x, init[perm], steps=5, lr=0.03)
    undo = perm.argsort()
    torch.testing.assert_close(s.trajectory[undo], r.trajectory, rtol=0, atol=1e-5)
    again = entropy_search(model, x, init, steps=5, lr=0.03)
    torch.testing.assert_close(again.trajectory, r.trajectory, rtol=0, atol=0)


def test_entropy_search_bad_inputs():
    with pytest.raises(ValueError, match="optimizer"):
        entropy_search(None, torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 2), optimizer="lbfgs")
    with pytest.raises(ValueError, match="positions"):
        entropy_search(None, torch.zeros(2, 3, 4, 4), torch.zeros(1, 1, 2))


# ---- cost against the backbone's forward ----------------------------------------------------------

def test_inference_cost_against_the_backbone(trained):
    model, _, x, _ = trained
    n, xb = 4, x[:64]
    prior = initial_positions("isotropic", n, model.img_size, model.k).expand(len(xb), -1, -1)
    placer = Placer(n, in_size=14, width=8)

    def placed():
        with torch.no_grad():
            return model(xb, placer(xb))

    def learned():
        with torch.no_grad():
            return model(xb, prior)

    methods = {"learned": learned, "placer": placed,
               "entropy-5": lambda: entropy_search(model, xb, prior, steps=5, lr=0.03)}
    flops = {k: relative_flops(f, model, xb, prior) for k, f in methods.items()}
    assert flops["learned"]["extra"] == 0
    assert 0 < flops["placer"]["extra"]
    assert flops["entropy-5"]["extra"] > 5        # 5 forward + backward passes more at least


def test_the_searches_run_inside_no_grad():
    """Evaluation loops run under torch.no_grad(); the searches still take their gradient steps."""
    from spot.methods.entropy_search import entropy_search
    from spot.methods.oracle import oracle_search
    torch.manual_seed(0)
    model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=32,
                                      depth=1, num_heads=2, num_classes=10))
    x = torch.randn(4, 3, 28, 28)
    pos = sample_positions("uniform", 4, 6, 28, 28, k=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e = entropy_search(model, x, pos, steps=2, lr=0.05)
        o = oracle_search(model, x, torch.arange(4), pos, steps=2, lr=0.05)
    assert not torch.equal(e.positions, pos) and not torch.equal(o.positions, pos)
