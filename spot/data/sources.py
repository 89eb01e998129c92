"""Image sources behind one interface: each yields `Sample(key, data, ext, label, meta)`.

`data` is encoded bytes copied from the file (ext 'jpg', 'png', ...) or a uint8 array (ext 'png',
encoded when sharded). Keys are unique across splits and contain no '.' (WebDataset splits
extensions at the first dot).
"""
from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Iterator, NamedTuple

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


def make_key(split: str, name: str) -> str:
    """A WebDataset-safe key: '<split>_<name>' with dots and path separators replaced."""
    return f"{split}_{name}".replace(".", "_").replace("/", "_")


def subset(items: list, labels: list[int], max_per_class: int | None, max_images: int | None,
           seed: int) -> list[int]:
    """Indices of a reproducible subset: at most max_per_class per class, then max_images in all."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    seen: dict[int, int] = {}
    keep = []
    for i in order:
        if max_per_class is not None and seen.get(labels[i], 0) >= max_per_class:
            continue
        seen[labels[i]] = seen.get(labels[i], 0) + 1
        keep.append(i)
    keep = keep[:max_images] if max_images is not None else keep
    return sorted(keep)


def folder_files(root: Path, split: str, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files of `<root>/<split>/<class>/*` in sorted order, with their class indices."""
    files, labels = [], []
    for idx, cls in enumerate(classes):
        d = root / split / cls
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            if f.is_file():
                files.append(f)
                labels.append(idx)
    return files, labels


def iter_folder(root: Path, split: str, classes: list[str], names: list[str], max_per_class=None,
                max_images=None, seed: int = 0) -> Iterator[Sample]:
    """Samples from a class-per-folder tree; files are copied as they are (bad ones are caught by the writer)."""
    files, labels = folder_files(root, split, classes)
    for i in subset(files, labels, max_per_class, max_images, seed):
        f = files[i]
        ext = IMAGE_EXTS.get(f.suffix.lower(), f.suffix.lower().lstrip(".") or "bin")
        yield Sample(make_key(split, f"{classes[labels[i]]}_{f.stem}"), f.read_bytes(), ext, labels[i],
                     dict(path=str(f.relative_to(root)), class_name=names[labels[i]]))


def imagenet(root: Path, split: str, synset_words: str | None = None, **opts) -> Iterator[Sample]:
    """ImageNet layout `<root>/<split>/<wnid>/*.JPEG`; class index = position of the wnid in sorted
    order of `<root>/train` (else of `<root>/<split>`): the standard ImageNet-1k index of timm heads.
    `synset_words` (lines '<wnid> <names>') gives readable class names."""
    ref = root / "train" if (root / "train").is_dir() else root / split
    wnids = sorted(d.name for d in ref.iterdir() if d.is_dir())
    if synset_words:
        words = dict(line.strip().split(" ", 1) for line in Path(synset_words).read_text().splitlines() if line.strip())
        names = [words.get(w, w) for w in wnids]
    else:
        names = wnids
    yield from iter_folder(root, split, wnids, names, **opts)


def folder(root: Path, split: str, **opts) -> Iterator[Sample]:
    """Any `<root>/<split>/<class>/<image>` tree; classes in sorted order of `<root>/<split>`."""
    classes = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    yield from iter_folder(root, split, classes, classes, **opts)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file (the MNIST format) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


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


def fashion_mnist(root: Path, split: str, max_per_class=None, max_images=None, seed: int = 0) -> Iterator[Sample]:
    """Fashion-MNIST from IDX files; images are grey 28 x 28 uint8 arrays, stored as PNG."""
    images, labels = fashion_mnist_arrays(root, split)
    labels = labels.astype(int).tolist()
    for i in subset(images, labels, max_per_class, max_images, seed):
        yield Sample(make_key(split, f"{i:06d}"), images[i], "png", labels[i],
                     dict(index=i, class_name=FASHION_MNIST_CLASSES[labels[i]]))


SOURCES = {"imagenet": imagenet, "fashion-mnist": fashion_mnist, "folder": folder}


def make_source(name: str, root: str | Path, split: str, **opts) -> Iterator[Sample]:
    """Iterate the samples of one split of a source. Errors name the bad source, root or split."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (data.root)")
    if name == "fashion-mnist" and split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion-mnist has splits {', '.join(FASHION_MNIST_FILES)}, not {split!r}")
    if name != "fashion-mnist" and not (root / split).is_dir():
        raise FileNotFoundError(f"split folder {root / split} does not exist (data.splits)")
    return SOURCES[name](root, split, **opts)
