"""Spatial priors: where to place N tokens in an image. All return (B, N, 2) (y, x) in [0, 1]."""
from __future__ import annotations

import math

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


def _to_margin(pos: torch.Tensor, height: int, width: int, k: int) -> torch.Tensor:
    """Map [0, 1]² affinely onto the centres whose k x k window lies inside the image."""
    m = torch.tensor([k / 2 / height, k / 2 / width])
    return m + pos * (1 - 2 * m)


def _density_sample(density: torch.Tensor, n: int, height: int, width: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Draw n points per map from density (B, h, w) >= 0, with uniform sub-cell jitter."""
    B, h, w = density.shape
    p = density.flatten(1).double().clamp_min(0) + 1e-12
    idx = torch.multinomial(p / p.sum(1, keepdim=True), n, replacement=True, generator=generator)
    jitter = torch.rand(B, n, 2, generator=generator, dtype=torch.float64)
    pos = torch.stack([idx // w, idx % w], -1) + jitter
    return (pos / torch.tensor([h, w])).float()


def _edges(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the channel-mean image: (B, C, H, W) -> (B, H, W)."""
    g = images.float().mean(1, keepdim=True)
    sx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], device=g.device)
    kern = torch.stack([sx, sx.T])[:, None]
    return F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kern).norm(dim=1)


def sample_positions(prior: str, batch: int, n: int, height: int, width: int, k: int = 16,
                     generator: torch.Generator | None = None, saliency: torch.Tensor | None = None,
                     images: torch.Tensor | None = None, s: float = 0.3) -> torch.Tensor:
    """Place n token centres per image with a spatial prior. Returns (batch, n, 2) (y, x) in [0, 1].

    Random priors keep each token's k x k window inside the image (centres in [k/2, H-k/2]):
    uniform (i.i.d.), gaussian (N(0.5, 1/pi) per axis, clamped), sobol (scrambled 2-D Sobol, a new
    scramble per image). Deterministic priors: isotropic (near-square lattice, = patch centres at the
    full grid count), center (the lattice warped to the centre: 0.5 + d(1 - exp(-(d/s)^2)), d = p - .5).
    Map priors draw from a density with sub-pixel jitter: salient (saliency (B, h, w)), inv_salient
    (1 - saliency), edge (Sobel magnitude of `images` (B, C, H, W)). grid: n distinct random patch
    cells (patch dropout at inference). Reproducible from `generator` (a CPU torch.Generator).
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if n < 1:
        raise ValueError(f"prior {prior!r}: token count must be >= 1, got {n}")
    if prior in NEEDS_SALIENCY and saliency is None:
        raise ValueError(f"prior {prior!r} needs a saliency map (saliency=(B, h, w))")
    if prior == "edge" and images is None:
        raise ValueError("prior 'edge' needs the images (images=(B, C, H, W))")
    if prior == "uniform":
        pos = _to_margin(torch.rand(batch, n, 2, generator=generator), height, width, k)
    elif prior == "gaussian":
        pos = (0.5 + torch.randn(batch, n, 2, generator=generator) / math.sqrt(math.pi)).clamp(0, 1)
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
        if prior == "edge":
            density = _edges(images).cpu()
        else:
            density = saliency.float().cpu()
            density = density if prior == "salient" else 1 - density / density.flatten(1).amax(1)[:, None, None].clamp_min(1e-12)
        pos = _density_sample(density, n, height, width, generator)
    return pos.float()
