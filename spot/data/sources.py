"""Image sources behind one interface: a sequence of `Sample(key, data, ext, label, meta)`, read
when indexed; a slice is a source of the same kind (the shard writer hands slices to its processes).

`data` is encoded bytes copied from the file (ext 'jpg', 'png', ...) or a uint8 array (ext 'png',
encoded when sharded). A key is '<split>_<name>' with the name escaped (`make_key`): unique across
splits, reversible (`split_key`), and free of '.' (WebDataset splits extensions at the first dot).
A folder sample's name is its path under the split folder ('<class>/<file>'), a Fashion-MNIST
sample's its 6-digit index. Files a source lists but cannot label are in its `skipped`.
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


def folder_files(root: Path, split: str, classes: list[str]) -> tuple[list[str], list[int], list[str]]:
    """The files of `<root>/<split>/<class>/` (paths relative to root) in sorted order with their
    class indices, and the other files of `<root>/<split>`: loose ones and those of folders that
    are not in `classes`. One directory listing per folder, no stat per file."""
    index = {cls: i for i, cls in enumerate(classes)}
    files, labels, others = [], [], []
    with os.scandir(root / split) as entries:
        top = sorted((e.name, e.is_dir()) for e in entries)
    for name, is_dir in top:
        if not is_dir:
            others.append(f"{split}/{name}")
            continue
        with os.scandir(root / split / name) as entries:
            paths = [f"{split}/{name}/{f}" for f in sorted(e.name for e in entries if e.is_file())]
        if name in index:
            files += paths
            labels += [index[name]] * len(paths)
        else:
            others += paths
    return files, labels, others


class FolderSource(Sequence):
    """Samples of a class-per-folder tree, each file read when its sample is taken (bad files are
    copied as they are; the shard writer catches them). A slice is a FolderSource of its files.

    The files are in a random order drawn from `seed`, not class by class, so that every shard mixes
    the classes: training's shuffle buffer (over a stream of shuffled shards) and the label-free
    placement stages (the train split in stored order) see batches of many classes, and each
    SPoT-ON part (every parts-th shard) is a sample of all the classes.

    Files of the split outside a class folder are in `skipped` (dicts key, path, reason), never
    silently dropped; `classes_from` is the folder whose subfolders are the classes (for the reason).
    """

    def __init__(self, root: Path, split: str, classes: list[str], names: list[str], classes_from: Path,
                 max_per_class=None, max_images=None, seed: int = 0):
        files, labels, others = folder_files(root, split, classes)
        self.root, self.split, self.classes, self.names = str(root), split, classes, names
        self.items = [(files[i], labels[i]) for i in subset(files, labels, max_per_class, max_images, seed)]
        self.skipped = [dict(key=self.key(path), path=path, reason=outside_reason(path, classes_from))
                        for path in others]

    def key(self, path: str) -> str:
        """The key of the file at `path` ('<split>/<class>/<file>', relative to the root)."""
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
        with open(os.path.join(self.root, path), "rb") as f:
            data = f.read()
        return Sample(self.key(path), data, IMAGE_EXTS.get(suffix, suffix.lstrip(".") or "bin"), label,
                      dict(path=path, class_name=self.names[label]))


def outside_reason(path: str, classes_from: Path) -> str:
    """Why a file at `path` ('<split>/<name>' or '<split>/<folder>/<name>') has no class."""
    parts = path.split("/")
    if len(parts) == 2:
        return "not in a class folder"
    return f"no class index: folder {parts[1]} is not a class (the classes are the folders of {classes_from})"


def imagenet(root: Path, split: str, synset_words: str | None = None, **opts) -> FolderSource:
    """ImageNet layout `<root>/<split>/<wnid>/*.JPEG`; class index = position of the wnid in sorted
    order of `<root>/train` (else of `<root>/<split>`): the standard ImageNet-1k index of timm heads.
    `synset_words` (lines '<wnid> <names>') gives readable class names. Images of a wnid missing
    from `<root>/train` are skipped, with that reason."""
    ref = root / "train" if (root / "train").is_dir() else root / split
    wnids = sorted(d.name for d in ref.iterdir() if d.is_dir())
    if synset_words:
        words = dict(line.strip().split(" ", 1) for line in Path(synset_words).read_text().splitlines() if line.strip())
        names = [words.get(w, w) for w in wnids]
    else:
        names = wnids
    return FolderSource(root, split, wnids, names, ref, **opts)


def folder(root: Path, split: str, **opts) -> FolderSource:
    """Any `<root>/<split>/<class>/<image>` tree; classes in sorted order of `<root>/<split>`."""
    classes = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    return FolderSource(root, split, classes, classes, root / split, **opts)


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
    a FashionMNIST of its images."""

    def __init__(self, root: Path, split: str, max_per_class=None, max_images=None, seed: int = 0):
        images, labels = fashion_mnist_arrays(root, split)
        self.split, self.skipped = split, []
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


def make_source(name: str, root: str | Path, split: str, **opts) -> Sequence[Sample]:
    """The samples of one split of a source, in a fixed order. Errors name the bad source, root or split."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}")
    if not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split name {split!r} may hold only letters, digits and '-' (data.splits)")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (data.root)")
    if name == "fashion-mnist" and split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion-mnist has splits {', '.join(FASHION_MNIST_FILES)}, not {split!r}")
    if name != "fashion-mnist" and not (root / split).is_dir():
        raise FileNotFoundError(f"split folder {root / split} does not exist (data.splits)")
    return SOURCES[name](root, split, **opts)
