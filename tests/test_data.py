import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spot.data.loading import make_loader, read_shard, shard_paths
from spot.data.shards import write_shards
from spot.data.sources import fashion_mnist_arrays, make_source
from spot.saliency import saliency_maps, write_saliency
from tests.conftest import FASHION_MNIST

CFG = dict(input_size=(3, 64, 64), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875,
           crop_mode="center")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory, imagenet_sample=None):
    """The shared ImageNet JPEGs in `<root>/<split>/<wnid>/`, plus a corrupt and a truncated file."""
    from tests.conftest import IMAGENET_SAMPLE
    root = tmp_path_factory.mktemp("imagenet")
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))
    assert len(files) >= 100
    for i, f in enumerate(files[:60]):
        wnid = f.name.split("_")[0]
        split = "val" if i % 4 == 0 else "train"
        for s in ("train", "val"):
            (root / s / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / split / wnid / f"{wnid}_{i}.JPEG")
    wnid = files[1].name.split("_")[0]
    (root / "train" / wnid / "corrupt.JPEG").write_bytes(b"this is not an image")
    data = files[2].read_bytes()
    (root / "train" / wnid / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def imagenet_shards(imagenet_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, write_shards("imagenet", imagenet_root, out, shard_count=16)


def test_imagenet_shards_keep_bytes_labels_and_skip_bad_files(imagenet_root, imagenet_shards):
    out, manifest = imagenet_shards
    wnids = sorted(d.name for d in (imagenet_root / "train").iterdir())
    stored = {}
    for split in ("train", "val"):
        for p in shard_paths(out, split):
            for rec in read_shard(p):
                stored[rec["__key__"]] = rec
    good = [f for f in sorted(imagenet_root.rglob("*.JPEG")) if f.stem not in ("corrupt", "truncated")]
    assert len(stored) == len(good) == sum(s["count"] for s in manifest["splits"].values())
    for f in good:
        split, wnid = f.parts[-3], f.parts[-2]
        rec = stored[f"{split}_{wnid}_{f.stem}".replace(".", "_")]
        assert rec["jpg"] == f.read_bytes()
        assert int(rec["cls"]) == wnids.index(wnid)
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"corrupt.JPEG", "truncated.JPEG"}
    assert "truncated" in skipped["truncated.JPEG"]
    for s in manifest["splits"]["train"]["shards"]:
        assert s["count"] <= 16
    for split in manifest["splits"].values():                       # the manifest's hash is the file's
        for s in split["shards"]:
            assert s["sha256"] == hashlib.sha256((out / s["name"]).read_bytes()).hexdigest(), s["name"]


def test_shards_do_not_depend_on_workers_and_keep_the_byte_limit(imagenet_root, tmp_path):
    """One process or three: the same shard bytes and manifest; shards split where they would pass
    shard_bytes, never past shard_count."""
    kw = dict(shard_count=10, shard_bytes=400_000)
    one = write_shards("imagenet", imagenet_root, tmp_path / "one", workers=1, **kw)
    three = write_shards("imagenet", imagenet_root, tmp_path / "three", workers=3, **kw)
    assert one == three
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "three").glob("*.tar"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
    for name in names:
        recs = list(read_shard(tmp_path / "one" / name))
        assert len(recs) <= 10 and (sum(len(r["jpg"]) for r in recs) <= 400_000 or len(recs) == 1)
    groups = sum(len(range(0, len(make_source("imagenet", imagenet_root, split)), 10)) for split in ("train", "val"))
    assert len(names) > groups                                      # the byte limit split groups
    assert sum(s["count"] for split in one["splits"].values() for s in split["shards"]) == len(
        [f for f in imagenet_root.rglob("*.JPEG")]) - 2


def test_default_workers_follow_the_cpus_and_snakemake_threads(monkeypatch):
    from spot.data.shards import default_workers
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_workers() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                       # Snakemake: the job's threads
    assert default_workers() == 1


def test_shard_writer_writes_the_bytes_of_webdatasets_tar_writer():
    """ShardWriter's fast headers equal tarfile's, long and non-ASCII names (PAX headers) included."""
    import webdataset as wds
    from spot.data.shards import ShardWriter
    records = [{"__key__": "a", "jpg": b"x" * 1000, "cls": b"3", "json": {"p": 1}},
               {"__key__": "b" * 120, "png": b"", "cls": b"1", "json": {"p": 2}},
               {"__key__": "caf\u00e9_k", "jpg": b"y" * 512, "cls": b"0", "json": {}},
               {"__key__": "c" * 96, "jpg": bytes(range(256)) * 40, "cls": b"12", "json": {"q": [1, 2]}}]
    tars = []
    for writer in (wds.TarWriter, ShardWriter):
        buf = io.BytesIO()
        with writer(buf, mtime=0, user="spot", group="spot") as w:
            for r in records:
                w.write(r)
        tars.append(buf.getvalue())
    assert tars[0] == tars[1]
    with tarfile.open(fileobj=io.BytesIO(tars[1])) as t:
        assert [m.name for m in t.getmembers()][:3] == ["a.cls", "a.jpg", "a.json"]
        assert t.extractfile("c" * 96 + ".jpg").read() == bytes(range(256)) * 40


def test_reading_yields_rgb_tensors_in_fixed_order(imagenet_shards):
    out, manifest = imagenet_shards
    batches = list(make_loader(out, "train", CFG, batch_size=8))
    assert all(b.images.shape[1:] == (3, 64, 64) and b.images.dtype == torch.float32 for b in batches)
    assert sum(len(b.keys) for b in batches) == manifest["splits"]["train"]["count"]
    again = [k for b in make_loader(out, "train", CFG, batch_size=5) for k in b.keys]
    assert [k for b in batches for k in b.keys] == again


def test_loader_preprocessing_equals_timm_transform(imagenet_root, imagenet_shards):
    """Batched normalisation gives exactly what timm's eval transform gives image by image."""
    import timm.data
    out, _ = imagenet_shards
    b = next(iter(make_loader(out, "val", CFG, batch_size=6)))
    ref = timm.data.create_transform(**CFG, is_training=False)
    source = {r["__key__"]: json.loads(r["json"])["path"] for p in shard_paths(out, "val") for r in read_shard(p)}
    expected = torch.stack([ref(Image.open(imagenet_root / source[k]).convert("RGB")) for k in b.keys])
    torch.testing.assert_close(b.images, expected, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True])
