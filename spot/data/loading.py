"""Read shards back as batches `(images, labels, keys, saliency)` with a backbone's preprocessing.

A shard folder is read only as its manifest.json lists it: a folder without one (never finished, or
being rewritten) or whose `<split>-NNNNNN.tar` files differ from the list (missing, another size,
not listed) is refused with a one-line error, as is a shard holding a key twice.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from spot.data.shards import SHARD_NAME

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
    return json.loads(path.read_text())


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


def shard_entries(shards_dir: str | Path, split: str) -> list[dict]:
    """The manifest entries (name, count, size, sha256) of a split's shards in order, or of the
    one shard `<split>.tar` if `split` names a shard (e.g. 'val-000003'), once the folder matches
    its manifest (`verify_shards` without hashing)."""
    splits = verify_shards(shards_dir, hash=False)["splits"]
    if split in splits:
        entries = splits[split]["shards"]
    else:
        entries = [e for v in splits.values() for e in v["shards"] if e["name"] == f"{split}.tar"]
    if not entries:
        raise FileNotFoundError(f"no {split} shards in {shards_dir} (its manifest.json has splits {', '.join(splits)})")
    return entries


def shard_paths(shards_dir: str | Path, split: str) -> list[Path]:
    """The paths of `shard_entries(shards_dir, split)`: `<shards_dir>/<split>-NNNNNN.tar` in order."""
    return [Path(shards_dir) / e["name"] for e in shard_entries(shards_dir, split)]


def saliency_paths(saliency_dir: str | Path, images: list[dict]) -> list[Path]:
    """The saliency shards of the image shards `images` (manifest entries), once the saliency folder
    matches its manifest and that lists maps made from these very shards (same name, count and
    image sha256); one-line errors otherwise."""
    maps = {e["name"]: e for e in verify_shards(saliency_dir, hash=False)["shards"]}
    for e in images:
        m = maps.get(e["name"])
        if m is None:
            raise FileNotFoundError(f"no saliency maps for shard {e['name']} in {saliency_dir} "
                                    f"(run the saliency stage)")
        if (m["count"], m.get("image_sha256")) != (e["count"], e["sha256"]):
            raise ValueError(f"saliency shard {Path(saliency_dir) / e['name']} was made from other image shards "
                             f"(run the saliency stage again)")
    return [Path(saliency_dir) / e["name"] for e in images]


def read_shard(path: str | Path) -> Iterator[dict]:
    """Raw records (dict of key -> bytes, plus __key__) of one WebDataset tar, in stored order; an
    unreadable shard or a key stored twice is a one-line ValueError naming the shard.

    No node or worker splitting here: `ShardStream` hands each rank and worker its own shards."""
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
    """timm eval preprocessing from a data config, split in two: the geometry (resize, crop) per
    image in the loader, to-tensor and mean/std normalisation per batch in `collate` (the same
    arithmetic as timm's transform, a fraction of its per-image cost). The saliency map gets the
    same geometry."""

    def __init__(self, data_config: dict):
        import timm.data  # (imported here: stages that decode nothing never load them)
        from torchvision import transforms as T
        cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
               if k in data_config}
        steps = timm.data.create_transform(**cfg, is_training=False).transforms
        self.geometry = T.Compose(steps[:-2])                   # resize + crop; then to-tensor, normalise
        self.mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)

    def pixels(self, image: Image.Image, saliency: Image.Image | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(3, H, W) uint8 image and (H, W) uint8 saliency levels (or None) after resize and crop."""
        x = np.asarray(self.geometry(image), dtype=np.uint8).transpose(2, 0, 1)
        if saliency is None:
            return x, None
        return x, np.asarray(self.geometry(saliency.convert("L").resize(image.size, Image.BILINEAR)), dtype=np.uint8)

    def __call__(self, image: Image.Image, saliency: Image.Image | None):
        """(3, H, W) uint8 image and (H, W) float32 saliency in [0, 1] (or None)."""
        x, s = self.pixels(image, saliency)
        return torch.from_numpy(x.copy()), None if s is None else torch.from_numpy(s.astype(np.float32) / 255.0)

    def collate(self, samples: list[tuple]) -> Batch:
        xs, ys, keys, sal = zip(*samples, strict=True)
        images = torch.stack(xs).float().div_(255).sub_(self.mean).div_(self.std)
        return Batch(images, torch.tensor(ys), list(keys), None if sal[0] is None else torch.stack(sal))


class ShardStream(torch.utils.data.IterableDataset):
    """Samples of a split's shards in stored order, split across DDP ranks and loader workers by shard."""

    def __init__(self, shards: list[Path], preprocess: Preprocess, saliency: list[Path] | None = None):
        super().__init__()
        self.shards, self.saliency, self.preprocess = shards, saliency, preprocess

    def my_shards(self) -> list[int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return list(range(len(self.shards)))[rank * nw + wid::world * nw]

    def samples(self, i: int) -> Iterator[tuple]:
        sal = read_shard(self.saliency[i]) if self.saliency else None
        for rec in read_shard(self.shards[i]):
            smap = None
            if sal is not None:
                srec = next(sal, {"__key__": None})
                if srec["__key__"] != rec["__key__"]:
                    raise ValueError(f"saliency shard {self.saliency[i]} is out of step with {self.shards[i]} "
                                     f"at key {rec['__key__']}")
                smap = Image.open(io.BytesIO(srec["png"]))
            x, s = self.preprocess(decode_image(rec), smap)
            yield x, int(rec["cls"]), rec["__key__"], s

    def __iter__(self):
        return (s for i in self.my_shards() for s in self.samples(i))


def make_loader(shards_dir: str | Path, split: str, data_config: dict, batch_size: int, num_workers: int = 0,
                saliency_dir: str | Path | None = None) -> torch.utils.data.DataLoader:
    """Batches of a split, decoded on the fly: `Batch(images (B,3,H,W), labels (B,), keys, saliency
    (B,H,W) or None)`, in stored order (the stages read `spot.data.decoded` arrays instead; this is
    their reference, and the loader to benchmark against).

    Preprocessing from `data_config` (timm: input_size, mean, std, interpolation, crop_pct); the
    saliency map from the parallel shard in `saliency_dir` goes through the same resize and crop.
    Both folders are checked against their manifests first (`shard_entries`, `saliency_paths`).
    Shards are split across workers (and DDP ranks).
    """
    entries = shard_entries(shards_dir, split)
    shards = [Path(shards_dir) / e["name"] for e in entries]
    saliency = None if saliency_dir is None else saliency_paths(saliency_dir, entries)
    preprocess = Preprocess(data_config)
    ds = ShardStream(shards, preprocess, saliency)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=min(num_workers, len(shards)),
                                       collate_fn=preprocess.collate, persistent_workers=False)
