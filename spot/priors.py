"""Spatial priors: where to place N tokens in an image. All return (B, N, 2) (y, x) in [0, 1]."""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

PRIORS = ("uniform", "gaussian", "sobol", "isotropic", "center", "salient", "grid", "inv_salient", "edge")
NEEDS_SALIENCY = ("salient", "inv_salient")


def grid_centers(height: int, width: int, k: int) -> torch.Tensor:
    """(Gh*Gw, 2) centres of the k-stride patch cells, row-major, normalised (y, x)."""
    gh, gw = height // k, width // k
    ys = (torch.arange(gh) * k + k / 2) / height
    xs = (torch.arange(gw) * k + k / 2) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)


def lattice(n: int, height: int, width: int) -> torch.Tensor:
    """(n, 2) near-square lattice of exactly n points covering the image evenly, row-major.

    Rows r = round(sqrt(n * H / W)); the n points are spread over r rows as evenly as possible,
    each row's points at cell centres. For n = (H/k)*(W/k) this is exactly `grid_centers`.
    """
    rows = min(n, max(1, round(math.sqrt(n * height / width))))
    counts = [n // rows + (1 if i < n % rows else 0) for i in range(rows)]
    pts = [(torch.full((c,), (i + 0.5) / rows), (torch.arange(c) + 0.5) / c) for i, c in enumerate(counts)]
    return torch.cat([torch.stack([y, x], -1) for y, x in pts])


def _margin(height: int, width: int, k: int) -> torch.Tensor:
    """(2,) normalised half-window (k/2/H, k/2/W): centres in [m, 1 - m] keep the window inside."""
    return torch.tensor([k / 2 / height, k / 2 / width]).clamp(max=0.5)


def _to_margin(pos: torch.Tensor, height: int, width: int, k: int) -> torch.Tensor:
    """Map [0, 1]² affinely onto the centres whose k x k window lies inside the image."""
    m = _margin(height, width, k)
    return m + pos * (1 - 2 * m)


def _density_sample(density: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """(B, n, 2) points in [0, 1]² drawn from density (B, h, w) >= 0, with uniform jitter in the cell."""
    B, h, w = density.shape
    p = density.flatten(1).double().clamp_min(0) + 1e-12
    idx = torch.multinomial(p / p.sum(1, keepdim=True), n, replacement=True, generator=generator)
    jitter = torch.rand(B, n, 2, generator=generator, dtype=torch.float64)
    pos = torch.stack([idx // w, idx % w], -1) + jitter
    return (pos / torch.tensor([h, w])).float()


def _density(prior: str, saliency: torch.Tensor | None, images: torch.Tensor | None) -> torch.Tensor:
    """(B, h, w) non-negative density of a map prior, on the CPU."""
    if prior == "edge":
        return _edges(images if images is not None else saliency[:, None]).cpu()
    density = saliency.float().cpu().clamp_min(0)
    if prior == "inv_salient":
        density = 1 - density / density.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return density


def _edges(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the channel-mean image: (B, C, H, W) -> (B, H, W)."""
    g = images.float().mean(1, keepdim=True)
    sx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], device=g.device)
    kern = torch.stack([sx, sx.T])[:, None]
    return F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kern).norm(dim=1)


def sample_positions(prior: str, batch: int, n: int, height: int, width: int, k: int = 16,
                     generator: torch.Generator | None = None, saliency: torch.Tensor | None = None,
                     images: torch.Tensor | None = None, s: float = 0.3,
                     std: float = 1 / math.pi) -> torch.Tensor:
    """Place n token centres per image with a spatial prior. Returns (batch, n, 2) (y, x) in [0, 1].

    Window margin: random and map priors keep each token's k x k window inside the image (centres
    in [k/2, H - k/2] x [k/2, W - k/2]); the lattice priors need no margin below the full grid count.
    - uniform: i.i.d. uniform over the centres whose window is inside the image.
    - gaussian: i.i.d. N(0.5, std²) per axis, clamped to [0, 1], then mapped affinely onto the margin.
      Default std = 1/pi (DESIGN's "N(0.5, 1/pi)" read as the scale: a variance of 1/pi, once
      clamped, piles 38% of the points on the border and is less central than uniform).
    - sobol: scrambled 2-D Sobol points, a new scramble per image, mapped onto the margin.
    - isotropic: deterministic near-square lattice; at n = (H/k)*(W/k) exactly the patch centres.
    - center: the lattice warped to the centre, 0.5 + d(1 - exp(-(d/s)²)), d = p - 0.5.
    - grid: n distinct random cells of the patch grid (patch dropout at inference), row-major order.
    - salient / inv_salient: drawn from saliency (B, h, w) (any h, w) / from 1 - saliency/max as a
      density, uniform jitter inside the map cell, then clamped onto the margin (the window still
      covers the drawn point).
    - edge: drawn from the Sobel magnitude of `images` (B, C, H, W), or of `saliency` if no images
      are given, like salient.
    Reproducible from `generator` (a CPU torch.Generator; None = torch's global RNG).
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if n < 1 or batch < 1:
        raise ValueError(f"prior {prior!r}: token count n and batch must be >= 1, got n={n}, batch={batch}")
    if prior in NEEDS_SALIENCY and saliency is None:
        raise ValueError(f"prior {prior!r} needs a saliency map (saliency=(B, h, w))")
    if prior == "edge" and images is None and saliency is None:
        raise ValueError("prior 'edge' needs images=(B, C, H, W) or saliency=(B, h, w)")
    maps = images if prior == "edge" and images is not None else saliency
    if prior in NEEDS_SALIENCY + ("edge",) and (maps.ndim != (4 if maps is images else 3) or len(maps) != batch):
        raise ValueError(f"prior {prior!r}: map of shape {tuple(maps.shape)} does not match batch {batch}")
    if prior == "uniform":
        pos = _to_margin(torch.rand(batch, n, 2, generator=generator), height, width, k)
    elif prior == "gaussian":
        pos = (0.5 + std * torch.randn(batch, n, 2, generator=generator)).clamp(0, 1)
        pos = _to_margin(pos, height, width, k)
    elif prior == "sobol":
        seeds = torch.randint(0, 2**31 - 1, (batch,), generator=generator)
        pos = torch.stack([torch.quasirandom.SobolEngine(2, scramble=True, seed=int(sd)).draw(n)
                           for sd in seeds])
        pos = _to_margin(pos, height, width, k)
    elif prior in ("isotropic", "center"):
        pos = lattice(n, height, width)
        if prior == "center":
            d = pos - 0.5
            pos = 0.5 + d * (1 - torch.exp(-(d / s) ** 2))
        pos = pos.expand(batch, n, 2).clone()
    elif prior == "grid":
        cells = grid_centers(height, width, k)
        if n > len(cells):
            raise ValueError(f"prior 'grid': token count {n} exceeds the {len(cells)} patch cells")
        keep = torch.rand(batch, len(cells), generator=generator).argsort(1)[:, :n].sort(1).values
        pos = cells[keep]
    else:
        m = _margin(height, width, k)
        pos = _density_sample(_density(prior, saliency, images), n, generator).clamp(m, 1 - m)
    return pos.float()


def check_budget(prior: str, budget: int, height: int, width: int, k: int) -> None:
    """One-line ValueError for an unknown prior or a budget the image cannot hold: more tokens than
    pixels, or (prior 'grid') than patch cells."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if not 1 <= budget <= height * width:
        raise ValueError(f"token budget {budget} is outside 1..{height * width} (the image's pixel count)")
    cells = (height // k) * (width // k)
    if prior == "grid" and budget > cells:
        raise ValueError(f"token budget {budget} exceeds the {cells} patch cells of prior 'grid'")


def positions_for(prior: str, budget: int, keys: list[str], seed: int, height: int, width: int, k: int,
                  saliency: torch.Tensor | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
    """(B, budget, 2) positions for the images named `keys`, each drawn from a generator seeded by
    (seed, key): the same positions whatever the batch size or order. saliency (B, h, w) feeds the
    salient priors, images (B, C, H, W) the edge prior; the lattice priors draw nothing (one call)."""
    if prior in ("isotropic", "center"):
        return sample_positions(prior, len(keys), budget, height, width, k=k)
    out = []
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
        out.append(sample_positions(prior, 1, budget, height, width, k=k, generator=gen,
                                    saliency=None if saliency is None else saliency[i:i + 1].cpu(),
                                    images=images[i:i + 1].cpu() if prior == "edge" else None))
    return torch.cat(out)
