"""Spatial priors: counts, bounds, reproducibility, the lattice, saliency-driven placement, errors."""
import pytest
import torch

from spot.core.priors import PRIORS, grid_centers, sample_positions

H, W, K = 28, 28, 4
RANDOM = ("uniform", "gaussian", "sobol", "grid", "salient", "inv_salient", "edge")


def maps(batch: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(saliency=torch.rand(batch, 7, 9, generator=gen), images=torch.rand(batch, 3, H, W, generator=gen))


def draw(prior: str, seed: int = 0, n: int = 16, batch: int = 3, **kw) -> torch.Tensor:
    return sample_positions(prior, batch, n, H, W, k=K, generator=torch.Generator().manual_seed(seed),
                            **{**maps(batch), **kw})


@pytest.mark.parametrize("prior", PRIORS)
def test_count_bounds_and_reproducibility(prior):
    pos = draw(prior)
    assert pos.shape == (3, 16, 2) and pos.dtype == torch.float32
    margin = K / 2 / H                                         # window inside the image
    assert pos.min() >= margin - 1e-6 and pos.max() <= 1 - margin + 1e-6
    assert torch.equal(pos, draw(prior))
    if prior in RANDOM:
        assert not torch.equal(pos, draw(prior, seed=1))
        assert not torch.equal(pos[0], pos[1])                 # each image gets its own draw


@pytest.mark.parametrize("size,k", [((224, 224), 16), ((28, 28), 4), ((32, 64), 8), ((48, 32), 8)])
def test_isotropic_at_full_count_is_the_patch_grid(size, k):
    n = (size[0] // k) * (size[1] // k)
    pos = sample_positions("isotropic", 2, n, *size, k=k)
    assert torch.equal(pos, grid_centers(*size, k).expand(2, -1, -1))


def test_grid_centers_are_the_patch_cell_centres_row_major():
    c = grid_centers(32, 64, 8)
    assert c.shape == (32, 2)
    torch.testing.assert_close(c[:9], torch.tensor([[4 / 32, (8 * j + 4) / 64] for j in range(8)] + [[12 / 32, 4 / 64]]))


def test_isotropic_covers_evenly():
    for n in (1, 5, 10, 25, 30):
        pos = sample_positions("isotropic", 1, n, 224, 224)[0]
        assert len(pos) == n == len(torch.unique(pos, dim=0))
        assert (pos.mean(0) - 0.5).abs().max() < 0.1               # centred coverage
        if n > 1:                                                   # no two points crowd together
            assert torch.cdist(pos, pos).add(torch.eye(n) * 9).min() > 0.5 / n ** 0.5


def test_grid_picks_distinct_patch_cells():
    pos = draw("grid", n=20)
    cells = grid_centers(H, W, K)
    for p in pos:
        hit = (p[:, None] == cells[None]).all(-1)                   # (n, G)
        assert hit.any(1).all() and hit.sum(0).max() == 1
    assert draw("grid", n=49).shape == (3, 49, 2)


def test_center_is_pulled_toward_the_middle():
    s = dict(n=49, batch=1)
    iso, cen = draw("isotropic", **s), draw("center", **s)
    assert (cen - 0.5).norm(dim=-1).mean() < 0.8 * (iso - 0.5).norm(dim=-1).mean()
    wide = draw("center", s=10.0, **s)                          # large s: stronger pull (1 - exp(-(d/s)^2) -> 0)
    assert (wide - 0.5).norm(dim=-1).mean() < (cen - 0.5).norm(dim=-1).mean()


def test_gaussian_is_centred_and_wider_in_the_middle_than_uniform():
    g, u = draw("gaussian", n=4000, batch=1)[0], draw("uniform", n=4000, batch=1)[0]
    assert (g.mean(0) - 0.5).abs().max() < 0.02
    near = lambda p: ((p - 0.5).abs() < 0.15).all(-1).float().mean()
    assert near(g) > 1.1 * near(u)


def test_sobol_is_a_net_with_a_new_scramble_per_image():
    """Scrambled Sobol: any 16 first points put exactly one point in each cell of a 4 x 4 grid."""
    pos = sample_positions("sobol", 4, 16, H, W, k=K, generator=torch.Generator().manual_seed(0))
    m = K / 2 / H
    cell = ((pos - m) / (1 - 2 * m) * 4).floor().clamp(0, 3)
    for c in cell:
        assert len(torch.unique(c[:, 0] * 4 + c[:, 1])) == 16
    assert not torch.equal(pos[0], pos[1])


def test_salient_places_points_where_the_map_is_high():
    sal = torch.full((4, 14, 14), 0.1)
    sal[:, :, :7] = 0.9                                         # left half is 9x as salient
    pos = sample_positions("salient", 4, 500, H, W, k=K, generator=torch.Generator().manual_seed(0), saliency=sal)
    left = (pos[..., 1] < 0.5).float().mean()
    assert 0.85 < left < 0.95                                   # expected 0.9
    inv = sample_positions("inv_salient", 4, 500, H, W, k=K, generator=torch.Generator().manual_seed(0), saliency=sal)
    assert (inv[..., 1] < 0.5).float().mean() < 0.05            # 1 - s/max: zero on the left


def test_edge_follows_the_edges():
    images = torch.zeros(2, 3, H, W)
    images[:, :, 12:, :] = 1.0                                  # one horizontal edge between rows 11 and 12
    pos = sample_positions("edge", 2, 200, H, W, k=K, generator=torch.Generator().manual_seed(0), images=images)
    assert ((pos[..., 0] * H - 12).abs() < 2).all()
    alt = sample_positions("edge", 2, 200, H, W, k=K, generator=torch.Generator().manual_seed(0),
                           saliency=images[:, 0])               # edges of a map when no images are given
    assert ((alt[..., 0] * H - 12).abs() < 2).all()


@pytest.mark.parametrize("call,match", [
    (dict(prior="nope"), "unknown prior 'nope'"),
    (dict(prior="uniform", n=0), "prior 'uniform'.*n=0"),
    (dict(prior="grid", n=50), "prior 'grid'.*50"),
    (dict(prior="salient"), "prior 'salient' needs a saliency"),
    (dict(prior="inv_salient"), "prior 'inv_salient' needs a saliency"),
    (dict(prior="edge"), "prior 'edge' needs"),
    (dict(prior="salient", saliency=torch.rand(2, 7, 7)), "prior 'salient'.*batch 3"),
])
def test_bad_requests_name_the_prior(call, match):
    kw = dict(batch=3, n=16, height=H, width=W, k=K) | call
    with pytest.raises(ValueError, match=match):
        sample_positions(**kw)


def _mix32_reference(x: int) -> int:
    x ^= x >> 16
    x = x * 0x7FEB352D & 0xFFFFFFFF
    x ^= x >> 15
    x = x * 0x846CA68B & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_integer_hash_is_exact_on_all_32_bit_values():
    from spot.core.priors import _mix32
    xs = torch.cat([torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(0)),
                    torch.tensor([0, 1, 2**16 - 1, 2**31, 2**32 - 1])])
    assert [int(v) for v in _mix32(xs)] == [_mix32_reference(int(v)) for v in xs]


def test_keyed_uniforms_are_uniform_and_independent_of_neighbours():
    from spot.core.priors import keyed_uniforms
    u = keyed_uniforms([f"val_{i:05d}" for i in range(2000)], seed=0, count=64).double()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):         # counters, then keys next to each other
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01


@pytest.mark.parametrize("prior", PRIORS)
def test_positions_for_an_image_do_not_depend_on_its_batch(prior):
    from spot.core.priors import positions_for
    keys = [f"train_{i}" for i in range(12)]
    m = maps(12)
    whole = positions_for(prior, 9, keys, 3, H, W, K, **m)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = positions_for(prior, 9, [keys[i] for i in order], 3, H, W, K,
                             saliency=m["saliency"][order], images=m["images"][order])
    assert torch.equal(shuffled, whole[order])
    assert torch.equal(positions_for(prior, 9, keys[4:7], 3, H, W, K, saliency=m["saliency"][4:7],
                                     images=m["images"][4:7]), whole[4:7])
    if prior in RANDOM:
        assert not torch.equal(positions_for(prior, 9, keys, 4, H, W, K, **m), whole)   # the seed matters
