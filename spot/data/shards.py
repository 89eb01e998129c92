"""Write a source's splits into WebDataset shards `<out>/<split>-NNNNNN.tar` plus `manifest.json`."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from spot.data.sources import Sample, make_source
from spot.utils import atomic_path, write_json, write_run_record


def check_image(sample: Sample) -> str | None:
    """None if the sample is a readable image, else the reason it is not (header parse + end marker)."""
    if isinstance(sample.data, np.ndarray):
        return None
    try:
        with Image.open(io.BytesIO(sample.data)) as im:
            fmt = im.format
            if fmt != "JPEG":
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        return f"not a readable image: {type(e).__name__}: {e}"
    if fmt == "JPEG" and b"\xff\xd9" not in sample.data[-64:].rstrip(b"\x00"):
        return "truncated JPEG (no end-of-image marker)"
    return None


def encode(sample: Sample) -> dict:
    """WebDataset record: __key__, image bytes under its extension, cls, json metadata."""
    data = sample.data
    if isinstance(data, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(data).save(buf, format="PNG")
        data = buf.getvalue()
    return {"__key__": sample.key, sample.ext: data, "cls": str(sample.label).encode(),
            "json": dict(sample.meta, label=sample.label)}


class HashingFile:
    """A write-only file that hashes what passes through it (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)


def write_shard(path: Path, records: list[dict]) -> str:
    """Write records to one tar atomically (mtime 0, fixed owner: byte-identical reruns); return sha256.

    tarfile writes 10 KiB blocks: a 4 MiB buffer turns them into few system calls."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=1 << 22) as f:
            out = HashingFile(f)
            with wds.TarWriter(out, mtime=0, user="spot", group="spot") as w:
                for r in records:
                    w.write(r)
        return out.sha256.hexdigest()


def write_shards(source: str, root: str | Path, out_dir: str | Path, splits=("train", "val"),
                 shard_count: int = 1000, shard_bytes: float = 1e9, max_per_class=None,
                 max_images=None, seed: int = 0, synset_words: str | None = None) -> dict:
    """Shard every split of `source` at `root` into `out_dir`; return the manifest.

    Shards hold at most `shard_count` images and about `shard_bytes` bytes; JPEG bytes are copied
    unchanged, arrays are encoded as PNG. Unreadable or truncated files are skipped and listed in
    the manifest with the reason. `max_per_class` / `max_images` (an int, or a dict split -> int)
    pick a subset reproducible from `seed`. Each shard is written under a temporary name and renamed
    when complete; a rerun rewrites identical bytes.
    """
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count} (data.shard_count)")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0, got {shard_bytes} (data.shard_bytes)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_split = lambda v, split: v.get(split) if isinstance(v, dict) else v  # noqa: E731
    manifest = dict(source=source, root=str(root), splits={}, skipped=[],
                    params=dict(shard_count=shard_count, shard_bytes=shard_bytes, seed=seed,
                                max_per_class=max_per_class, max_images=max_images))
    opts = dict(synset_words=synset_words) if source == "imagenet" else {}
    sources = {split: make_source(source, root, split, max_per_class=per_split(max_per_class, split),
                                  max_images=per_split(max_images, split), seed=seed, **opts)
               for split in splits}
    for split, samples in sources.items():
        shards, classes, records, size = [], {}, [], 0

        def flush():
            name = f"{split}-{len(shards):06d}.tar"
            shards.append(dict(name=name, count=len(records), sha256=write_shard(out / name, records)))
            records.clear()

        for sample in tqdm(samples, desc=f"shard {split}", unit="img"):
            reason = check_image(sample)
            if reason:
                manifest["skipped"].append(dict(key=sample.key, path=sample.meta.get("path", sample.key), reason=reason))
                continue
            rec = encode(sample)
            nbytes = len(rec[sample.ext])
            if records and (len(records) >= shard_count or size + nbytes > shard_bytes):
                flush()
                size = 0
            records.append(rec)
            size += nbytes
            classes[sample.label] = classes.get(sample.label, 0) + 1
        if records:
            flush()
        manifest["splits"][split] = dict(count=sum(s["count"] for s in shards), shards=shards,
                                         classes={str(c): n for c, n in sorted(classes.items())})
    write_json(out / "manifest.json", manifest)
    counts = {f"{s}_images": v["count"] for s, v in manifest["splits"].items()}
    write_run_record(out, stage="shard", job="shard", params=dict(source=source, **manifest["params"]),
                     metrics=dict(counts, skipped=len(manifest["skipped"])), artifacts=["manifest.json"])
    return manifest
