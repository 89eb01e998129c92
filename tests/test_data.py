import hashlib
import io
import json
import os
import re
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
from timm.data import ImageNetInfo

from spot.core.saliency import saliency_maps
from spot.data.loading import decode_image, read_shard, verify_shards
from spot.data.saliency import write_saliency
from spot.data.shards import check_image, write_shard, write_shards
from spot.data.sources import Sample, escape, fashion_mnist_arrays, make_key, make_source, split_key, unescape
from spot.data.stream import make_loader, shard_paths
from tests.conftest import FASHION_MNIST, IMAGENET_SAMPLE, smoke_config

CFG = dict(input_size=(3, 64, 64), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875,
           crop_mode="center")
TRAILER = bytes(range(256)) * 4                                     # 1 KB after the JPEG's end marker
UNKNOWN_WNID = "n09999999"                                          # a val folder missing from train/


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """The repo's test photos copied into `<root>/<split>/<wnid>/` (8 wnids, 48 train and 12 val
    files), plus the odd files: corrupt, truncated, 1 KB after the end marker (kept), a val wnid
    missing from train/, a val file outside any class folder."""
    root = tmp_path_factory.mktemp("imagenet")
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))
    assert len(files) == 8 and sum(f.stat().st_size for f in files) < 400_000
    for i in range(60):
        f = files[i % 8]
        wnid = f.name.split("_")[0]
        split = "val" if i % 5 == 0 else "train"
        for s in ("train", "val"):
            (root / s / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / split / wnid / f"{wnid}_{i}.JPEG")
    wnid = files[1].name.split("_")[0]
    (root / "train" / wnid / "corrupt.JPEG").write_bytes(b"this is not an image")
    data = files[2].read_bytes()
    (root / "train" / wnid / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (root / "train" / wnid / "trailer.JPEG").write_bytes(files[0].read_bytes() + TRAILER)
    (root / "val" / UNKNOWN_WNID).mkdir()
    shutil.copy(files[3], root / "val" / UNKNOWN_WNID / "unknown.JPEG")
    shutil.copy(files[4], root / "val" / "loose.JPEG")
    return root


@pytest.fixture(scope="module")
def imagenet_shards(imagenet_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, write_shards("imagenet", imagenet_root, out, images_per_shard=16)


def test_imagenet_shards_keep_bytes_labels_and_skip_bad_files(imagenet_root, imagenet_shards):
    """Every file of the tree is in a shard (same bytes, key from its path) or skipped with a reason.
    Labels are timm's ImageNet-1k index of the wnid (the 8 wnids here are classes 0, 13, 21, ... of
    the 1 000, not 0..7), names its descriptions."""
    out, manifest = imagenet_shards
    wnids, names = ImageNetInfo().label_names(), ImageNetInfo().label_descriptions()
    stored = {}
    for split in ("train", "val"):
        for p in shard_paths(out, split):
            for rec in read_shard(p):
                stored[rec["__key__"]] = rec
    files = sorted(f for f in imagenet_root.rglob("*") if f.is_file())
    bad = ("corrupt.JPEG", "truncated.JPEG", "unknown.JPEG", "loose.JPEG")
    good = [f for f in files if f.name not in bad]
    assert len(stored) == len(good) == sum(s["count"] for s in manifest["splits"].values())
    assert len(files) == len(stored) + len(manifest["skipped"])     # every image accounted for
    for f in good:
        split, wnid = f.parts[-3], f.parts[-2]
        rec = stored[make_key(split, f"{wnid}/{f.name}")]
        assert rec["jpg"] == f.read_bytes()
        assert int(rec["cls"]) == wnids.index(wnid)
        assert json.loads(rec["json"])["class_name"] == names[wnids.index(wnid)]
    assert manifest["class_names"] == names
    assert next(imagenet_root.glob("train/*/trailer.JPEG")).read_bytes().endswith(TRAILER)
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(bad)
    assert "truncated" in skipped["truncated.JPEG"]
    assert UNKNOWN_WNID in skipped["unknown.JPEG"] and "not an ImageNet-1k wnid" in skipped["unknown.JPEG"]
    assert skipped["loose.JPEG"] == "not in a class folder"
    for s in manifest["splits"]["train"]["shards"]:
        assert s["count"] <= 16
    for split in manifest["splits"].values():                       # the manifest's size and hash are the file's
        for s in split["shards"]:
            data = (out / s["name"]).read_bytes()
            assert (s["size"], s["sha256"]) == (len(data), hashlib.sha256(data).hexdigest()), s["name"]
    assert verify_shards(out) == manifest


def test_shards_do_not_depend_on_workers_and_keep_the_byte_limit(imagenet_root, tmp_path):
    """One process or three: the same shard bytes and manifest; shards split where they would pass
    shard_bytes, never past images_per_shard."""
    kw = dict(images_per_shard=10, shard_bytes=30_000)
    one = write_shards("imagenet", imagenet_root, tmp_path / "one", workers=1, **kw)
    three = write_shards("imagenet", imagenet_root, tmp_path / "three", workers=3, **kw)
    assert one == three
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "three").glob("*.tar"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
    for name in names:
        recs = list(read_shard(tmp_path / "one" / name))
        assert len(recs) <= 10 and (sum(len(r["jpg"]) for r in recs) <= 30_000 or len(recs) == 1)
    groups = sum(len(range(0, len(make_source("imagenet", imagenet_root, split)), 10)) for split in ("train", "val"))
    assert len(names) > groups                                      # the byte limit split groups
    assert sum(s["count"] for split in one["splits"].values() for s in split["shards"]) + len(one["skipped"]) == len(
        [f for f in imagenet_root.rglob("*") if f.is_file()])


def test_folder_shards_mix_the_classes_in_an_order_drawn_from_the_seed(imagenet_root, tmp_path):
    """A folder tree lists its classes one after another; its shards must not (a training shuffle
    buffer draws from a stream of shards). The same files for every seed, another order for
    another seed; Fashion-MNIST keeps its files' (already mixed) order."""
    def shards(seed):
        out = tmp_path / str(seed)
        write_shards("imagenet", imagenet_root, out, images_per_shard=6, seed=seed)
        return [[(r["__key__"], int(r["cls"])) for r in read_shard(p)] for p in shard_paths(out, "train")]
    zero, one = shards(0), shards(1)
    assert all(len({c for _, c in s}) >= 3 for s in zero if len(s) == 6)      # 6 of 8 classes: sorted gives 1 or 2
    assert sorted(x for s in zero for x in s) == sorted(x for s in one for x in s) and zero != one
    ids = make_source("fashion-mnist", FASHION_MNIST, "val", max_per_class=5, seed=3).ids
    assert len(ids) == 50 and (np.diff(ids) > 0).all()


NAMES = ["a.b.c.jpg", "a_b_c.jpg", "x.jpg", "x.png", "x.JPEG", "x.jpeg", "a.b/x.jpg", "a_b/x.jpg",
         "cat/x_y.jpg", "cat_x/y.jpg", "_5f.jpg", "caf\u00e9 au lait%20.jpg", "\u65e5\u672c/\udcff.jpg"]


def test_keys_are_unique_reversible_and_free_of_dots():
    """Names the old keys merged get keys of their own, each turned back into its name; a
    Fashion-MNIST key is still '<split>_<6-digit index>' (random positions are seeded from it)."""
    keys = [make_key("val", n) for n in NAMES]
    assert len(set(keys)) == len(NAMES)
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_") for k in keys)
    assert [split_key(k) for k in keys] == [("val", n) for n in NAMES]
    assert [unescape(escape(n)) for n in NAMES] == NAMES
    assert make_key("train", "n01440764/n01440764_10026.JPEG") == "train_n01440764_2fn01440764_5f10026_2eJPEG"
    with pytest.raises(ValueError, match="not an escaped name"):
        unescape("a_zz")
    fm = make_source("fashion-mnist", FASHION_MNIST, "val", max_images=3, seed=5)
    assert [s.key for s in fm] == [k for k, _ in fm.listing()] == [f"val_{i:06d}" for i in fm.ids.tolist()]
    assert make_source("fashion-mnist", FASHION_MNIST, "train")[123].key == "train_000123"


def test_folder_keys_keep_file_names_apart(tmp_path):
    """A tree of names the old keys merged: every file stored once, under the key of its path."""
    photo = (IMAGENET_SAMPLE / "n01882714_koala.JPEG").read_bytes()
    for split in ("train", "val"):
        for name in NAMES[:10]:
            path = tmp_path / "src" / split / (name if "/" in name else f"c/{name}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(photo)
    m = write_shards("folder", tmp_path / "src", tmp_path / "out")
    for split in ("train", "val"):
        recs = [r for p in shard_paths(tmp_path / "out", split) for r in read_shard(p)]
        paths = sorted(str(p.relative_to(tmp_path / "src" / split)) for p in (tmp_path / "src" / split).rglob("*")
                       if p.is_file())
        assert sorted(split_key(r["__key__"]) for r in recs) == [(split, p) for p in paths]
        assert all(json.loads(r["json"])["path"] == "/".join(split_key(r["__key__"])) for r in recs)
    assert m["skipped"] == [] and m["splits"]["val"]["count"] == 10


def test_a_key_collision_stops_before_anything_is_written(tmp_path, monkeypatch):
    """With the old lossy keys a.b.c.jpg and a_b_c.jpg collide: one line naming both, no output."""
    for split in ("train", "val"):
        for name in ("a.b.c.jpg", "a_b_c.jpg"):
            (tmp_path / "src" / split / "c").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "src" / split / "c" / name)
    monkeypatch.setattr("spot.data.sources.make_key",
                        lambda split, name: f"{split}_{name}".replace(".", "_").replace("/", "_"))
    with pytest.raises(ValueError, match="a.b.c.jpg and .*a_b_c.jpg would get the same key") as e:
        write_shards("folder", tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_reading_a_shard_with_a_key_twice_fails_naming_shard_and_key(tmp_path):
    rec = lambda key: {"__key__": key, "cls": b"0", "json": {}}
    for keys, match in ((["a", "b", "a"], "holds key 'a' twice"), (["a", "a"], "a.cls: duplicate file name")):
        path = tmp_path / f"s{len(keys)}.tar"
        write_shard(path, [rec(k) for k in keys])
        with pytest.raises(ValueError, match=f"shard {path} .*{match}") as e:
            list(read_shard(path))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("cut", [0.5, 0.9, -2, -30])
def test_a_jpeg_with_trailing_bytes_is_kept_a_truncated_one_skipped(cut):
    """The end marker is looked for in the last 64 bytes; without it the file is decoded whole."""
    data = (IMAGENET_SAMPLE / "n01440764_tench.JPEG").read_bytes()
    assert data.endswith(b"\xff\xd9") and b"\xff\xd9" not in (data + TRAILER)[-64:]
    sample = lambda b: Sample("k", b, "jpg", 0, {})
    assert check_image(sample(data + TRAILER)) is None
    cut = int(len(data) * cut) if isinstance(cut, float) else len(data) + cut
    assert "truncated" in check_image(sample(data[:cut]))


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


def test_loader_workers_read_every_sample_once(imagenet_shards):
    """Two loader workers split the shards between them: together they read each sample exactly once."""
    out, manifest = imagenet_shards
    keys = [k for b in make_loader(out, "train", CFG, batch_size=8, num_workers=2) for k in b.keys]
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


def entries(root: Path) -> list[str]:
    """Every entry of each split folder and of its folders ('<split>/<name>[/<name>]'), links not followed."""
    out = []
    for split in os.scandir(root):
        for e in os.scandir(split.path):
            out.append(f"{split.name}/{e.name}")
            if e.is_dir(follow_symlinks=False):
                out += [f"{split.name}/{e.name}/{f.name}" for f in os.scandir(e.path)]
    return out


def test_every_entry_of_a_tree_is_a_sample_or_skipped_with_a_reason(tmp_path):
    """A symbolic link loop, a folder named like an image, a link to '.', a broken link and a pipe in
    a class folder, and a loop beside the class folders: each is in `skipped` with its reason, the
    rest is sharded (a link to an image is an image); nothing stops the job, nothing vanishes."""
    root = tmp_path / "src"
    jpeg = IMAGENET_SAMPLE / "n01440764_tench.JPEG"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            shutil.copy(jpeg, root / split / cls / "one.JPEG")
    a = root / "train" / "a"
    (a / "loop.JPEG").symlink_to("loop.JPEG")
    (a / "x.JPEG").mkdir()
    shutil.copy(jpeg, a / "x.JPEG" / "inside.JPEG")
    (a / "self").symlink_to(".")
    (a / "broken.JPEG").symlink_to("nowhere.JPEG")
    os.mkfifo(a / "pipe.JPEG")
    (a / "link.JPEG").symlink_to(a / "one.JPEG")
    (root / "train" / "toploop").symlink_to("toploop")
    manifest = write_shards("folder", root, tmp_path / "out", workers=1)
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped == {"train/a/loop.JPEG": "unreadable entry: Too many levels of symbolic links",
                       "train/a/x.JPEG": "a folder, not an image file (its contents are not read)",
                       "train/a/self": "a folder, not an image file (its contents are not read)",
                       "train/a/broken.JPEG": "a broken symbolic link",
                       "train/a/pipe.JPEG": "not a regular file (a pipe, socket or device)",
                       "train/toploop": "unreadable entry: Too many levels of symbolic links"}
    stored = {split_key(r["__key__"])[1] for split in ("train", "val") for p in shard_paths(tmp_path / "out", split)
              for r in read_shard(p)}
    assert stored == {"a/one.JPEG", "a/link.JPEG", "b/one.JPEG"}
    listed = [e for e in entries(root) if e.count("/") == 2 or e in skipped]     # files, and what is skipped whole
    assert len(listed) == manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] + len(skipped)


def test_a_file_that_cannot_be_read_when_sharded_is_skipped_with_the_reason(tmp_path):
    """A file listed, then gone (or unreadable) when its group is written, is skipped with the OS's reason."""
    from spot.data.shards import write_group
    root = tmp_path / "src"
    (root / "train" / "a").mkdir(parents=True)
    for name in ("one.JPEG", "two.JPEG"):
        shutil.copy(IMAGENET_SAMPLE / "n01440764_tench.JPEG", root / "train" / "a" / name)
    source = make_source("folder", root, "train")
    (root / "train" / "a" / "two.JPEG").unlink()
    group = write_group(source, 1e9, str(tmp_path / "part"))
    assert group["skipped"] == [dict(key=make_key("train", "a/two.JPEG"), path="train/a/two.JPEG",
                                     reason="unreadable: No such file or directory")]
    assert group["parts"][0]["count"] == 1


def test_empty_class_folders_are_reported_and_folder_labels_come_from_train(tmp_path, capsys):
    """A class folder without an image in the shards (empty, or only a corrupt file) keeps its label,
    and is named in the manifest's `empty_classes` and in a warning line; a folder source numbers its
    classes 0..N-1 from train/, so val's labels are train's, and a val folder that is not a train
    class is skipped."""
    root = tmp_path / "src"
    jpeg = IMAGENET_SAMPLE / "n01440764_tench.JPEG"
    for path in ("train/a", "train/b", "train/empty", "train/corrupt", "val/b", "val/empty", "val/extra"):
        (root / path).mkdir(parents=True)
    for path in ("train/a/1.jpg", "train/b/1.jpg", "val/b/1.jpg", "val/extra/1.jpg"):
        shutil.copy(jpeg, root / path)
    (root / "train" / "corrupt" / "1.jpg").write_bytes(b"not an image")
    manifest = write_shards("folder", root, tmp_path / "out", workers=1)
    err = capsys.readouterr().err
    val = [r for p in shard_paths(tmp_path / "out", "val") for r in read_shard(p)]
    assert [(split_key(r["__key__"])[1], int(r["cls"])) for r in val] == [("b/1.jpg", 1)]
    assert manifest["class_names"] == ["a", "b", "corrupt", "empty"]
    assert manifest["splits"]["train"]["empty_classes"] == ["corrupt", "empty"]
    assert manifest["splits"]["val"]["empty_classes"] == ["empty"]
    assert "warning: train: 2 class folder(s) without an image in the shards: corrupt, empty" in err
    assert "warning: val: 1 class folder(s) without an image in the shards: empty" in err
    assert {s["path"]: s["reason"] for s in manifest["skipped"]}["val/extra/1.jpg"] == \
        f"folder extra is not a class (the classes are the folders of {root / 'train'})"


def mode_images(g: np.ndarray) -> dict:
    """mode -> (file name, image in that mode, expected 8-bit RGB) for a grey 8-bit picture `g`: modes
    of more than 8 bits hold g on their full scale (so the expected pixels are g's), 8-bit modes
    expect PIL's own conversion of the stored file."""
    grey = np.stack([g] * 3, -1)
    rgba = np.dstack([grey[..., 0], 255 - grey[..., 1], grey[..., 2] // 2, grey[..., 0]])
    return {
        "I;16": ("i16.png", Image.fromarray(g.astype(np.uint16) * 257), grey),
        "I": ("i32.tif", Image.fromarray(g.astype(np.int32) * 257), grey),
        "F": ("f.tif", Image.fromarray(g.astype(np.float32) / 255), grey),
        "F255": ("f255.tif", Image.fromarray(g.astype(np.float32)), grey),
        "L": ("l.png", Image.fromarray(g), None),
        "1": ("bw.png", Image.fromarray(g).convert("1"), None),
        "LA": ("la.png", Image.fromarray(rgba[..., [0, 3]], "LA"), None),
        "P": ("p.png", Image.fromarray(rgba[..., :3]).convert("P"), None),
        "RGBA": ("rgba.png", Image.fromarray(rgba, "RGBA"), None),
        "CMYK": ("cmyk.tif", Image.fromarray(rgba, "RGBA").convert("CMYK"), None),
        "CMYK-JPEG": ("cmyk.jpg", Image.fromarray(rgba, "RGBA").convert("CMYK"), None),
    }


def test_every_pil_mode_decodes_to_8bit_rgb_scaled_not_clipped(tmp_path):
    """Each PIL mode a file may open in, sharded and decoded as the decode and saliency stages do
    (`decode_image`): a 16-bit, 32-bit or float grey image gives the 8-bit picture it holds on its
    full scale (not 98 % white), every 8-bit mode what PIL's convert('RGB') gives."""
    rng = np.random.default_rng(0)
    g = np.concatenate([np.tile(np.arange(256, dtype=np.uint8), (8, 1)), rng.integers(0, 256, (8, 256), np.uint8)])
    root = tmp_path / "src"
    images = mode_images(g)
    for split in ("train", "val"):
        for mode, (name, image, _) in images.items():
            (root / split / mode.replace(";", "-")).mkdir(parents=True)
            image.save(root / split / mode.replace(";", "-") / name)
    assert {Image.open(root / "val" / m.replace(";", "-") / n).mode for m, (n, _, _) in images.items()} >= \
        {"I;16", "I", "F", "L", "1", "LA", "P", "RGBA", "CMYK"}
    manifest = write_shards("folder", root, tmp_path / "out", workers=1)
    assert manifest["skipped"] == []
    got = {split_key(r["__key__"])[1]: decode_image(r) for p in shard_paths(tmp_path / "out", "val") for r in read_shard(p)}
    for mode, (name, _, expected) in images.items():
        path = f"{mode.replace(';', '-')}/{name}"
        if expected is None:
            expected = np.asarray(Image.open(root / "val" / path).convert("RGB"))
        assert got[path].mode == "RGB", mode
        np.testing.assert_array_equal(np.asarray(got[path]), expected, err_msg=mode)


def test_fashion_mnist_counts():
    for split, n in (("train", 60000), ("val", 10000)):
        _, labels = fashion_mnist_arrays(FASHION_MNIST, split)
        assert len(labels) == n
        assert np.bincount(labels).tolist() == [n // 10] * 10


def test_fashion_mnist_subset_shards_and_rerun_is_byte_identical(tmp_path):
    kw = dict(max_per_class={"train": 30, "val": 10}, images_per_shard=100, seed=3)
    m1 = write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "a", **kw)
    m2 = write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "b", **kw)
    assert m1["splits"]["train"]["count"] == 300 and m1["splits"]["val"]["count"] == 100
    assert set(m1["splits"]["train"]["classes"].values()) == {30}
    for p in sorted((tmp_path / "a").glob("*.tar")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    assert m1["splits"] == m2["splits"]
    m3 = write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "a", **dict(kw, images_per_shard=1000))
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == sorted(   # no stale shards left
        s["name"] for split in m3["splits"].values() for s in split["shards"]) == ["train-000000.tar", "val-000000.tar"]


@pytest.mark.stage
def test_killed_run_then_rerun_equals_clean_run(tmp_path):
    """A run over a complete folder (other parameters), its two writer processes killed with their
    main process: readers refuse the half-written folder in one line, a second writer could not
    start while it ran, and the rerun equals a one-process run."""
    kw = dict(max_per_class={"train": 600, "val": 10}, images_per_shard=200)
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "clean", workers=1, **kw)
    old = dict(max_per_class={"train": 30, "val": 10}, images_per_shard=1000)
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "killed", **old)
    code = (f"from spot.data.shards import write_shards; write_shards('fashion-mnist', '{FASHION_MNIST}', "
            f"'{tmp_path / 'killed'}', max_per_class={kw['max_per_class']}, images_per_shard=200, workers=2)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob("train-000001.tar")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)                                # midway, for certain
    with pytest.raises(RuntimeError, match="another spot process is writing") as e:
        write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "killed", **old)
    assert "\n" not in str(e.value)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists() and not (tmp_path / "killed" / "run.json").exists()
    for read in (lambda: shard_paths(tmp_path / "killed", "train"), lambda: verify_shards(tmp_path / "killed"),
                 lambda: make_loader(tmp_path / "killed", "val", CFG, batch_size=4)):
        with pytest.raises(FileNotFoundError, match="manifest.json is missing") as e:
            read()
        assert "\n" not in str(e.value)
    for p in (tmp_path / "killed").glob("*.tar"):  # whatever is there under a final name is complete
        with tarfile.open(p) as t:
            assert len(t.getmembers()) > 0
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "killed", workers=2, **kw)
    clean = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name != "run.json") == [
        c for c in clean if c != "run.json"]
    for name in clean:
        if name.endswith(".tar") or name == "manifest.json":
            assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    verify_shards(tmp_path / "killed")


