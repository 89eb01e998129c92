"""Read shards back as batches `(images, labels, keys, saliency)` with a backbone's preprocessing."""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import timm.data
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp", "bmp", "gif", "tiff", "ppm")


class Batch(NamedTuple):
    images: torch.Tensor            # (B, 3, H, W) float32, normalised
    labels: torch.Tensor            # (B,) int64
    keys: list[str]
    saliency: torch.Tensor | None   # (B, H, W) float32 in [0, 1], aligned with images


def shard_paths(shards_dir: str | Path, split: str) -> list[Path]:
    """Sorted `<shards_dir>/<split>-NNNNNN.tar` (or the one shard `<split>.tar` if `split` names a
    shard, e.g. 'val-000003'); FileNotFoundError naming the folder if none."""
    one = Path(shards_dir) / f"{split}.tar"
    paths = [one] if one.is_file() else sorted(Path(shards_dir).glob(f"{split}-[0-9]*.tar"))
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {shards_dir}")
    return paths


def read_shard(path: str | Path) -> Iterator[dict]:
    """Raw records (dict of key -> bytes, plus __key__) of one WebDataset tar, in stored order.

    No node or worker splitting here: `ShardStream` hands each rank and worker its own shards."""
    yield from wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)


def decode_image(record: dict) -> Image.Image:
    """The record's image as RGB (grey, palette and CMYK images are converted)."""
    ext = next(k for k in IMAGE_KEYS if k in record)
    return Image.open(io.BytesIO(record[ext])).convert("RGB")


class Preprocess:
    """timm eval preprocessing from a data config, split in two: the geometry (resize, crop) per
    image in the loader, to-tensor and mean/std normalisation per batch in `collate` (the same
    arithmetic as timm's transform, a fraction of its per-image cost). The saliency map gets the
    same geometry."""

    def __init__(self, data_config: dict):
        cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
               if k in data_config}
        steps = timm.data.create_transform(**cfg, is_training=False).transforms
        self.geometry = T.Compose(steps[:-2])                   # resize + crop; then to-tensor, normalise
        self.mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, image: Image.Image, saliency: Image.Image | None):
        """(3, H, W) uint8 image and (H, W) float32 saliency in [0, 1] (or None)."""
        x = torch.from_numpy(np.asarray(self.geometry(image), dtype=np.uint8).copy()).permute(2, 0, 1)
        if saliency is None:
            return x, None
        s = self.geometry(saliency.convert("L").resize(image.size, Image.BILINEAR))
        return x, torch.from_numpy(np.asarray(s, dtype=np.float32) / 255.0)

    def collate(self, samples: list[tuple]) -> Batch:
        xs, ys, keys, sal = zip(*samples)
        images = torch.stack(xs).float().div_(255).sub_(self.mean).div_(self.std)
        return Batch(images, torch.tensor(ys), list(keys), None if sal[0] is None else torch.stack(sal))


class ShardStream(torch.utils.data.IterableDataset):
    """Samples of a split's shards, split across DDP ranks and loader workers by shard.

    Evaluation (`train=False`): shards in order, samples in stored order. Training: shard order and
    a 1000-sample buffer shuffled from `seed` and the epoch (call `set_epoch`).
    """

    def __init__(self, shards: list[Path], preprocess: Preprocess, saliency: list[Path] | None = None,
                 train: bool = False, seed: int = 0):
        super().__init__()
        self.shards, self.saliency, self.preprocess = shards, saliency, preprocess
        self.train, self.seed, self.epoch = train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        order = list(range(len(self.shards)))
        if self.train:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order[rank * nw + wid::world * nw]

    def samples(self, i: int) -> Iterator[tuple]:
        sal = read_shard(self.saliency[i]) if self.saliency else None
        for rec in read_shard(self.shards[i]):
            smap = None
            if sal is not None:
                srec = next(sal)
                if srec["__key__"] != rec["__key__"]:
                    raise ValueError(f"saliency shard {self.saliency[i]} is out of step with {self.shards[i]} "
                                     f"at key {rec['__key__']}")
                smap = Image.open(io.BytesIO(srec["png"]))
            x, s = self.preprocess(decode_image(rec), smap)
            yield x, int(rec["cls"]), rec["__key__"], s

    def __iter__(self):
        stream = (s for i in self.my_shards() for s in self.samples(i))
        if not self.train:
            yield from stream
            return
        rng, buf = random.Random(self.seed * 1000003 + self.epoch), []
        for s in stream:
            buf.append(s)
            if len(buf) >= 1000:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf


def make_loader(shards_dir: str | Path, split: str, data_config: dict, batch_size: int, train: bool = False,
                num_workers: int = 0, seed: int = 0, saliency_dir: str | Path | None = None) -> torch.utils.data.DataLoader:
    """Batches of a split: `Batch(images (B,3,H,W), labels (B,), keys, saliency (B,H,W) or None)`.

    Preprocessing from `data_config` (timm: input_size, mean, std, interpolation, crop_pct); the
    saliency map from the parallel shard in `saliency_dir` goes through the same resize and crop.
    Shards are split across workers (and DDP ranks); evaluation order is fixed. For training,
    the loader's `.dataset.set_epoch(e)` reshuffles.
    """
    shards = shard_paths(shards_dir, split)
    saliency = None
    if saliency_dir is not None:
        saliency = [Path(saliency_dir) / p.name for p in shards]
        missing = [str(p) for p in saliency if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"saliency shard {missing[0]} is missing (run the saliency stage)")
    preprocess = Preprocess(data_config)
    ds = ShardStream(shards, preprocess, saliency, train=train, seed=seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=min(num_workers, len(shards)),
                                       collate_fn=preprocess.collate, persistent_workers=False)
