"""Saliency maps on disk: shards of one map per image, parallel to the image shards (same keys, same
order), and the maps a model-saliency job wrote, looked up by image key."""
from __future__ import annotations

import contextlib
import io
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spot.core.saliency import saliency_maps
from spot.data.loading import decode_image, manifest_shards, read_shard, verify_shards
from spot.data.shards import remove_unlisted, write_shard
from spot.utils.figures import save_preview
from spot.utils.io import write_json, writing
from spot.utils.progress import progress


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
    """One 8-bit PNG map (size x size, size >= 8; `method` of `spot.core.saliency.METHODS`: the schema
    holds saliency.size and saliency.method to them) per image of every shard in `shards_dir` (listed in its
    manifest, which the folder must match, sha256 included), into `out_dir/<same shard name>` with the same keys in
    the same order; plus `preview.png` (images beside their maps) and `manifest.json`: per shard
    its name, count, size (bytes), sha256 and the sha256 of the image shard it was made from
    (the reference reader checks it, `spot.data.stream.saliency_paths`). `workers` processes decode and
    resize the images, shard by shard; the maps are computed in batches on `device`. Holds `out_dir`'s
    lock; manifest.json and run.json are removed first and written last. Returns the manifest."""
    images = manifest_shards(verify_shards(shards_dir))     # (sha256 too: a damaged tar reads as a shorter one)
    manifest = dict(method=method, size=size, shards=[])
    shown = []
    jobs = [(Path(shards_dir) / image["name"], size) for image in images]
    with writing(out_dir) as out, contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(workers, len(jobs))))
            decoded = pool.imap(small_images, jobs)
        else:
            decoded = map(small_images, jobs)
        for image, (keys, pixels) in progress(zip(images, decoded), total=len(images), desc="saliency", unit="shard"):
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


class SaliencyMaps:
    """The maps a model-saliency job wrote (`<split>-saliency.npy` uint8 (n, s, s), `<split>-keys.npy`),
    looked up by image key: `maps("val", keys)` -> (B, s, s) float in [0, 1]."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.rows: dict[str, dict[str, int]] = {}

    def __call__(self, split: str, keys: list[str]) -> torch.Tensor:
        if split not in self.rows:
            self.rows[split] = {str(k): i for i, k in enumerate(np.load(self.folder / f"{split}-keys.npy"))}
        missing = [k for k in keys if k not in self.rows[split]]
        if missing:
            raise ValueError(f"{self.folder} has no {split} map for {len(missing)} images (e.g. {missing[0]!r}): "
                             "the kNN bank is larger than the maps made (eval.knn.bank_size)?")
        maps = np.load(self.folder / f"{split}-saliency.npy", mmap_mode="r")
        return torch.from_numpy(maps[[self.rows[split][k] for k in keys]]).float() / 255
