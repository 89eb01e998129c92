"""Saliency maps per image, written as shards parallel to the image shards (same keys, same order)."""
from __future__ import annotations

import contextlib
import io
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from spot.data.loading import decode_image, manifest_shards, read_shard, verify_shards
from spot.data.shards import remove_unlisted, write_shard
from spot.outputs import writing
from spot.utils import write_json


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, h, w) maps, reflect padding."""
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))


def spectral_residual(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Spectral residual saliency (Hou & Zhang, CVPR 2007), batched.

    images (B, C, H, W) in any range -> (B, size, size) in [0, 1]: the log-amplitude spectrum minus
    its 3x3 local mean, back through the inverse FFT with the original phase, squared, blurred.
    """
    g = F.interpolate(images.float().mean(1, keepdim=True), size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)
    spec = torch.fft.fft2(g)
    amp = spec.abs()
    log_amp = torch.log(amp + 0.1 * amp.flatten(1).mean(1)[:, None, None, None] + 1e-12)
    residual = log_amp - F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    sal = torch.fft.ifft2(torch.exp(residual + 1j * spec.angle())).abs() ** 2
    sal = gaussian_blur(sal, sigma=size / 25)[:, 0]
    lo, hi = sal.flatten(1).amin(1), sal.flatten(1).amax(1)
    return (sal - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]


METHODS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"spectral_residual": spectral_residual}


def saliency_maps(images: torch.Tensor, method: str = "spectral_residual", size: int = 64) -> torch.Tensor:
    """(B, C, H, W) images -> (B, size, size) maps in [0, 1] with a method from `METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](images, size)


def to_png(m: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((m.clamp(0, 1) * 255).round().byte().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def small_images(job: tuple[Path, int]) -> tuple[list[str], np.ndarray]:
    """Keys and (n, size, size, 3) uint8 pixels of one image shard, resized for the maps."""
    shard, size = job
    keys, pixels = [], []
    for rec in read_shard(shard):
        keys.append(rec["__key__"])
        pixels.append(np.asarray(decode_image(rec).resize((size, size), Image.BILINEAR)))
    return keys, np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)


def write_saliency(shards_dir: str | Path, out_dir: str | Path, method: str = "spectral_residual",
                   size: int = 64, batch_size: int = 256, preview: int = 8, workers: int = 1,
                   device: str | torch.device = "cpu") -> dict:
    """One 8-bit PNG map (size x size) per image of every shard in `shards_dir` (listed in its
    manifest, which the folder must match), into `out_dir/<same shard name>` with the same keys in
    the same order; plus `preview.png` (images beside their maps) and `manifest.json`: per shard
    its name, count, size (bytes), sha256 and the sha256 of the image shard it was made from
    (`spot.data.loading.saliency_paths` checks it). `workers` processes decode and resize the
    images, shard by shard; the maps are computed in batches on `device`. Holds `out_dir`'s lock;
    manifest.json and run.json are removed first and written last. Returns the manifest."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r} (saliency.method); choose one of {', '.join(METHODS)}")
    if size < 8:
        raise ValueError(f"saliency.size must be >= 8, got {size}")
    images = manifest_shards(verify_shards(shards_dir, hash=False))
    manifest = dict(method=method, size=size, shards=[])
    shown = []
    jobs = [(Path(shards_dir) / image["name"], size) for image in images]
    with writing(out_dir) as out, contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(workers, len(jobs))))
            decoded = pool.imap(small_images, jobs)
        else:
            decoded = map(small_images, jobs)
        for image, (keys, pixels) in tqdm(zip(images, decoded), total=len(images), desc="saliency", unit="shard"):
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
            maps = torch.cat([saliency_maps(x[i:i + batch_size].to(device).float() / 255, method, size).cpu()
                              for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, size, size)
            records = [{"__key__": key, "png": to_png(m)} for key, m in zip(keys, maps, strict=True)]
            shown += list(zip(pixels, maps))[:max(0, preview - len(shown))]
            manifest["shards"].append(dict(name=image["name"], count=len(records), image_sha256=image["sha256"],
                                           **write_shard(out / image["name"], records)))
        save_preview(shown, out / "preview.png")
        remove_unlisted(out, {s["name"] for s in manifest["shards"]})
        write_json(out / "manifest.json", manifest)
    return manifest


def save_preview(pairs: list, path: Path) -> None:
    """A picture grid: each image above its saliency map."""
    from spot.figures import plt, save_fig
    n = max(1, len(pairs))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for j, (im, m) in enumerate(pairs):
        axes[0, j].imshow(im)
        axes[1, j].imshow(m.numpy(), cmap="inferno", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("images (top) and their saliency maps (bottom)")
    save_fig(fig, path, dpi=100)
