"""Spatial priors: where to place N tokens in an image. All return (B, N, 2) (y, x) in [0, 1]."""
from __future__ import annotations

import functools
import math
import zlib

import torch
import torch.nn.functional as F

from spot.core.devices import to_device

PRIORS = ("uniform", "gaussian", "sobol", "isotropic", "center", "salient", "grid", "inv_salient", "edge",
          "model_salient")
NEEDS_SALIENCY = ("salient", "inv_salient", "model_salient")


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
    m = to_device(_margin(height, width, k), pos.device)
    return m + pos * (1 - 2 * m)


def _density_sample(density: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """(B, n, 2) points in [0, 1]² drawn from density (B, h, w) >= 0 by inverse CDF, with uniform
    jitter in the cell; u (B, 3n) uniforms in [0, 1)."""
    B, h, w = density.shape
    cdf = (density.flatten(1).double().clamp_min(0) + 1e-12).cumsum(1)
    idx = torch.searchsorted(cdf, u[:, :n].double() * cdf[:, -1:]).clamp(max=h * w - 1)
    pos = torch.stack([idx // w, idx % w], -1) + u[:, n:3 * n].reshape(B, n, 2).double()
    return (pos / to_device(torch.tensor([h, w]), pos.device)).float()


def _density(prior: str, saliency: torch.Tensor | None, images: torch.Tensor | None) -> torch.Tensor:
    """(B, h, w) non-negative density of a map prior."""
    if prior == "edge":
        return _edges(images if images is not None else saliency[:, None])
    density = saliency.float().clamp_min(0)
    if prior == "inv_salient":
        density = 1 - density / density.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return density


def _edges(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the channel-mean image: (B, C, H, W) -> (B, H, W)."""
    g = images.float().mean(1, keepdim=True)
    sx = to_device(torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]), g.device)
    kern = torch.stack([sx, sx.T])[:, None]
    return F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kern).norm(dim=1)


@functools.lru_cache(maxsize=64)
def _sobol_bits(n: int) -> torch.Tensor:
    """(n, 2) int64: the first n unscrambled 2-D Sobol points as 30-bit integers."""
    return (torch.quasirandom.SobolEngine(2, scramble=False).draw(n, dtype=torch.float64) * 2**30).long()


def draws(prior: str, n: int, height: int, width: int, k: int) -> int:
    """How many uniform numbers per image `prior` consumes to place n tokens."""
    return {"uniform": 2 * n, "gaussian": 2 * n, "sobol": 2, "grid": (height // k) * (width // k),
            "isotropic": 0, "center": 0}.get(prior, 3 * n)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, C. Wellons), elementwise on int64 holding values < 2**32.
    Products are split into 16-bit halves, so no step overflows int64 on any device."""
    def mul(a, m):
        return ((((a >> 16) * m) & 0xFFFF) << 16) + (a & 0xFFFF) * m & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniforms(keys: list[str], seed: int, count: int, device=None) -> torch.Tensor:
    """(B, count) float32 uniforms in (0, 1), counter-based: element (i, j) is a hash of (seed,
    CRC-32 of keys[i], j), so an image gets the same numbers whatever its batch, order or device."""
    stream = torch.tensor([zlib.crc32(key.encode()) for key in keys], dtype=torch.int64)
    base = to_device(_mix32(stream ^ _mix32(torch.tensor(seed % 2**32))), device)
    j = torch.arange(count, device=device)
    bits = _mix32(_mix32(base[:, None] ^ _mix32(j)) ^ base[:, None])
    return ((bits >> 8).float() + 0.5) / 2**24


def sample_positions(prior: str, batch: int, n: int, height: int, width: int, k: int = 16,
                     generator: torch.Generator | None = None, saliency: torch.Tensor | None = None,
                     images: torch.Tensor | None = None, s: float = 0.3, std: float = 1 / math.pi,
                     uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Place n token centres per image with a spatial prior. Returns (batch, n, 2) (y, x) in [0, 1].

    Every random choice is made from `uniforms` (batch, draws(...)) in [0, 1): drawn from
    `generator` (a CPU torch.Generator; None = torch's global RNG) when not given, or keyed by image
    (`positions_for`). Map priors work on the maps' device.
    Window margin: random and map priors keep each token's k x k window inside the image (centres
    in [k/2, H - k/2] x [k/2, W - k/2]); the lattice priors need no margin below the full grid count.
    - uniform: i.i.d. uniform over the centres whose window is inside the image.
    - gaussian: i.i.d. N(0.5, std²) per axis (Box-Muller), clamped to [0, 1], then mapped affinely
      onto the margin. Default std = 1/pi (DESIGN's "N(0.5, 1/pi)" read as the scale: a variance of
      1/pi, once clamped, piles 38% of the points on the border and is less central than uniform).
    - sobol: the 2-D Sobol points with a random digital shift (XOR) per image, mapped onto the
      margin: every image's first 2^m points stay a (0, m, 2)-net.
    - isotropic: deterministic near-square lattice; at n = (H/k)*(W/k) exactly the patch centres.
    - center: the lattice warped to the centre, 0.5 + d(1 - exp(-(d/s)²)), d = p - 0.5.
    - grid: n distinct random cells of the patch grid (patch dropout at inference), row-major order.
      With SPoTViT this is the random-drop baseline of exactly n grid tokens (timm's PatchDropout
      keeps int(L·(1 - p)) tokens: 24 for 25 of 196).
    - salient / inv_salient: drawn from saliency (B, h, w) (any h, w) / from 1 - saliency/max as a
      density, uniform jitter inside the map cell, then clamped onto the margin (the window still
      covers the drawn point).
    - edge: drawn from the Sobel magnitude of `images` (B, C, H, W), or of `saliency` if no images
      are given, like salient.
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
    if prior == "grid" and n > (height // k) * (width // k):
        raise ValueError(f"prior 'grid': token count {n} exceeds the {(height // k) * (width // k)} patch cells")
    if prior in ("isotropic", "center"):
        pos = lattice(n, height, width)
        if prior == "center":
            d = pos - 0.5
            pos = 0.5 + d * (1 - torch.exp(-(d / s) ** 2))
        return pos.expand(batch, n, 2).clone()
    u = torch.rand(batch, draws(prior, n, height, width, k), generator=generator) if uniforms is None else uniforms
    if prior == "uniform":
        pos = _to_margin(u.reshape(batch, n, 2), height, width, k)
    elif prior == "gaussian":
        r, theta = (-2 * torch.log1p(-u[:, :n])).sqrt(), 2 * math.pi * u[:, n:]
        z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1)
        pos = _to_margin((0.5 + std * z).clamp(0, 1), height, width, k)
    elif prior == "sobol":
        shift = (u[:, None, :2].double() * 2**30).long()
        pos = _to_margin(((to_device(_sobol_bits(n), u.device) ^ shift) / 2**30).float(), height, width, k)
    elif prior == "grid":
        cells = to_device(grid_centers(height, width, k), u.device)
        pos = cells[u.argsort(1)[:, :n].sort(1).values]
    else:
        m = to_device(_margin(height, width, k), maps.device)
        pos = _density_sample(_density(prior, saliency, images), n, to_device(u, maps.device)).clamp(m, 1 - m)
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


def split_seed(seed: int, split: str) -> int:
    """The seed of a split's positions: `seed` for the train images (the kNN bank), seed + 1 for val."""
    return seed + (split == "val")


def positions_for(prior: str, budget: int, keys: list[str], seed: int, height: int, width: int, k: int,
                  saliency: torch.Tensor | None = None, images: torch.Tensor | None = None,
                  device=None) -> torch.Tensor:
    """(B, budget, 2) positions for the images named `keys`, from uniforms keyed by (seed, key)
    (`keyed_uniforms`): the same positions whatever the batch size or order, drawn for the whole
    batch at once on `device` (default: the maps', else the CPU). saliency (B, h, w) feeds the
    salient priors, images (B, C, H, W) the edge prior."""
    maps = images if prior == "edge" and images is not None else saliency
    device = device if device is not None else (maps.device if maps is not None else None)
    u = keyed_uniforms(keys, seed, draws(prior, budget, height, width, k), device)
    pos = sample_positions(prior, len(keys), budget, height, width, k=k, saliency=saliency,
                           images=images if prior == "edge" else None, uniforms=u)
    return to_device(pos, device)
