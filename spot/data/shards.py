"""Write a source's splits into WebDataset shards `<out>/<split>-NNNNNN.tar` plus `manifest.json`.

A split is cut into groups of `images_per_shard` consecutive samples. Each group becomes one shard (more
where it passes `shard_bytes`), written by one of `workers` processes under a temporary name, and
the shards are renamed to their numbers in order as their groups finish: the bytes depend on the
source and the parameters, never on `workers`.

The folder is complete or visibly not: the run holds its lock, removes manifest.json and run.json
before writing anything and writes them last; the manifest lists every shard with its size and
sha256 (readers check them, `spot.data.loading.verify_shards`), every source entry it left out and
why, the class names in label order and, per split, the classes whose folder holds no image.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import multiprocessing
import os
import re
import signal
import struct
import sys
import tarfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from spot.data.sources import Sample, Unreadable, make_source
from spot.utils.io import atomic_path, disk_full, no_space, remove_temporary, write_json, writing
from spot.utils.progress import progress

SHARD_NAME = re.compile(r"[A-Za-z0-9-]+-[0-9]{6,}\.tar")      # <split>-NNNNNN.tar


def check_image(sample: Sample) -> str | None:
    """None if PIL decodes the sample, else the reason it does not. A JPEG with its end-of-image
    marker in its last 64 bytes passes on its header (the fast path); any other file is decoded
    whole, so a JPEG with trailing bytes after its marker is kept and a truncated one is not."""
    if isinstance(sample.data, np.ndarray):
        return None
    try:
        with Image.open(io.BytesIO(sample.data)) as im:
            if im.format != "JPEG" or b"\xff\xd9" not in sample.data[-64:]:
                im.load()
    except UnidentifiedImageError:  # its message holds an object address: reasons must not vary by run
        return "not an image (no image format recognises it)"
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        return f"not a readable image: {type(e).__name__}: {e}"
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
    """A write-only file that hashes and counts what passes through it (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12x")  # one 512-byte tar header


def octal(n: int, width: int) -> bytes:
    """A tar numeric field: zero-padded octal, NUL-terminated."""
    return b"%0*o\0" % (width - 1, n)


def ustar_header(ti: tarfile.TarInfo) -> bytes | None:
    """The header tarfile writes for a regular file `ti` in PAX format, or None where that needs an
    extended header (a long or non-ASCII name, a number past its field)."""
    if not (ti.type == tarfile.REGTYPE and not ti.linkname and ti.name.isascii() and len(ti.name) <= 100
            and ti.uname.isascii() and ti.gname.isascii() and max(len(ti.uname), len(ti.gname)) <= 32
            and all(type(v) is int and 0 <= v < 8 ** 7 for v in (ti.uid, ti.gid))
            and all(type(v) is int and 0 <= v < 8 ** 11 for v in (ti.size, ti.mtime))):
        return None
    h = USTAR.pack(ti.name.encode(), octal(ti.mode & 0o7777, 8), octal(ti.uid, 8), octal(ti.gid, 8),
                   octal(ti.size, 12), octal(ti.mtime, 12), b" " * 8, ti.type, b"", tarfile.POSIX_MAGIC,
                   ti.uname.encode(), ti.gname.encode(), b"", b"", b"")
    return h[:148] + b"%06o\0" % sum(h) + h[155:]


class TarStream:
    """What webdataset's TarWriter uses of a tarfile (addfile, close), with the same bytes (tested):
    a header is one struct.pack (7 us; tarfile takes 25 us) and a member is written whole."""

    def __init__(self, f):
        self.f, self.offset = f, 0

    def addfile(self, ti: tarfile.TarInfo, fileobj) -> None:
        data = fileobj.read(ti.size)
        header = ustar_header(ti) or ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        pad = bytes(-len(data) % tarfile.BLOCKSIZE)
        for b in (header, data, pad):
            self.f.write(b)
        self.offset += len(header) + len(data) + len(pad)

    def close(self) -> None:
        """End of archive: two zero blocks, then zeros to a whole 10 KiB record."""
        end = 2 * tarfile.BLOCKSIZE
        self.f.write(bytes(end + (-(self.offset + end) % tarfile.RECORDSIZE)))


class ShardWriter(wds.TarWriter):
    """webdataset's TarWriter (its members, names, modes) writing through a TarStream to `f`."""

    def __init__(self, f, **kw):
        super().__init__(io.BytesIO(), **kw)
        self.stream, self.tarstream = f, TarStream(f)


class ShardFile:
    """A tar written record by record and hashed as it goes (mtime 0, fixed owner: byte-identical reruns)."""

    def __init__(self, path: Path):
        self.path, self.count, self.bytes, self.classes = path, 0, 0, Counter()
        self.file = open(path, "wb", buffering=1 << 22)
        self.out = HashingFile(self.file)
        self.writer = ShardWriter(self.out, mtime=0, user="spot", group="spot")

    def write(self, record: dict, label: int | None = None, nbytes: int = 0) -> None:
        """Append one record; `nbytes` (its image's size) and `label` go into the shard's totals."""
        self.writer.write(record)
        self.count, self.bytes = self.count + 1, self.bytes + nbytes
        if label is not None:
            self.classes[label] += 1

    def close(self) -> dict:
        """Finish the tar; return its path, record count, class counts, size (bytes) and sha256."""
        self.writer.close()
        self.file.close()
        return dict(path=str(self.path), count=self.count, classes=self.classes, size=self.out.size,
                    sha256=self.out.sha256.hexdigest())


def write_shard(path: Path, records: list[dict]) -> dict:
    """Write records to one tar atomically; return dict(size (bytes), sha256)."""
    with atomic_path(path) as tmp:
        shard = ShardFile(tmp)
        for r in records:
            shard.write(r)
        part = shard.close()
    return dict(size=part["size"], sha256=part["sha256"])


def write_group(source, shard_bytes: float, prefix: str) -> dict:
    """Check, encode and write every sample of `source` (a slice of a split) into tars `<prefix>-0`,
    `-1`, ..., a new one where the next image would pass `shard_bytes`. Returns dict(parts, skipped).
    A failure removes the group's tars; a full disk is one line naming the tar being written."""
    parts, skipped, shard = [], [], None
    try:
        for i in range(len(source)):
            try:
                sample = source[i]
            except Unreadable as e:
                skipped.append(e.entry)
                continue
            reason = check_image(sample)
            if reason:
                skipped.append(dict(key=sample.key, path=sample.meta.get("path", sample.key), reason=reason))
                continue
            rec = encode(sample)
            nbytes = len(rec[sample.ext])
            if shard is None or shard.bytes + nbytes > shard_bytes:
                if shard:
                    parts.append(shard.close())
                shard = ShardFile(Path(f"{prefix}-{len(parts)}"))
            shard.write(rec, sample.label, nbytes)
        if shard:
            parts.append(shard.close())
    except BaseException as e:
        for path in [p["path"] for p in parts] + ([shard.path] if shard else []):
            Path(path).unlink(missing_ok=True)
        if shard and disk_full(e, shard.path.parent):
            raise no_space(shard.path) from e
        raise
    return dict(parts=parts, skipped=skipped)


def _write_group(job: tuple) -> dict:
    return write_group(*job)


def _die_with_parent() -> None:
    """A writer process ends when the main process does: a killed run leaves no writer behind."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextmanager
def group_writer(workers: int):
    """A function: jobs -> write_group(*job) for each, in job order; here, or in `workers` processes.
    Its `stop()` ends the writer processes and waits for them."""
    if workers <= 1:
        def write(jobs):
            return map(_write_group, jobs)
        write.stop = lambda: None
        yield write
        return
    with multiprocessing.Pool(workers, initializer=_die_with_parent) as pool:
        def write(jobs):
            return pool.imap(_write_group, jobs)
        write.stop = lambda: (pool.terminate(), pool.join())
        yield write


def default_workers() -> int:
    """The CPUs this process may use (cgroups and SLURM narrow them), at most OMP_NUM_THREADS where
    that is set: Snakemake sets it to the job's threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, int(os.environ.get("OMP_NUM_THREADS") or cpus))


def check_keys(sources: dict) -> None:
    """A one-line ValueError naming both files where two samples of `sources` (split -> source)
    would get the same key; read before anything is written."""
    seen: dict[str, str] = {}
    for samples in sources.values():
        for key, origin in samples.listing():
            if key in seen:
                raise ValueError(f"{seen[key]} and {origin} would get the same key {key!r}: rename one")
            seen[key] = origin


def remove_unlisted(out: Path, names: set[str]) -> None:
    """Remove the shards of `out` not in `names`: left by an earlier run with other parameters (a
    killed run's temporary files go when the folder is taken, `spot.utils.io.writing`). Call while
    holding the folder's lock."""
    with os.scandir(out) as entries:
        stale = [e.name for e in entries if SHARD_NAME.fullmatch(e.name) and e.name not in names]
    for name in stale:
        (out / name).unlink()


def per_split(value, split: str):
    """`value` for `split`: its entry where `value` is a dict split -> value, else `value` itself."""
    return value.get(split) if isinstance(value, dict) else value


def write_shards(source: str, root: str | Path, out_dir: str | Path, splits=("train", "val"),
                 images_per_shard: int = 1000, shard_bytes: float = 1e9, max_per_class=None,
                 max_images=None, seed: int = 0, workers: int | None = None) -> dict:
    """Shard every split of `source` at `root` into `out_dir`; return the manifest.

    Shards hold at most `images_per_shard` images and about `shard_bytes` bytes; JPEG bytes are copied
    unchanged, arrays are encoded as PNG. Every entry of a split's folder is in a shard or in the
    manifest's `skipped` with the reason: unreadable, truncated or corrupt files, files the source
    cannot label (outside a class folder; in a folder that is not an ImageNet-1k class), folders
    and links inside class folders. The manifest's `class_names` name the labels; a split's
    `empty_classes` are the classes whose folder it holds without an image in the shards (also a
    warning line on stderr). `max_per_class` / `max_images` (an int, or a dict split -> int) pick a
    subset reproducible from `seed`. `workers` processes (default: `default_workers()`) write the
    shards; each is written under a temporary name and renamed when complete, and a rerun rewrites
    identical bytes. Two samples with one key stop the run before anything is written; so does
    another process writing `out_dir`. A failed run leaves no temporary file; a full disk is one line
    naming the tar being written.
    """
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard} (data.images_per_shard)")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0, got {shard_bytes} (data.shard_bytes)")
    out = Path(out_dir)
    manifest = dict(source=source, root=str(root), splits={}, skipped=[],
                    params=dict(images_per_shard=images_per_shard, shard_bytes=shard_bytes, seed=seed,
                                max_per_class=max_per_class, max_images=max_images))
    sources = {split: make_source(source, root, split, max_per_class=per_split(max_per_class, split),
                                  max_images=per_split(max_images, split), seed=seed)
               for split in splits}
    check_keys(sources)
    manifest["class_names"] = next(iter(sources.values())).class_names
    return _write_shards(sources, out, manifest, images_per_shard, shard_bytes, workers or default_workers())


