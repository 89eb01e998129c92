"""Image sources behind one interface: a sequence of `Sample(key, data, ext, label, meta)`, read
when indexed; a slice is a source of the same kind (the shard writer hands slices to its processes).

`data` is encoded bytes copied from the file (ext 'jpg', 'png', ...) or a uint8 array (ext 'png',
encoded when sharded). A key is '<split>_<name>' with the name escaped (`make_key`): unique across
splits, reversible (`split_key`), and free of '.' (WebDataset splits extensions at the first dot).
A folder sample's name is its path under the split folder ('<class>/<file>'), a Fashion-MNIST
sample's its 6-digit index. Every entry of a split that is not a sample (not an image file of a
class folder, or unreadable) is in the source's `skipped` with the reason.
"""
from __future__ import annotations

import copy
import gzip
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from spot.data.imagenet import SOURCE as IMAGENET_SOURCE
from spot.data.imagenet import imagenet_classes

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".gif": "gif",
              ".webp": "webp", ".tif": "tiff", ".tiff": "tiff", ".ppm": "ppm"}
FASHION_MNIST_FILES = {"train": "train", "val": "t10k"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


class Sample(NamedTuple):
    key: str
    data: bytes | np.ndarray
    ext: str
    label: int
    meta: dict


SPLIT_NAME = re.compile(r"[A-Za-z0-9-]+")
ESCAPED = re.compile(r"(?:[A-Za-z0-9-]|_[0-9a-f]{2})*")


class Escapes(dict):
    """`str.translate` table of `escape`: ASCII letters, digits and '-' stay, any other character
    becomes its UTF-8 bytes as '_xx' (lowercase hex; undecodable file-name bytes included)."""

    def __missing__(self, code: int) -> str:
        ch = chr(code)
        keep = ch.isascii() and (ch.isalnum() or ch == "-")
        self[code] = ch if keep else "".join(f"_{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
        return self[code]


ESCAPES = Escapes()


def escape(text: str) -> str:
    """`text` in [A-Za-z0-9-] and '_xx' escapes: no '.', and `unescape` gives `text` back."""
    return text.translate(ESCAPES)


def unescape(text: str) -> str:
    """The inverse of `escape`; a one-line ValueError for text `escape` cannot have made."""
    if not ESCAPED.fullmatch(text):
        raise ValueError(f"{text!r} is not an escaped name ([A-Za-z0-9-] and '_xx' only)")
    first, *rest = text.split("_")
    data = first.encode() + b"".join(bytes.fromhex(part[:2]) + part[2:].encode() for part in rest)
    return data.decode("utf-8", "surrogateescape")


def make_key(split: str, name: str) -> str:
    """A WebDataset-safe key '<split>_<escaped name>'; `split` is letters, digits and '-' (see
    `make_source`), so `split_key` takes it apart again."""
    return f"{split}_{escape(name)}"


def split_key(key: str) -> tuple[str, str]:
    """(split, name) of a key made by `make_key`."""
    split, _, name = key.partition("_")
    return split, unescape(name)


def subset(items: list, labels: list[int], max_per_class: int | None, max_images: int | None,
           seed: int) -> list[int]:
    """Indices of a reproducible subset (at most max_per_class per class, then max_images in all), in
    a random order drawn from `seed`."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    seen: dict[int, int] = {}
    keep = []
    for i in order:
        if max_per_class is not None and seen.get(labels[i], 0) >= max_per_class:
            continue
        seen[labels[i]] = seen.get(labels[i], 0) + 1
        keep.append(i)
    return keep[:max_images] if max_images is not None else keep


def entry_kind(entry: os.DirEntry) -> str:
    """'file' (a regular file, or a link to one), 'dir' (a folder, or a link to one), or why the
    entry is neither: a stat only for entries that are not plain files or folders."""
    try:
        if entry.is_file():
            return "file"
        if entry.is_dir():
            return "dir"
        return "a broken symbolic link" if entry.is_symlink() else "not a regular file (a pipe, socket or device)"
    except OSError as e:                             # e.g. a symbolic link loop (ELOOP)
        return f"unreadable entry: {e.strerror or e}"


def scan(folder: Path) -> list[tuple[str, str]]:
    """(name, `entry_kind`) of every entry of `folder`, sorted by name: one directory listing."""
    with os.scandir(folder) as entries:
        return sorted((e.name, entry_kind(e)) for e in entries)


def folder_classes(folder: Path) -> list[str]:
    """The names of the folders in `folder`, sorted: the classes of a class-per-folder tree."""
    return [name for name, kind in scan(folder) if kind == "dir"]


class Listing(NamedTuple):
    files: list[str]                    # '<split>/<class>/<file>' of every file in a class folder, sorted
    labels: list[int]                   # their class indices
    skipped: list[tuple[str, str]]      # (path, reason) of every other entry of the split
    present: list[int]                  # the classes with a folder in the split


def folder_files(root: Path, split: str, classes: list[str], not_a_class: str) -> Listing:
    """Every entry of `<root>/<split>` and of its folders, accounted for: the files of the class
    folders (`classes`) with their indices, and (path, reason) of the rest: loose files, the files
    of folders that are not classes (`not_a_class` says why), folders inside class folders (named
    like images or not: their contents are not read), links that are broken or loop, entries that
    cannot be read. One directory listing per folder, no stat per plain file."""
    index = {cls: i for i, cls in enumerate(classes)}
    files, labels, skipped, present = [], [], [], []
    for name, kind in scan(root / split):
        path = f"{split}/{name}"
        if kind == "file":
            skipped.append((path, "not in a class folder"))
            continue
        if kind != "dir":
            skipped.append((path, kind))
            continue
        try:
            inside = scan(root / path)
        except OSError as e:
            skipped.append((path, f"unreadable folder: {e.strerror or e}"))
            continue
        label = index.get(name)
        if label is not None:
            present.append(label)
        for f, k in inside:
            if label is None:
                skipped.append((f"{path}/{f}", f"folder {name} is not a class ({not_a_class})"))
            elif k == "file":
                files.append(f"{path}/{f}")
                labels.append(label)
            else:
                skipped.append((f"{path}/{f}", "a folder, not an image file (its contents are not read)"
                                if k == "dir" else k))
    return Listing(files, labels, skipped, present)


class Unreadable(Exception):
    """A listed file that cannot be read when its sample is taken; `entry` is its `skipped` record."""

    def __init__(self, key: str, path: str, reason: str):
        super().__init__(reason)
        self.entry = dict(key=key, path=path, reason=reason)


class FolderSource(Sequence):
    """Samples of a class-per-folder tree, each file read when its sample is taken (bad files are
    copied as they are; the shard writer catches them, and a file that cannot be opened raises
    `Unreadable`). A slice is a FolderSource of its files.

    The files are in a random order drawn from `seed`, not class by class, so that every shard mixes
    the classes: training's shuffle buffer (over a stream of shuffled shards) and the label-free
    placement stages (the train split in stored order) see batches of many classes, and each
    SPoT-ON part (every parts-th shard) is a sample of all the classes.

    `classes` are the folder names in label order, `class_names` what people read for them. Every
    other entry of the split is in `skipped` (dicts key, path, reason), never silently dropped;
    `not_a_class` says why a folder outside `classes` is not one. `present`: the labels whose folder
    the split holds.
    """

    def __init__(self, root: Path, split: str, classes: list[str], class_names: list[str], not_a_class: str,
                 max_per_class=None, max_images=None, seed: int = 0):
        listing = folder_files(root, split, classes, not_a_class)
        self.root, self.split, self.class_names, self.present = str(root), split, class_names, listing.present
        self.items = [(listing.files[i], listing.labels[i])
                      for i in subset(listing.files, listing.labels, max_per_class, max_images, seed)]
        self.skipped = [dict(key=self.key(path), path=path, reason=reason) for path, reason in listing.skipped]

    def key(self, path: str) -> str:
        """The key of the entry at `path` ('<split>/<class>/<file>', relative to the root)."""
        return make_key(self.split, path.split("/", 1)[1])

    def listing(self) -> list[tuple[str, str]]:
        """(key, path) of every sample, in order, without reading a file."""
        return [(self.key(path), path) for path, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            part = copy.copy(self)
            part.items = self.items[i]
            return part
        path, label = self.items[i]
        suffix = os.path.splitext(path)[1].lower()
        try:
            with open(os.path.join(self.root, path), "rb") as f:
                data = f.read()
        except OSError as e:
            raise Unreadable(self.key(path), path, f"unreadable: {e.strerror or e}") from None
        return Sample(self.key(path), data, IMAGE_EXTS.get(suffix, suffix.lstrip(".") or "bin"), label,
                      dict(path=path, class_name=self.class_names[label]))


def imagenet(root: Path, split: str, **opts) -> FolderSource:
    """ImageNet layout `<root>/<split>/<wnid>/*.JPEG`, labelled with timm's ImageNet-1k index
    (`spot.data.imagenet`: the logits of a pretrained 1 000-class head) whatever subset of the
    wnids is present, named by their descriptions. Folders that are not ImageNet-1k wnids are skipped."""
    wnids, names = imagenet_classes()
    return FolderSource(root, split, wnids, names, f"not an ImageNet-1k wnid of {IMAGENET_SOURCE}", **opts)


def folder(root: Path, split: str, **opts) -> FolderSource:
    """Any `<root>/<split>/<class>/<image>` tree, labelled 0..N-1: the folders of `<root>/train` (else
    of `<root>/<split>`) in sorted order, so that every split numbers the classes alike."""
    ref = class_folder(root, split)
    classes = folder_classes(ref)
    return FolderSource(root, split, classes, classes, f"the classes are the folders of {ref}", **opts)


def class_folder(root: Path, split: str = "train") -> Path:
    """The folder whose subfolders are a folder source's classes: `<root>/train`, else `<root>/<split>`."""
    return root / "train" if (root / "train").is_dir() else root / split


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file (the MNIST format) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)  # writable


def fashion_mnist_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) from the IDX files in `root`, else torchvision."""
    stem = FASHION_MNIST_FILES[split]
    paths = [next((p for p in (root / f"{stem}-{kind}-ubyte.gz", root / f"{stem}-{kind}-ubyte",
                               root / "FashionMNIST" / "raw" / f"{stem}-{kind}-ubyte") if p.is_file()), None)
             for kind in ("images-idx3", "labels-idx1")]
    if None not in paths:
        return read_idx(paths[0]), read_idx(paths[1])
    try:
        from torchvision.datasets import FashionMNIST
        ds = FashionMNIST(str(root), train=split == "train", download=True)
        return ds.data.numpy(), ds.targets.numpy().astype(np.uint8)
    except Exception as e:  # noqa: BLE001 - any download failure ends in the same advice
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {root} and torchvision could not download them "
            f"({type(e).__name__}); "
            "install them with 'apt-get install dataset-fashion-mnist' (files in "
            "/usr/share/datasets/fashion-mnist) or run once with network access") from None


class FashionMNIST(Sequence):
    """Fashion-MNIST from IDX files; images are grey 28 x 28 uint8 arrays, stored as PNG. A slice is
    a FashionMNIST of its images. `class_names`, `present` and `skipped` as a FolderSource's."""

    def __init__(self, root: Path, split: str, max_per_class=None, max_images=None, seed: int = 0):
        images, labels = fashion_mnist_arrays(root, split)
        self.split, self.skipped = split, []
        self.class_names, self.present = FASHION_MNIST_CLASSES, list(range(len(FASHION_MNIST_CLASSES)))
        ids = sorted(subset(images, labels.tolist(), max_per_class, max_images, seed))   # the files' order: mixed
        self.ids = np.array(ids, dtype=np.int64)
        self.images, self.labels = images[self.ids], labels[self.ids].astype(int)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            part = copy.copy(self)
            part.ids, part.images, part.labels = self.ids[i], self.images[i], self.labels[i]
            return part
        idx, label = int(self.ids[i]), int(self.labels[i])
        return Sample(self.key(idx), self.images[i], "png", label,
                      dict(index=idx, class_name=FASHION_MNIST_CLASSES[label]))

    def key(self, idx: int) -> str:
        """'<split>_<6-digit index>': downstream random positions are seeded from it, keep it."""
        return make_key(self.split, f"{idx:06d}")

    def listing(self) -> list[tuple[str, str]]:
        """(key, origin) of every sample, in order."""
        stem = FASHION_MNIST_FILES[self.split]
        return [(self.key(idx), f"{stem} image {idx}") for idx in self.ids.tolist()]


