"""Backbones: fetch from a local timm checkpoint file, train SPoT and grid backbones, resume after a kill."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import timm
import torch
import yaml

from spot.cli import main
from spot.training.backbones import fetch, load_backbone, uninitialised
from spot.training.train import train
from spot.utils.io import read_json
from tests.conftest import linked_root

TINY = dict(img_size=32, depth=2, num_classes=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real timm state dict on disk, and the model it came from."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth"
    torch.save(vit.state_dict(), path)
    return path, vit


def test_fetch_local_checkpoint_gives_the_same_network(checkpoint, tmp_path):
    path, vit = checkpoint
    meta = fetch("tiny", tmp_path / "tiny", model="vit_tiny_patch16_224", checkpoint=str(path), **TINY)
    assert meta["num_classes"] == 7 and meta["patch_size"] == 16
    model = load_backbone(tmp_path / "tiny")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, model.grid_positions(3)), vit(x), rtol=1e-4, atol=1e-5)


def test_a_model_to_load_skips_its_random_init_unless_it_computes_buffers():
    vit = uninitialised("vit_tiny_patch16_224", TINY)          # load_backbone's model: memory for the weights
    assert vit.state_dict().keys() == timm.create_model("vit_tiny_patch16_224", **TINY).state_dict().keys()
    assert not any(t.is_meta for t in vit.state_dict().values())
    swin = timm.create_model("swin_tiny_patch4_window7_224")    # relative position indices: not in a state dict
    built = dict(uninitialised("swin_tiny_patch4_window7_224", {}).named_buffers())
    for name, b in swin.named_buffers():
        torch.testing.assert_close(built[name], b)


@pytest.mark.stage
def test_fetch_through_the_cli_from_params(checkpoint, tmp_path, capsys):
    from tests.conftest import smoke_config
    path, _ = checkpoint
    params = smoke_config(tmp_path, backbones={
        "local": {"make": "fetch", "model": "vit_tiny_patch16_224", "checkpoint": str(path), "arch": TINY},
        "missing": {"make": "fetch", "model": "vit_tiny_patch16_224", "checkpoint": str(tmp_path / "no.pth")}})
    assert main(["backbone", "--backbone", "local", "--params", str(params)]) == 0
    out = yaml.safe_load(params.read_text())["root"]
    assert load_backbone(f"{out}/backbones/local").num_classes == 7
    assert read_json(f"{out}/backbones/local/run.json")["params"]["backbones.local.checkpoint"] == str(path)
    capsys.readouterr()
    assert main(["backbone", "--backbone", "missing", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no.pth" in err and "\n" not in err
    assert not os.path.exists(f"{out}/backbones/missing")


MAE = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.875, interpolation="bicubic")


def test_a_backbones_data_config_replaces_its_pretrained_configs_and_is_recorded(checkpoint, tmp_path):
    """Mean, std, crop and interpolation from the params file replace those of the timm model's
    pretrained config (0.5 and crop 0.9 for vit_tiny); the rest stays timm's; backbone.json records
    the result and where it came from, and the loaded backbone runs with it."""
    path, _ = checkpoint
    pre = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    assert (pre.mean, pre.crop_pct) == ((0.5, 0.5, 0.5), 0.9)
    meta = fetch("mae", tmp_path / "mae", model="vit_tiny_patch16_224", checkpoint=str(path), data_config=MAE, **TINY)
    saved = read_json(tmp_path / "mae" / "backbone.json")
    assert saved["data_config"] == meta["data_config"] == dict(MAE, input_size=[3, 32, 32], crop_mode=pre.crop_mode)
    assert saved["data_config_from"] == {"timm": f"vit_tiny_patch16_224.{pre.tag}", "params": MAE}
    model = load_backbone(tmp_path / "mae")
    assert model.data_config["mean"] == tuple(MAE["mean"]) and model.data_config["crop_pct"] == 0.875
    plain = fetch("plain", tmp_path / "plain", model="vit_tiny_patch16_224", checkpoint=str(path), **TINY)
    assert plain["data_config"]["mean"] == list(pre.mean) and plain["data_config_from"]["params"] == {}


def test_imagenet_config_preprocesses_mae_as_mae_evaluates_it():
    """config/imagenet.yaml gives MAE-IN1k the eval transform of MAE's util/datasets.py (ImageNet's mean
    and std, bicubic resize to 256 and crop 224), its own decoded geometry; the AugReg backbones keep
    their timm configs (0.5, crop 0.9)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from spot.data.geometry import geometry_name
    from spot.workflow.backbone_spec import planned_data_config
    from spot.workflow.config import load_config
    from spot.workflow.stage_table import geometries
    from tests.conftest import REPO
    cfg = load_config(REPO / "config" / "imagenet.yaml")
    dc = cfg["backbones"]["mae-in1k"]["data_config"]
    assert (tuple(dc["mean"]), tuple(dc["std"])) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert planned_data_config(cfg, "mae-in1k") == dict(input_size=(3, 224, 224), interpolation="bicubic",
                                                        crop_pct=224 / 256, crop_mode="center")
    for name in ("cls-in21k", "cls-in1k"):
        pre = timm.models.get_pretrained_cfg(cfg["backbones"][name]["model"])
        assert cfg["backbones"][name]["data_config"] == {}
        assert planned_data_config(cfg, name) == dict(input_size=pre.input_size, interpolation=pre.interpolation,
                                                      crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)
    assert sorted(g["geometry"] for g in geometries(cfg)) == sorted(
        {geometry_name(planned_data_config(cfg, b)) for b in cfg["backbones"]}) and len(geometries(cfg)) == 2


