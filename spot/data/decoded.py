"""Decode once: every image resized and cropped for one geometry (input size, interpolation, crop),
with its saliency map under the same geometry, stored as uint8 arrays. Training, evaluate, oracle,
transfer, analyze and report read them as ready tensors: no JPEG decoding and no per-image Python
after this.

Folder `decoded/<geometry name>/`: `<split>-images.npy` (n, 3, H, W) uint8, `<split>-saliency.npy`
(n, H, W) uint8 (the map's 0..255 levels), `<split>-labels.npy` (n,) int64, `<split>-keys.npy` (n,)
str, and `decoded.json` {geometry, class_names (the shards', in label order), splits: {split:
{count, shards: [{name, count}]}}}. Rows follow the shards' order; the bytes are those of
`spot.data.loading.Preprocess` (tested).
"""
from __future__ import annotations

import io
import multiprocessing
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spot.core.devices import to_device
from spot.data.geometry import geometry
from spot.data.loading import Batch, Preprocess, class_names, decode_image, manifest_shards, read_shard, verify_shards
from spot.data.shards import default_workers
from spot.utils.io import atomic_path, read_json, write_json
from spot.utils.progress import Counted, progress

ARRAYS = ("images", "saliency", "labels", "keys")                 # <split>-<what>.npy of a decoded folder


def decode_shard(job: tuple) -> int:
    """Decode one image shard (and its saliency shard) into rows [start, start + count) of the
    arrays being written. Returns the count."""
    shard, saliency, data_config, paths, start = job
    pre = Preprocess(data_config)
    images = np.load(paths["images"], mmap_mode="r+")
    maps = np.load(paths["saliency"], mmap_mode="r+")
    smaps = read_shard(saliency)
    i = start
    for rec in read_shard(shard):
        srec = next(smaps, {"__key__": None})
        if srec["__key__"] != rec["__key__"]:
            raise ValueError(f"saliency shard {saliency} is out of step with {shard} at key {rec['__key__']}")
        images[i], maps[i] = pre.pixels(decode_image(rec), Image.open(io.BytesIO(srec["png"])))
        i += 1
    images.flush(), maps.flush()
    return i - start