def _write_shards(sources: dict, out: Path, manifest: dict, images_per_shard: int, shard_bytes: float,
                  workers: int) -> dict:
    with group_writer(workers) as write_groups, writing(out):  # pool first: no lock in it
        try:
            for split, samples in sources.items():
                manifest["skipped"] += samples.skipped
                jobs = ((samples[i:i + images_per_shard], shard_bytes, str(out / f".tmp-{split}-{g:06d}"))
                        for g, i in enumerate(range(0, len(samples), images_per_shard)))
                shards, classes = [], Counter()
                with progress(total=len(samples), desc=f"shard {split}", unit="img") as bar:
                    for group in write_groups(jobs):
                        for part in group["parts"]:
                            name = f"{split}-{len(shards):06d}.tar"
                            os.replace(part["path"], out / name)
                            shards.append(dict(name=name, count=part["count"], size=part["size"],
                                               sha256=part["sha256"]))
                            classes.update(part["classes"])
                        manifest["skipped"] += group["skipped"]
                        bar.update(sum(p["count"] for p in group["parts"]) + len(group["skipped"]))
                empty = [samples.class_names[c] for c in samples.present if not classes[c]]
                if empty:
                    print(f"warning: {split}: {len(empty)} class folder(s) without an image in the shards: "
                          f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} (manifest.json: empty_classes)",
                          file=sys.stderr)
                manifest["splits"][split] = dict(count=sum(s["count"] for s in shards), shards=shards,
                                                 classes={str(c): n for c, n in sorted(classes.items())},
                                                 empty_classes=empty)
            remove_unlisted(out, {s["name"] for v in manifest["splits"].values() for s in v["shards"]})
            write_json(out / "manifest.json", manifest)
        except BaseException:
            write_groups.stop()              # every writer gone, the lock still ours: no .tmp-* is left
            remove_temporary(out)
            raise
    return manifest