SOURCES = {"imagenet": imagenet, "fashion-mnist": FashionMNIST, "folder": folder}


def source_classes(name: str, root: str | Path) -> list[str]:
    """The class names of source `name` at `root` in label order (a head needs one logit each),
    without listing any image."""
    if name == "imagenet":
        return imagenet_classes()[1]
    if name == "folder":
        return folder_classes(class_folder(Path(root)))
    return list(FASHION_MNIST_CLASSES)


def make_source(name: str, root: str | Path, split: str, **opts) -> Sequence[Sample]:
    """The samples of one split of a source, in a fixed order. Errors name the bad source, root or split."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}")
    if not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split name {split!r} may hold only letters, digits and '-' (data.splits)")
    if problem := split_problem(name, Path(root), split):
        key, message, kind = problem
        raise kind(f"{key}: {message}")
    return SOURCES[name](Path(root), split, **opts)


def split_problem(name: str, root: Path, split: str) -> tuple[str, str, type[Exception]] | None:
    """(config key, problem, error type) where source `name` has no split `split` at `root` (no root, no
    split folder, not a Fashion-MNIST split), else None: `make_source` and preflight refuse it."""
    if not root.is_dir():
        return "data.root", f"folder {root} does not exist", FileNotFoundError
    if name == "fashion-mnist" and split not in FASHION_MNIST_FILES:
        return "data.splits", f"fashion-mnist has splits {', '.join(FASHION_MNIST_FILES)}, not {split!r}", ValueError
    if name != "fashion-mnist" and not (root / split).is_dir():
        return "data.root", f"split folder {root / split} does not exist (data.splits: {split})", FileNotFoundError
    return None