def test_loader_workers_read_every_sample_once(imagenet_shards, train):
    """Two loader workers split the shards between them: together they read each sample exactly once."""
    out, manifest = imagenet_shards
    keys = [k for b in make_loader(out, "train", CFG, batch_size=8, num_workers=2, train=train) for k in b.keys]
    assert len(shard_paths(out, "train")) >= 2
    assert len(keys) == len(set(keys)) == manifest["splits"]["train"]["count"]


def test_greyscale_and_cmyk_jpegs_read_as_rgb(tmp_path):
    root = tmp_path / "src"
    for i, mode in enumerate(("L", "CMYK", "RGB")):
        d = root / "val" / f"c{i}"
        d.mkdir(parents=True)
        Image.new(mode, (40, 30)).save(d / f"im{i}.jpg", quality=90)
        (root / "train" / f"c{i}").mkdir(parents=True)
        Image.new(mode, (40, 30)).save(root / "train" / f"c{i}" / "a.jpg")
    write_shards("folder", root, tmp_path / "out")
    b = next(iter(make_loader(tmp_path / "out", "val", CFG, batch_size=3)))
    assert b.images.shape == (3, 3, 64, 64)


def test_fashion_mnist_counts():
    for split, n in (("train", 60000), ("val", 10000)):
        _, labels = fashion_mnist_arrays(FASHION_MNIST, split)
        assert len(labels) == n
        assert np.bincount(labels).tolist() == [n // 10] * 10


def test_fashion_mnist_subset_shards_and_rerun_is_byte_identical(tmp_path):
    kw = dict(max_per_class={"train": 30, "val": 10}, shard_count=100, seed=3)
    m1 = write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "a", **kw)
    m2 = write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "b", **kw)
    assert m1["splits"]["train"]["count"] == 300 and m1["splits"]["val"]["count"] == 100
    assert set(m1["splits"]["train"]["classes"].values()) == {30}
    for p in sorted((tmp_path / "a").glob("*.tar")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    assert m1["splits"] == m2["splits"]
    m3 = write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "a", **dict(kw, shard_count=1000))
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == sorted(   # no stale shards left
        s["name"] for split in m3["splits"].values() for s in split["shards"]) == ["train-000000.tar", "val-000000.tar"]