def test_a_full_disk_says_so_and_names_the_file(smoke_stages, tmp_path):
    """Training on a file system with no room for its checkpoint (a 64 KiB tmpfs, mounted in a mount
    namespace of its own): one line, 'no space left on device' and the checkpoint's path, not
    torch's '[enforce fail at inline_container.cc] unexpected pos'."""
    _, cfg, root = smoke_stages
    params = linked_root(tmp_path, root)
    out = tmp_path / "out"
    out.mkdir()
    links = " && ".join(f"ln -s {root / f} {out / f}" for f in ("shards", "decoded"))
    script = (f"mount -t tmpfs -o size=64k tmpfs {out} || exit 99; {links} && "
              f"{sys.executable} -m spot.cli backbone --backbone spot-a --params {params}")
    r = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], capture_output=True, text=True)
    if r.returncode == 99 or "unshare:" in r.stderr:
        pytest.skip(f"no tmpfs in a mount namespace here: {r.stderr.strip()[:200]}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("spot backbone: error: [Errno 28] no space left on device writing "
                                                 f"{out / 'checkpoints' / 'spot-a' / 'checkpoint.pt'} ("), r.stderr[-2000:]


def test_unknown_timm_model_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model 'vit_nonexistent'"):
        fetch("x", tmp_path / "x", model="vit_nonexistent", pretrained=False)


def test_training_lowers_the_loss_and_grid_backbone_trains(smoke_stages, tmp_path):
    """A short run on 1000 Fashion-MNIST images (the smoke shards' 200 are too few to beat chance
    reliably) lowers the loss and ends well above chance on held-out images."""
    from spot.data.decoded import write_decoded
    from spot.data.saliency import write_saliency
    from spot.data.shards import write_shards
    from spot.training.backbones import backbone_spec
    from spot.workflow.backbone_spec import planned_data_config
    from tests.conftest import FASHION_MNIST
    _, cfg, root = smoke_stages
    write_shards("fashion-mnist", FASHION_MNIST, tmp_path / "shards", splits=["train", "val"], images_per_shard=1000,
                 max_per_class={"train": 100, "val": 20})
    write_saliency(tmp_path / "shards", tmp_path / "saliency", "spectral_residual", 16)
    write_decoded(tmp_path / "shards", tmp_path / "saliency", tmp_path / "decoded", planned_data_config(cfg, "spot-a"))
    spec = backbone_spec(cfg, "spot-a")
    spec = spec._replace(arch=dict(spec.arch, embed_dim=64, depth=2))
    tcfg = dict(cfg["train"], epochs=6, batch_size=50, lr=3e-3, warmup_epochs=0.25, token_range=[16, 49])
    hist = train("t", spec, cfg["backbones"]["spot-a"]["tokens"], tcfg, tmp_path / "shards", tmp_path / "decoded",
                 tmp_path / "t", tmp_path / "ck")
    rows = pd.read_csv(tmp_path / "t" / "metrics.csv").to_dict("records")
    assert len(rows) == 6 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert hist["val_top1"] > 0.25                                   # 10 classes: chance is 0.1
    model = load_backbone(tmp_path / "t")                          # reads 28 px images, not timm's 224
    assert tuple(model.data_config["input_size"]) == (3, 28, 28)
    from spot.data.stream import make_loader
    assert next(iter(make_loader(root / "shards", "val", model.data_config, 4))).images.shape == (4, 3, 28, 28)
    grid = read_json(root / "backbones" / "grid-b" / "backbone.json")
    assert grid["tokens"] == "grid" and grid["steps"] > 0


