"""Read shards back as batches `(images, labels, keys, saliency)` with a backbone's preprocessing.

A shard folder is read only as its manifest.json lists it: a folder without one (never finished, or
being rewritten) or whose `<split>-NNNNNN.tar` files differ from the list (missing, another size,
not listed) is refused with a one-line error, as is a shard holding a key twice.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from spot.data.shards import SHARD_NAME
from spot.utils.io import read_json

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp", "bmp", "gif", "tiff", "ppm")


class Batch(NamedTuple):
    images: torch.Tensor            # (B, 3, H, W) float32, normalised
    labels: torch.Tensor            # (B,) int64
    keys: list[str]
    saliency: torch.Tensor | None   # (B, H, W) float32 in [0, 1], aligned with images


def read_manifest(folder: str | Path) -> dict:
    """`<folder>/manifest.json`; a one-line FileNotFoundError when it is missing (the stage that
    writes the folder never finished, or is running: the manifest is removed first, written last)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not complete (run its stage again)")
    return read_json(path)


def class_names(manifest: dict, folder: str | Path) -> list[str]:
    """The class names of a shard folder's manifest, in label order; a one-line ValueError for a
    manifest an older spot wrote without them."""
    if "class_names" not in manifest:
        raise ValueError(f"{Path(folder) / 'manifest.json'} names no classes (an older spot wrote it): "
                         "run the shard stage again")
    return manifest["class_names"]


def manifest_shards(manifest: dict) -> list[dict]:
    """Every shard entry (name, count, size, sha256) of a manifest: image shards list theirs per
    split, saliency maps in one list."""
    if "splits" in manifest:
        return [s for split in manifest["splits"].values() for s in split["shards"]]
    return manifest["shards"]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_shards(folder: str | Path, manifest: dict, hash: bool = False) -> None:
    """A one-line error unless the `<split>-NNNNNN.tar` files of `folder` are exactly those of its
    `manifest`, each of its size (and sha256, with `hash`): FileNotFoundError for a missing shard,
    ValueError for another size or hash or an unlisted shard (from a run killed half-way)."""
    folder = Path(folder)
    entries = manifest_shards(manifest)
    for e in entries:
        path = folder / e["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in its manifest.json is missing (run its stage again)")
        if path.stat().st_size != e.get("size"):
            raise ValueError(f"shard {path} is {path.stat().st_size} bytes, its manifest.json says {e.get('size')} "
                             f"(run its stage again)")
        if hash and file_sha256(path) != e["sha256"]:
            raise ValueError(f"shard {path} does not have the sha256 its manifest.json gives (run its stage again)")
    with os.scandir(folder) as it:
        extra = sorted({d.name for d in it if SHARD_NAME.fullmatch(d.name)} - {e["name"] for e in entries})
    if extra:
        raise ValueError(f"shard {folder / extra[0]} is not in its manifest.json (left by another run: "
                         f"run its stage again)")


def verify_shards(shards_dir: str | Path, hash: bool = True) -> dict:
    """The manifest of a shard (or saliency) folder whose files all match it, sizes and, with
    `hash`, sha256 included; else a one-line FileNotFoundError or ValueError naming the file."""
    manifest = read_manifest(shards_dir)
    check_shards(shards_dir, manifest, hash)
    return manifest


def read_shard(path: str | Path) -> Iterator[dict]:
    """Raw records (dict of key -> bytes, plus __key__) of one WebDataset tar, in stored order; an
    unreadable shard or a key stored twice is a one-line ValueError naming the shard.

    No node or worker splitting here: a reader hands each rank and worker its own shards."""
    def fail(e: Exception):
        raise ValueError(f"shard {path} is unreadable: {e.args[0] if e.args else type(e).__name__}") from None

    seen = set()
    for rec in wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None,
                              workersplitter=None, handler=fail):
        if rec["__key__"] in seen:
            raise ValueError(f"shard {path} holds key {rec['__key__']!r} twice")
        seen.add(rec["__key__"])
        yield rec


def decode_image(record: dict) -> Image.Image:
    """The record's image as 8-bit RGB (`to_rgb`)."""
    ext = next(k for k in IMAGE_KEYS if k in record)
    return to_rgb(Image.open(io.BytesIO(record[ext])))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. 8-bit modes convert as PIL converts them (grey, 1-bit, palette, CMYK;
    alpha dropped). Grey of more than 8 bits is scaled, where PIL would clip every value above 255
    to white: 16-bit (I;16*, and I, in which PIL opens some 16-bit files) from 0..65535, I beyond
    16 bits from 0..2^31-1, float (F) from 0..1, or 0..255 where a value passes 1 (PIL's own scale
    for F); values below 0 read 0."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        a = np.asarray(image, dtype=np.float64)
        top = a.max(initial=0)
        full = (1.0 if top <= 1 else 255.0) if image.mode == "F" else 65535.0 if top <= 65535 else 2.0 ** 31 - 1
        image = Image.fromarray(np.clip(np.rint(a * (255 / full)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


class Preprocess:
    """The geometry (resize, crop) of timm's eval transform for a data config, per image; the map gets
    the same geometry. To-tensor and the mean/std normalisation follow per batch
    (`spot.data.decoded.Decoded.batches`: the same arithmetic as timm's transform)."""

    def __init__(self, data_config: dict):
        import timm.data  # (imported here: stages that decode nothing never load them)
        from torchvision import transforms as T
        cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
               if k in data_config}
        steps = timm.data.create_transform(**cfg, is_training=False).transforms
        self.geometry = T.Compose(steps[:-2])                   # resize + crop; then to-tensor, normalise

    def pixels(self, image: Image.Image, saliency: Image.Image | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(3, H, W) uint8 image and (H, W) uint8 saliency levels (or None) after resize and crop."""
        x = np.asarray(self.geometry(image), dtype=np.uint8).transpose(2, 0, 1)
        if saliency is None:
            return x, None
        return x, np.asarray(self.geometry(saliency.convert("L").resize(image.size, Image.BILINEAR)), dtype=np.uint8)
