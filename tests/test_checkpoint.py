"""Checkpoints: weights-only round trip, stale ones not reused, planted pickles never run, bad files one line."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from spot.training.backbones import fetch, load_backbone
from spot.training.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from spot.utils.records import digest

TINY = {"img_size": 32, "depth": 1, "num_classes": 5}
FP = {"timm_name": "vit_tiny_patch16_224", "arch": TINY, "tokens": "spot", "data": "0123abcd", "lr": 3e-3,
      "epochs": 2, "token_range": (4, 196), "seed": 0}


def tiny_vit(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(TINY, **changes))


def trained():
    """A tiny ViT and its AdamW optimizer after one step."""
    vit = tiny_vit()
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return vit, opt


def save(path, fp=FP, step=7):
    vit, opt = trained()
    save_checkpoint(path, model_state=vit.state_dict(), optimizer_state=opt.state_dict(), step=step,
                    history=[{"epoch": 0, "step": step, "train_loss": np.float64(1.5), "val_top1": 0.25}],
                    fingerprint=fingerprint(**fp))
    return vit, opt


def one_line(excinfo, *names) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg
    return msg


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_loads_weights_only(tmp_path):
    path = tmp_path / "ck" / "checkpoint.pt"
    vit, opt = save(path)
    assert os.listdir(path.parent) == ["checkpoint.pt"]                 # no temp file left beside it
    plain = torch.load(path, weights_only=True)
    assert_same(plain["model"], vit.state_dict())
    ck = load_checkpoint(path, fingerprint(**FP), required=True)
    assert_same(ck["model"], vit.state_dict())
    assert_same(ck["optimizer"], opt.state_dict())
    assert ck["step"] == 7 and ck["history"] == [{"epoch": 0, "step": 7, "train_loss": 1.5, "val_top1": 0.25}]
    fresh, fresh_opt = tiny_vit(), torch.optim.AdamW(tiny_vit().parameters(), lr=1e-3)
    fresh.load_state_dict(ck["model"])
    fresh_opt.load_state_dict(ck["optimizer"])
    assert load_checkpoint(tmp_path / "none.pt", fingerprint(**FP), required=True) is None


def test_digest_is_stable_and_short():
    assert digest({"a": 1, "b": (2, 3)}) == digest({"b": [2, 3], "a": 1}) != digest({"a": 1, "b": [3, 2]})
    assert len(digest({})) == 16


@pytest.mark.parametrize("change, made, now", [
    ({"seed": 1}, "seed=0", "seed=1"),
    ({"lr": 0.01, "seed": 1}, "lr=0.003, seed=0", "lr=0.01, seed=1"),
    ({"tokens": "grid"}, "tokens=spot", "tokens=grid"),
    ({"arch": dict(TINY, depth=2)}, "arch.depth=1", "arch.depth=2"),
])
def test_stale_checkpoint_is_not_reused(tmp_path, capsys, change, made, now):
    path = tmp_path / "checkpoint.pt"
    save(path)
    other = fingerprint(**dict(FP, **change))
    assert load_checkpoint(path, other, required=False) is None
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and made in err and now in err and "starting over" in err
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, other, required=True)
    one_line(e, path, f"was made with {made}; this run has {now}", "--no-resume")


def test_checkpoint_without_fingerprint_starts_over(tmp_path, capsys):
    """What spot/training/train.py wrote before fingerprints."""
    path = tmp_path / "checkpoint.pt"
    vit, opt = trained()
    torch.save({"model": vit.state_dict(), "optimizer": opt.state_dict(), "step": 3, "history": []}, path)
    assert load_checkpoint(path, fingerprint(**FP), required=False) is None
    assert "without a fingerprint" in capsys.readouterr().err
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, fingerprint(**FP), required=True)
    one_line(e, path, "without a fingerprint")


class Planted:
    """Unpickling this writes the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_planted_pickle_is_never_run(tmp_path, how):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "marker"
    obj = {"model": Planted(marker), "optimizer": {}, "step": 0, "history": [], "fingerprint": fingerprint(**FP)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    for required in (True, False):
        with pytest.raises(ValueError) as e:
            load_checkpoint(path, fingerprint(**FP), required=required)
        one_line(e, path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_corrupt_checkpoint_is_one_line(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save(path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "random": os.urandom(4096)}[damage])
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, fingerprint(**FP), required=False)
    one_line(e, path, "not a readable checkpoint")


def flip_64_bytes(path: Path) -> None:
    """XOR 64 bytes in the middle of `path` (a safetensors file's tensor data), keeping its size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(data)


@pytest.mark.parametrize("damage, says", [
    (lambda w: w.write_bytes(w.read_bytes()[:1000]), ["not a readable checkpoint"]),
    (lambda w: save_file(tiny_vit(depth=2).state_dict(), str(w)), ["blocks.1."]),
    (flip_64_bytes, ["does not have the sha256", "b/backbone.json"]),
], ids=["truncated", "another-architecture", "flipped-bytes"])
def test_damaged_backbone_weights_are_refused_in_one_line(tmp_path, damage, says):
    """A backbone whose weights file was cut short, holds another architecture's or changed after its job wrote
    it: one line naming the file (and the record whose sha256 it lacks)."""
    src = tmp_path / "vit.pth"
    torch.save(tiny_vit().state_dict(), src)
    fetch("b", tmp_path / "b", model="vit_tiny_patch16_224", checkpoint=str(src), **TINY)
    load_backbone(tmp_path / "b")
    weights = tmp_path / "b" / "model.safetensors"
    damage(weights)
    with pytest.raises(ValueError) as e:
        load_backbone(tmp_path / "b")
    one_line(e, weights, *says)


def test_fetch_random_bytes_checkpoint_is_one_line(tmp_path):
    src = tmp_path / "vit.pth"
    src.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError) as e:
        fetch("b", tmp_path / "b", model="vit_tiny_patch16_224", checkpoint=str(src), **TINY)
    one_line(e, src, "not a readable checkpoint")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("other, key", [({"num_classes": 7}, "head.weight"), ({"depth": 2}, "blocks.1.")])
def test_fetch_checkpoint_of_another_architecture_is_one_line(tmp_path, other, key):
    src = tmp_path / "vit.pth"
    torch.save(tiny_vit(**other).state_dict(), src)
    with pytest.raises(ValueError) as e:
        fetch("b", tmp_path / "b", model="vit_tiny_patch16_224", checkpoint=str(src), **TINY)
    one_line(e, src, key)
    assert not (tmp_path / "b").exists()


def test_damaged_placer_weights_are_refused_in_one_line(tmp_path):
    from spot.methods.placer import Placer
    from spot.training.placer_files import load_placer, save_placer
    save_placer(Placer(4, in_size=14, seed=0), tmp_path / "p", meta={"budget": 4})
    load_placer(tmp_path / "p")
    weights = tmp_path / "p" / "placer.safetensors"
    flip_64_bytes(weights)
    with pytest.raises(ValueError) as e:
        load_placer(tmp_path / "p")
    one_line(e, weights, "does not have the sha256", tmp_path / "p" / "placer.json")
