import pytest
import timm
import torch
import torch.nn.functional as F

from spot.core.model import SPoTViT
from spot.core.priors import grid_centers, sample_positions
from spot.data.sources import fashion_mnist_arrays
from spot.methods.oracle import oracle_search, snap_to_grid
from tests.conftest import FASHION_MNIST


@pytest.fixture(scope="module")
def trained():
    """A tiny SPoT ViT trained for a few seconds on Fashion-MNIST with random sparse placements."""
    images, labels = fashion_mnist_arrays(FASHION_MNIST, "train")
    x = (torch.from_numpy(images[:3000]).float() / 255 - 0.286) / 0.353
    x, y = x[:, None].expand(-1, 3, -1, -1), torch.from_numpy(labels[:3000]).long()
    torch.manual_seed(0)
    model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4,
                                      embed_dim=64, depth=2, num_heads=2, num_classes=10))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for i in range(0, 2500, 100):
            pos = sample_positions("uniform", 100, 8, 28, 28, k=4, generator=gen)
            loss = F.cross_entropy(model(x[i:i + 100], pos), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), x[2500:], y[2500:]


def test_oracle_beats_its_start_on_held_out_images(trained):
    model, x, y = trained
    init = sample_positions("isotropic", len(y), 4, 28, 28, k=4)
    r = oracle_search(model, x, y, init, steps=5, lr=0.03)
    assert r.trajectory.shape == (len(y), 6, 4, 2) and r.positions.shape == (len(y), 4, 2)
    assert r.loss.shape == (6,) and r.accuracy.shape == (6,)
    torch.testing.assert_close(r.trajectory[:, 0], init)
    assert r.accuracy[-1] > r.accuracy[0] + 0.05
    assert r.loss[-1] < r.loss[0]
    assert (r.positions >= 0).all() and (r.positions <= 1).all()
    with torch.no_grad():
        final_acc = (model(x, r.positions).argmax(1) == y).float().mean()
    torch.testing.assert_close(final_acc, r.accuracy[-1])


def test_frozen_model_and_deterministic(trained):
    model, x, y = trained
    model.zero_grad(set_to_none=True)   # the fixture's training left gradients behind
    model.train()
    init = sample_positions("uniform", 16, 6, 28, 28, k=4, generator=torch.Generator().manual_seed(1))
    a = oracle_search(model, x[:16], y[:16], init, steps=3)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    b = oracle_search(model, x[:16], y[:16], init, steps=3)
    torch.testing.assert_close(a.trajectory, b.trajectory, rtol=0, atol=0)
    model.eval()


def test_snapped_positions_are_cell_centres(trained):
    model, x, y = trained
    r = oracle_search(model, x[:8], y[:8], sample_positions("uniform", 8, 5, 28, 28, k=4), steps=2)
    cells = grid_centers(28, 28, 4)
    d = torch.cdist(r.snapped.reshape(-1, 2), cells).min(1).values
    assert d.max() < 1e-6
    torch.testing.assert_close(snap_to_grid(cells[None], (28, 28), 4)[0], cells)


def test_bad_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        oracle_search(None, torch.zeros(1, 3, 4, 4), torch.zeros(1).long(), torch.zeros(1, 1, 2), optimizer="lbfgs")
