"""The reference reader of the shards: every image decoded on the fly with timm's eval geometry, in
stored order. The stages read the decode stage's arrays instead (`spot.data.decoded`); the tests check
those arrays against this reader, and the benchmarks time the two side by side."""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spot.data.loading import Batch, Preprocess, decode_image, read_shard, verify_shards


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


def sample(preprocess: Preprocess, image: Image.Image, saliency: Image.Image | None):
    """(3, H, W) uint8 image and (H, W) float32 saliency in [0, 1] (or None)."""
    x, s = preprocess.pixels(image, saliency)
    return torch.from_numpy(x.copy()), None if s is None else torch.from_numpy(s.astype(np.float32) / 255.0)


def collate(data_config: dict):
    """Stack samples into a `Batch`, normalised per batch with the data config's mean and std."""
    mean = torch.as_tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def stack(samples: list[tuple]) -> Batch:
        xs, ys, keys, sal = zip(*samples, strict=True)
        images = torch.stack(xs).float().div_(255).sub_(mean).div_(std)
        return Batch(images, torch.tensor(ys), list(keys), None if sal[0] is None else torch.stack(sal))
    return stack


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
            x, s = sample(self.preprocess, decode_image(rec), smap)
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
                                       collate_fn=collate(data_config), persistent_workers=False)