def test_a_second_writer_stops_in_one_line_and_leaves_nothing(tmp_path):
    """While another process holds the folder, write_shards and write_saliency stop in one line
    and change nothing in it."""
    shards, out = tmp_path / "shards", tmp_path / "out"
    write_shards("fashion-mnist", FASHION_MNIST, shards, max_per_class=5, images_per_shard=20)
    shutil.copytree(shards, out)
    code = (f"import time; from spot.utils.io import writing\n"
            f"with writing({str(out)!r}):\n print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        for call in (lambda: write_shards("fashion-mnist", FASHION_MNIST, out, max_per_class=6, images_per_shard=20),
                     lambda: write_saliency(shards, out, size=16)):
            with pytest.raises(RuntimeError, match=f"another spot process is writing {out}") as e:
                call()
            assert "\n" not in str(e.value)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()


def test_readers_refuse_a_folder_that_does_not_match_its_manifest(imagenet_shards, tmp_path):
    """Missing, resized, unlisted or (for verify_shards) altered shards: one line naming the file."""
    src, _ = imagenet_shards
    assert shard_paths(src, "val-000000") == [src / "val-000000.tar"]
    cases = {"missing": (FileNotFoundError, "val-000000.tar listed in its manifest.json is missing"),
             "shorter": (ValueError, "val-000000.tar is .* bytes, its manifest.json says"),
             "unlisted": (ValueError, "train-000099.tar is not in its manifest.json"),
             "no manifest": (FileNotFoundError, "manifest.json is missing")}
    for case, (kind, match) in cases.items():
        out = tmp_path / case
        shutil.copytree(src, out)
        shard = out / "val-000000.tar"
        if case == "missing":
            shard.unlink()
        elif case == "shorter":
            shard.write_bytes(shard.read_bytes()[:-512])
        elif case == "unlisted":
            shutil.copy(out / "train-000000.tar", out / "train-000099.tar")
        else:
            (out / "manifest.json").unlink()
        for read, arg in ((shard_paths, "train"), (shard_paths, "train-000001"), (verify_shards, False)):
            with pytest.raises(kind, match=match) as e:
                read(out, arg)
            assert "\n" not in str(e.value)
    out = tmp_path / "flipped"
    shutil.copytree(src, out)
    data = bytearray((out / "val-000000.tar").read_bytes())
    data[600] ^= 1
    (out / "val-000000.tar").write_bytes(bytes(data))
    assert shard_paths(out, "val") == [out / p.name for p in shard_paths(src, "val")]
    with pytest.raises(ValueError, match="val-000000.tar does not have the sha256"):
        verify_shards(out)