def decode_split(shards_dir: Path, saliency_dir: Path, out: Path, split: str, entries: list[dict],
                 data_config: dict, workers: int) -> dict:
    """Write `<split>-*.npy` of `out` from the split's shards, `workers` processes at a time."""
    n = sum(e["count"] for e in entries)
    _, h, w = data_config["input_size"]
    labels, keys = [], []
    with atomic_path(out / f"{split}-images.npy") as img_tmp, atomic_path(out / f"{split}-saliency.npy") as sal_tmp:
        np.lib.format.open_memmap(img_tmp, mode="w+", dtype=np.uint8, shape=(n, 3, h, w)).flush()
        np.lib.format.open_memmap(sal_tmp, mode="w+", dtype=np.uint8, shape=(n, h, w)).flush()
        starts = np.cumsum([0] + [e["count"] for e in entries])[:-1]
        jobs = [(shards_dir / e["name"], saliency_dir / e["name"], data_config,
                 dict(images=img_tmp, saliency=sal_tmp), int(s)) for e, s in zip(entries, starts)]
        with progress(total=n, desc=f"decode {split}", unit="img") as bar:
            if workers > 1 and len(jobs) > 1:
                with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                    for count in pool.imap(decode_shard, jobs):
                        bar.update(count)
            else:
                for job in jobs:
                    bar.update(decode_shard(job))
        for e in entries:                                           # labels and keys without decoding
            for rec in read_shard(shards_dir / e["name"]):
                labels.append(int(rec["cls"]))
                keys.append(rec["__key__"])
    with atomic_path(out / f"{split}-labels.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(labels, dtype=np.int64))
    with atomic_path(out / f"{split}-keys.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(keys, dtype=str))
    return dict(count=n, shards=[dict(name=e["name"], count=e["count"]) for e in entries])


def write_decoded(shards_dir: str | Path, saliency_dir: str | Path, out_dir: str | Path, data_config: dict,
                  workers: int | None = None) -> dict:
    """Decode every split of `shards_dir` (with the maps of `saliency_dir`) for `data_config`'s
    geometry into `out_dir`; returns the index written as decoded.json."""
    shards_dir, saliency_dir, out = Path(shards_dir), Path(saliency_dir), Path(out_dir)
    manifest = verify_shards(shards_dir)               # (sha256 too: a damaged tar reads as a shorter one)
    verify_shards(saliency_dir)
    index = dict(geometry=geometry(data_config), class_names=class_names(manifest, shards_dir), splits={})
    for split, info in manifest["splits"].items():
        entries = [e for e in manifest_shards(manifest) if e in info["shards"]]
        index["splits"][split] = decode_split(shards_dir, saliency_dir, out, split, entries, data_config,
                                              workers or default_workers())
    write_json(out / "decoded.json", index)
    return index


class Decoded:
    """The decoded arrays of a folder, read as batches for a model's data config (its geometry must
    be the folder's: a one-line ValueError otherwise); `class_names[label]` names a label."""

    def __init__(self, folder: str | Path, data_config: dict):
        self.folder = Path(folder)
        self.index = read_json(self.folder / "decoded.json")
        if "class_names" not in self.index:
            raise ValueError(f"{self.folder / 'decoded.json'} names no classes (an older spot wrote it): run the shard "
                             "and decode stages again")
        self.class_names: list[str] = self.index["class_names"]
        if self.index["geometry"] != geometry(data_config):
            raise ValueError(f"{self.folder} holds images decoded for {self.index['geometry']}, not for the model's "
                             f"{geometry(data_config)}")
        self.mean = torch.as_tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)
        for split in self.index["splits"]:            # a damaged array stops the job here, before any work
            for what in ARRAYS:
                self.array(split, what)

    def require_head(self, num_classes: int) -> None:
        """A one-line ValueError unless a head of `num_classes` logits reads these labels: one logit
        per class of the source, in its order."""
        if num_classes != len(self.class_names):
            raise ValueError(f"the backbone's head has {num_classes} classes, the images' source {len(self.class_names)} "
                             f"({self.folder / 'decoded.json'}: class_names): check the config with spot validate")

    def array(self, split: str, what: str) -> np.ndarray:
        """The split's `what` array, memory-mapped; one that is not as the decode stage wrote it
        (unreadable, truncated, another row count than decoded.json's) is a one-line ValueError."""
        path = self.folder / f"{split}-{what}.npy"
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable array ({e}): run the decode stage again") from None
        if len(a) != (count := self.index["splits"][split]["count"]):
            raise ValueError(f"{path} holds {len(a)} rows, not decoded.json's {count}: run the decode stage again")
        return a

    def rows(self, split: str, shards: list[str] | None = None) -> list[range]:
        """Row ranges of the split's shards (all, or those named), in stored order."""
        entries = self.index["splits"][split]["shards"]
        starts = np.cumsum([0] + [e["count"] for e in entries])
        return [range(int(a), int(b)) for e, a, b in zip(entries, starts[:-1], starts[1:])
                if shards is None or e["name"] in shards]

    def batches(self, split: str, batch_size: int, limit: int | None = None, saliency: bool = False,
                shards: list[str] | None = None, order: np.ndarray | None = None, device=None,
                prefetch: int = 3) -> Counted:
        """`Batch`es (images normalised as timm does, labels, keys, saliency in [0, 1] or None) of the
        split's first `limit` rows (all if None); with `shards`, only theirs, each shard batched on its
        own; with `order`, those rows in that order (`train_rows`). A background thread reads up to
        `prefetch` batches ahead off the memory map (into page-locked memory for a CUDA `device`); on
        CUDA the uint8 pixels are copied without blocking and normalised there (the same arithmetic),
        otherwise batches stay on the CPU. Its `len` is the number of batches (a progress bar's total)."""
        images, labels, keys = self.array(split, "images"), self.array(split, "labels"), self.array(split, "keys")
        maps = self.array(split, "saliency") if saliency else None
        cuda = device is not None and torch.device(device).type == "cuda"
        mean, std = to_device(self.mean, device), to_device(self.std, device)
        if order is not None:
            chunks = [order[a:a + batch_size] for a in range(0, len(order), batch_size)]
        else:
            spans = self.rows(split, shards) if shards is not None else [range(len(labels) if limit is None
                                                                               else min(limit, len(labels)))]
            chunks = [slice(a, min(a + batch_size, s.stop)) for s in spans for a in range(s.start, s.stop, batch_size)]

        def host(rows: np.ndarray) -> torch.Tensor:
            out = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=cuda)
            out.numpy()[:] = rows                                            # one copy off the read-only map
            return out

        def read():
            for ix in chunks:
                yield (host(images[ix]), None if maps is None else host(maps[ix]),
                       torch.from_numpy(np.array(labels[ix])), [str(k) for k in keys[ix]])

        def batch(x, s, y, k) -> Batch:
            x = to_device(x, device)
            s = None if s is None else to_device(s, device).float() / 255
            return Batch(x.float().div_(255).sub_(mean).div_(std), y, k, s)

        return Counted((batch(*item) for item in prefetched(read(), prefetch)), len(chunks))


def rank_rows(spans: list[range], rank: int = 0, world: int = 1) -> np.ndarray:
    """The rows of DDP rank `rank` of `world`: its shards (`spans`, the rows of each), dealt in turn,
    in stored order."""
    return np.asarray([r for span in spans[rank::world] for r in span], dtype=np.int64)


def train_rows(spans: list[range], seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """A training epoch's rows for DDP rank `rank` of `world`: the shards (`spans`) shuffled from
    seed + epoch and dealt to the ranks, their rows streamed in stored order through a 1000-row
    buffer that draws from (seed, epoch): a shuffle that keeps reads near each other, and the same
    order for the same arguments whatever the device or a resume."""
    shards = list(spans)
    random.Random(seed + epoch).shuffle(shards)
    rng, buf, order = random.Random(seed * 1000003 + epoch), [], []
    for r in rank_rows(shards, rank, world).tolist():
        buf.append(r)
        if len(buf) >= 1000:
            order.append(buf.pop(rng.randrange(len(buf))))
    rng.shuffle(buf)
    return np.asarray(order + buf, dtype=np.int64)


def prefetched(items: Iterator, depth: int) -> Iterator:
    """The items of `items`, produced by a background thread up to `depth` ahead (numpy and torch
    copies release the GIL); its exceptions are raised here. depth 0: no thread."""
    if depth < 1:
        yield from items
        return
    q: queue.Queue = queue.Queue(depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