def test_killed_run_then_rerun_equals_clean_run(tmp_path):
    """Two writer processes killed with their main process; the rerun equals a one-process run."""
    kw = dict(max_per_class={"train": 600, "val": 10}, shard_count=200)
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "clean", workers=1, **kw)
    code = (f"from spot.data.shards import write_shards; write_shards('fashion-mnist', '{FASHION_MNIST}', "
            f"'{tmp_path / 'killed'}', max_per_class={kw['max_per_class']}, shard_count=200, workers=2)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob("train-000001.tar")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    for p in (tmp_path / "killed").glob("*.tar"):  # whatever is there under a final name is complete
        with tarfile.open(p) as t:
            assert len(t.getmembers()) > 0
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "killed", workers=2, **kw)
    clean = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name != "run.json") == [c for c in clean if c != "run.json"]
    for name in clean:
        if name.endswith(".tar") or name == "manifest.json":
            assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_saliency_one_map_per_key_in_order(tmp_path):
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "s", max_per_class={"train": 5, "val": 5}, shard_count=20)
    m = write_saliency(tmp_path / "s", tmp_path / "sal", size=32)
    for s in m["shards"]:
        img_keys = [r["__key__"] for r in read_shard(tmp_path / "s" / s["name"])]
        sal = list(read_shard(tmp_path / "sal" / s["name"]))
        assert [r["__key__"] for r in sal] == img_keys
        assert all(Image.open(io.BytesIO(r["png"])).size == (32, 32) for r in sal)
    assert (tmp_path / "sal" / "preview.png").stat().st_size > 1000
    cfg = dict(CFG, input_size=(3, 28, 28), crop_pct=1.0)
    b = next(iter(make_loader(tmp_path / "s", "val", cfg, batch_size=4, saliency_dir=tmp_path / "sal")))
    assert b.saliency.shape == (4, 28, 28) and 0 <= b.saliency.min() and b.saliency.max() <= 1


@pytest.mark.parametrize("y,x", [(40, 10), (5, 50), (28, 28)])
def test_saliency_peaks_on_the_bright_square(y, x):
    img = torch.full((1, 3, 64, 64), 0.3)
    img[:, :, y:y + 8, x:x + 8] = 1.0
    s = saliency_maps(img, size=64)[0]
    r, c = divmod(int(s.argmax()), 64)
    assert y - 2 <= r < y + 10 and x - 2 <= c < x + 10


@pytest.mark.parametrize("call,match", [
    (lambda t: write_shards("imagenet", t / "missing", t / "o"), "missing"),
    (lambda t: write_shards("cifar", t, t / "o"), "cifar"),
    (lambda t: write_shards("fashion-mnist", FASHION_MNIST, t / "o", shard_count=0), "shard_count"),
    (lambda t: list(make_source("fashion-mnist", t, "train")), "dataset-fashion-mnist"),
])
def test_bad_parameters_give_one_line_errors(tmp_path, call, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        call(tmp_path)
    assert "\n" not in str(e.value)