def test_saliency_one_map_per_key_in_order(tmp_path):
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "s", max_per_class={"train": 5, "val": 5}, images_per_shard=20)
    m = write_saliency(tmp_path / "s", tmp_path / "sal", size=32)
    assert verify_shards(tmp_path / "sal") == m
    for s in m["shards"]:
        img_keys = [r["__key__"] for r in read_shard(tmp_path / "s" / s["name"])]
        sal = list(read_shard(tmp_path / "sal" / s["name"]))
        assert [r["__key__"] for r in sal] == img_keys
        assert all(Image.open(io.BytesIO(r["png"])).size == (32, 32) for r in sal)
    assert (tmp_path / "sal" / "preview.png").stat().st_size > 1000
    cfg = dict(CFG, input_size=(3, 28, 28), crop_pct=1.0)
    b = next(iter(make_loader(tmp_path / "s", "val", cfg, batch_size=4, saliency_dir=tmp_path / "sal")))
    assert b.saliency.shape == (4, 28, 28) and 0 <= b.saliency.min() and b.saliency.max() <= 1


def test_saliency_does_not_depend_on_workers_or_batch(tmp_path):
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "s", max_per_class={"train": 6, "val": 6}, images_per_shard=25)
    one = write_saliency(tmp_path / "s", tmp_path / "one", size=16, workers=1)
    many = write_saliency(tmp_path / "s", tmp_path / "many", size=16, workers=3, batch_size=7)
    assert len(one["shards"]) > 2 and one == many                   # same bytes (sha256) in every shard