def test_killed_training_resumes_to_the_uninterrupted_weights(smoke_stages, tmp_path):
    """Kill `spot backbone` after its first checkpoint, rerun: same weights as a run never killed,
    and the half-written checkpoint a kill leaves is gone."""
    _, cfg, root = smoke_stages
    changes = dict(train=dict(cfg["train"], epochs=4, batch_size=20, checkpoint_every=3))   # 40 steps

    def setup(d):
        d.mkdir()
        params = linked_root(d, root, "shards", "decoded", **changes)
        return [sys.executable, "-m", "spot.cli", "backbone", "--backbone", "spot-a", "--params", str(params)]

    killed, clean = setup(tmp_path / "killed"), setup(tmp_path / "clean")
    ckpt = tmp_path / "killed" / "out" / "checkpoints" / "spot-a" / "checkpoint.pt"
    proc = subprocess.Popen(killed, stderr=subprocess.DEVNULL)
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < 40 and not (tmp_path / "killed" / "out" / "backbones" / "spot-a" / "run.json").exists()
    left = ckpt.parent / ".tmp-checkpoint.pt.k1ll3d"         # a checkpoint the kill cut short, as atomic_path names it
    left.write_bytes(b"half a checkpoint")
    for cmd in (killed, clean):
        assert subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode == 0
    assert not left.exists()
    resumed, reference = (load_backbone(tmp_path / d / "out" / "backbones" / "spot-a") for d in ("killed", "clean"))
    assert resumed.meta["steps"] == reference.meta["steps"] == 40
    for (k, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_torchrun_ddp_trains_on_two_processes(smoke_stages, tmp_path):
    """`torchrun --nproc_per_node 2 -m spot.cli backbone` (DDP, gloo on CPU): ranks share the shards."""
    _, cfg, root = smoke_stages
    params = linked_root(tmp_path, root, "shards", "decoded", train=dict(cfg["train"], epochs=2))
    r = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "spot.cli", "backbone",
                        "--backbone", "spot-a", "--params", str(params)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = read_json(tmp_path / "out" / "backbones" / "spot-a" / "backbone.json")
    assert meta["steps"] == 2 * 2                 # 200 images / (batch 50 x 2 ranks) = 2 steps per epoch
    val = read_json(tmp_path / "out" / "backbones" / "spot-a" / "metrics.json")
    assert 0 <= val["val_top1"] <= 1


def test_a_checkpoint_of_another_config_is_never_resumed(smoke_stages, tmp_path, capsys):
    """Train, change lr and seed: `--resume` stops in one line naming them; the default starts over
    and trains every step, so the weights are the new config's."""
    _, cfg, root = smoke_stages
    params = linked_root(tmp_path, root, "shards", "decoded", train=dict(cfg["train"], epochs=1))
    argv = ["backbone", "--backbone", "spot-a", "--params", str(params)]
    assert main(argv) == 0
    first = load_backbone(tmp_path / "out" / "backbones" / "spot-a").state_dict()
    changed = yaml.safe_load(params.read_text())
    changed["train"]["lr"] *= 3
    changed["backbones"]["spot-a"].pop("seeds", None)          # the smoke config trains replicates
    changed["backbones"]["spot-a"]["seed"] = 7
    params.write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "checkpoint.pt" in err and "lr=" in err and "seed=" in err, err
    assert main(argv) == 0
    assert "starting over" in capsys.readouterr().err
    again = load_backbone(tmp_path / "out" / "backbones" / "spot-a")
    assert again.meta["steps"] == 4 and again.meta["seed"] == 7          # 200 images / batch 50
    assert not torch.equal(again.state_dict()["vit.pos_embed"], first["vit.pos_embed"])