def test_saliency_folders_are_complete_and_of_these_image_shards(tmp_path, monkeypatch):
    """A saliency run that dies half-way leaves a folder the loader refuses, as it refuses maps of
    other image shards and image shards that are not complete."""
    shards, sal = tmp_path / "s", tmp_path / "sal"
    write_shards("fashion-mnist", FASHION_MNIST, shards, max_per_class={"train": 5, "val": 5}, images_per_shard=20)
    write_saliency(shards, sal, size=16)
    load = lambda: make_loader(shards, "val", CFG, batch_size=4, saliency_dir=sal)
    calls = []

    def dies_on_the_second_shard(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return saliency_maps(*a)

    monkeypatch.setattr("spot.data.saliency.saliency_maps", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_saliency(shards, sal, size=32)
    assert not (sal / "manifest.json").exists() and not (sal / "run.json").exists()
    with pytest.raises(FileNotFoundError, match=f"{sal / 'manifest.json'} is missing"):
        load()
    monkeypatch.undo()
    write_saliency(shards, sal, size=16)
    write_shards("fashion-mnist", FASHION_MNIST, shards, max_per_class={"train": 5, "val": 6}, images_per_shard=20)
    with pytest.raises(ValueError, match="saliency shard .*val-000000.tar was made from other image shards"):
        load()
    (shards / "manifest.json").unlink()
    for call in (load, lambda: write_saliency(shards, sal, size=16)):
        with pytest.raises(FileNotFoundError, match=f"{shards / 'manifest.json'} is missing"):
            call()


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
    (lambda t: write_shards("fashion-mnist", FASHION_MNIST, t / "o", images_per_shard=0), "images_per_shard"),
    (lambda t: list(make_source("fashion-mnist", t, "train")), "dataset-fashion-mnist"),
])
def test_bad_parameters_give_one_line_errors(tmp_path, call, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        call(tmp_path)
    assert "\n" not in str(e.value)


def test_train_rows_shuffle_per_epoch_and_deal_shards_to_ranks():
    """A training epoch's rows: every row once, the same for the same seed and epoch, another order
    for another epoch or seed; DDP ranks get whole shards, disjoint, together every row once."""
    from spot.data.decoded import rank_rows, train_rows
    spans = [range(a, min(a + 700, 4000)) for a in range(0, 4000, 700)]          # 6 shards, the last short
    rows = train_rows(spans, seed=3, epoch=0)
    assert sorted(rows.tolist()) == list(range(4000)) and rows.dtype == np.int64
    assert np.array_equal(rows, train_rows(spans, seed=3, epoch=0))
    for other in (train_rows(spans, seed=3, epoch=1), train_rows(spans, seed=4, epoch=0)):
        assert sorted(other.tolist()) == list(range(4000)) and not np.array_equal(rows, other)
    assert not np.array_equal(rows, np.sort(rows))
    ranks = [train_rows(spans, seed=3, epoch=2, rank=r, world=2) for r in (0, 1)]
    assert sorted(np.concatenate(ranks).tolist()) == list(range(4000))
    shard_of = {r: i for i, span in enumerate(spans) for r in span}
    assert not {shard_of[r] for r in ranks[0].tolist()} & {shard_of[r] for r in ranks[1].tolist()}
    assert rank_rows(spans, 1, 2).tolist() == [r for i in (1, 3, 5) for r in spans[i]]


def test_prefetched_keeps_order_raises_the_producers_error_and_stops_early():
    from spot.data.decoded import prefetched
    assert list(prefetched(iter(range(50)), 3)) == list(range(50)) == list(prefetched(iter(range(50)), 0))

    def fails():
        yield 1
        raise ValueError("shard x is unreadable")
    with pytest.raises(ValueError, match="shard x is unreadable"):
        list(prefetched(fails(), 2))
    made = []

    def counted():
        for i in range(1000):
            made.append(i)
            yield i
    it = prefetched(counted(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()                                                      # the consumer stops: so does the thread
    assert len(made) < 10


def test_a_damaged_shard_fails_saliency_in_one_line_naming_it(imagenet_shards, tmp_path):
    """64 bytes flipped in the middle of a val shard, its size kept: the saliency stage refuses it by
    its sha256 instead of reading a shorter tar (and writes nothing)."""
    shards = tmp_path / "shards"
    shutil.copytree(imagenet_shards[0], shards)
    tar = sorted(shards.glob("val-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    tar.write_bytes(data)
    with pytest.raises(ValueError, match=f"^shard {tar} does not have the sha256 its manifest.json gives"):
        write_saliency(shards, tmp_path / "saliency", "spectral_residual", 16)
    assert not (tmp_path / "saliency" / "manifest.json").exists()


@pytest.mark.stage
def test_a_full_disk_while_sharding_names_the_file_and_leaves_no_temporary_file(tmp_path):
    """`spot shard` onto a 32 KiB tmpfs (mounted in a mount namespace of its own), its writers in
    processes: one line, 'no space left on device' and the tar being written, and no `.tmp-*` file left."""
    params = smoke_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    script = (f"mount -t tmpfs -o size=32k tmpfs {out} || exit 99; "
              f"{sys.executable} -m spot.cli shard --params {params}; rc=$?; find {out} -name '.tmp-*'; exit $rc")
    r = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    if r.returncode == 99 or "unshare:" in r.stderr:
        pytest.skip(f"no tmpfs in a mount namespace here: {r.stderr.strip()[:200]}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and re.fullmatch(
        rf"spot shard: error: \[Errno 28\] no space left on device writing {out / 'shards'}/\.tmp-\S+ \(\d+ bytes free "
        r"on its file system\)", last), r.stderr[-2000:]
    assert r.stdout.strip() == "", r.stdout
