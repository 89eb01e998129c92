"""spot.workflow.preflight.check: one-line errors naming the key, for what is knowable without running a job."""
from pathlib import Path

import pytest
import timm
import torch
import yaml

from spot.workflow.config import load_config
from spot.workflow.preflight import check

REPO = Path(__file__).resolve().parents[1]
ARCH = {"img_size": 28, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}


def params(tmp_path: Path, edit=None, base: Path = REPO / "params.yaml") -> Path:
    """`base` with outputs under tmp_path, changed in place by `edit(cfg, tmp_path)`; the written file."""
    cfg = yaml.safe_load(base.read_text())
    cfg["root"] = str(tmp_path / "out")
    if edit:
        edit(cfg, tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fails(path: Path, key: str, kind=ValueError, cfg: dict | None = None) -> str:
    """The message of the error that load_config + check raise: one line, '<path>: <key>: ...'."""
    with pytest.raises(kind) as err:
        check(cfg if cfg is not None else load_config(path), str(path))
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: {key}: "), msg
    return msg


def arch(name: str, **changes):
    """An edit setting backbone `name`'s arch (ARCH plus changes; a None value drops the key)."""
    def edit(cfg, _):
        a = {**ARCH, **changes}
        cfg["backbones"][name]["arch"] = {k: v for k, v in a.items() if v is not None}
    return edit


def imagenet_tree(root: Path, splits=("train", "val"), files: int = 0) -> Path:
    """An ImageNet-style layout <root>/<split>/<wnid>/ holding `files` (empty) files each."""
    for split in splits:
        (root / split / "n01440764").mkdir(parents=True)
        for i in range(files):
            (root / split / "n01440764" / f"{i}.JPEG").touch()
    return root


# --- the shipped configurations -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["params.yaml", "config/smoke.yaml"])
def test_shipped_fashion_mnist_configs_pass(tmp_path, name):
    check(load_config(params(tmp_path, base=REPO / name)), name)


def test_shipped_imagenet_config_fails_only_for_what_this_machine_lacks(tmp_path):
    path = REPO / "config" / "imagenet.yaml"
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        check(load_config(path), str(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith((f"{path}: device: ", f"{path}: data.root: ")), msg


def test_imagenet_config_passes_where_its_data_and_checkpoint_exist(tmp_path):
    """The shipped ImageNet config on a tree of 8 val files (a shard each, one per SPoT-ON part) with
    MAE's checkpoint (a ViT-B shrunk to 1 block of width 32, as `arch` says here) in MAE's format."""
    small = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    ckpt = tmp_path / "mae.pth"
    vit = timm.create_model("vit_base_patch16_224", global_pool="avg", **small)
    torch.save({"model": vit.state_dict(), "epoch": 99}, ckpt)

    def edit(cfg, tmp):
        cfg["device"] = "cpu"
        cfg["data"].update(root=str(imagenet_tree(tmp / "imagenet", files=8)), images_per_shard=1)
        cfg["backbones"]["mae-in1k"].update(checkpoint=str(ckpt), arch={"global_pool": "avg", **small})
    check(load_config(params(tmp_path, edit, REPO / "config" / "imagenet.yaml")), "imagenet")


# --- device ---------------------------------------------------------------------------------------

def test_cuda_index_beyond_the_devices_of_this_machine(tmp_path):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    path = params(tmp_path, lambda c, _: c.update(device=f"cuda:{n}"))
    assert "CUDA" in fails(path, "device")


def test_cuda_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = params(tmp_path, lambda c, _: c.update(device="cuda"))
    assert "not available" in fails(path, "device")


# --- budgets --------------------------------------------------------------------------------------

def test_eval_budget_beyond_the_patch_cells_under_grid(tmp_path):
    path = params(tmp_path, lambda c, _: c["eval"].update(budgets=[4, 16, 49, 64]))
    assert "49 patch cells" in fails(path, "eval.budgets")


def test_eval_budget_beyond_the_cells_is_fine_without_grid(tmp_path):
    path = params(tmp_path, lambda c, _: c["eval"].update(budgets=[4, 16, 49, 64], priors=["uniform", "isotropic"]))
    check(load_config(path), str(path))


def test_budget_beyond_the_pixels(tmp_path):
    path = params(tmp_path, lambda c, _: c["eval"].update(budgets=[4, 16, 49, 785], priors=["uniform", "isotropic"]))
    assert "784 pixels" in fails(path, "eval.budgets")


@pytest.mark.parametrize("stage", ["oracle", "transfer"])
def test_oracle_and_transfer_budgets_under_a_grid_oracle(tmp_path, stage):
    path = params(tmp_path)
    cfg = load_config(path)                       # the checks hold even where validate would not catch it
    cfg["eval"]["priors"] = ["isotropic"]
    cfg["oracle"]["prior"] = "grid"
    cfg[stage]["budgets"] = [64]
    assert "oracle.prior" in fails(path, f"{stage}.budgets", cfg=cfg)


def test_token_range_beyond_the_patch_cells(tmp_path):
    path = params(tmp_path, lambda c, _: c["train"].update(token_range=[64, 100]))
    assert "49 patch cells" in fails(path, "train.token_range")


# --- architectures --------------------------------------------------------------------------------

def test_heads_that_do_not_divide_the_width(tmp_path):
    assert "num_heads" in fails(params(tmp_path, arch("spot", num_heads=5)), "backbones.spot.arch")


def test_arch_key_typo(tmp_path):
    assert "embed_dimm" in fails(params(tmp_path, arch("spot-small", embed_dim=None, embed_dimm=64)),
                                 "backbones.spot-small.arch")


def test_unknown_timm_model(tmp_path):
    path = params(tmp_path, lambda c, _: c["backbones"].update(x={"make": "fetch", "model": "vit_nope_patch16"}))
    assert "vit_nope_patch16" in fails(path, "backbones.x.model")


def test_unknown_pretrained_tag(tmp_path):
    path = params(tmp_path, lambda c, _: c["backbones"].update(
        x={"make": "fetch", "model": "vit_tiny_patch16_224.nope"}))
    assert "nope" in fails(path, "backbones.x.model")


def test_fetch_arch_kwargs_are_merged(tmp_path):
    path = params(tmp_path, lambda c, _: c["backbones"].update(
        x={"make": "fetch", "model": "vit_tiny_patch16_224", "arch": {"num_heads": 5}}))
    assert "num_heads" in fails(path, "backbones.x.arch")


def test_not_a_vision_transformer(tmp_path):
    path = params(tmp_path, lambda c, _: c["backbones"].update(x={"make": "fetch", "model": "resnet18"}))
    assert "VisionTransformer" in fails(path, "backbones.x.model")


@pytest.mark.parametrize("img_size", [30, [28, 30]])
def test_img_size_not_divisible_by_patch(tmp_path, img_size):
    assert "not divisible" in fails(params(tmp_path, arch("vit-grid", img_size=img_size)),
                                    "backbones.vit-grid.arch.img_size")


def test_non_square_patches(tmp_path):
    assert "square" in fails(params(tmp_path, arch("spot", patch_size=[4, 2])), "backbones.spot.arch.patch_size")


def test_default_model_of_train_is_checked(tmp_path):
    # without model and img_size the default vit_tiny_patch16_224 is 224 px: 196 cells, so 49 fits
    path = params(tmp_path, arch("spot", img_size=None, patch_size=None))
    check(load_config(path), str(path))
    path = params(tmp_path, arch("spot", img_size=None, patch_size=None, num_heads=7))
    fails(path, "backbones.spot.arch")


def test_init_backbone_has_the_architecture_of_its_init(tmp_path):
    def edit(cfg, _):
        cfg["backbones"]["tuned"] = {"make": "train", "init": "spot", "tokens": "spot"}
        cfg["backbones"]["spot"]["arch"]["num_heads"] = 5
    assert "num_heads" in fails(params(tmp_path, edit), "backbones.spot.arch")

    def bigger(cfg, _):   # init from a 224 px fetched ViT: 196 cells, and budgets up to 196 fit
        cfg["backbones"] = {"base": {"make": "fetch", "model": "vit_tiny_patch16_224", "arch": {"num_classes": 10}},
                            "tuned": {"make": "train", "init": "base", "tokens": "spot"}}
        cfg["eval"]["budgets"] = cfg["oracle"]["budgets"] = [4, 196]
        cfg["transfer"]["budgets"] = cfg["placement"]["budgets"] = cfg["placement"]["transfer"] = [4]
        cfg["saliency"]["model"] = None
        cfg["eval"]["priors"].remove("model_salient")
    path = params(tmp_path, bigger)
    check(load_config(path), str(path))


# --- files and folders ----------------------------------------------------------------------------

def test_missing_data_root(tmp_path):
    path = params(tmp_path, lambda c, t: c["data"].update(root=str(t / "nowhere")))
    assert "nowhere" in fails(path, "data.root", FileNotFoundError)


def test_fashion_mnist_files_missing(tmp_path):
    def edit(cfg, tmp):
        root = tmp / "fm"
        root.mkdir()
        for kind in ("images-idx3", "labels-idx1"):   # train present, val (t10k) missing
            (root / f"train-{kind}-ubyte.gz").write_bytes(b"")
        cfg["data"]["root"] = str(root)
    assert "t10k-images-idx3-ubyte" in fails(params(tmp_path, edit), "data.root", FileNotFoundError)


def test_fashion_mnist_unknown_split(tmp_path):
    path = params(tmp_path, lambda c, _: c["data"].update(splits=["train", "val", "test"]))
    assert "'test'" in fails(path, "data.splits")


@pytest.mark.parametrize("source", ["imagenet", "folder"])
def test_missing_split_folder(tmp_path, source):
    def edit(cfg, tmp):
        cfg["data"].update(source=source, root=str(imagenet_tree(tmp / "data", splits=("train",))))
    assert "val" in fails(params(tmp_path, edit), "data.root", FileNotFoundError)


def test_missing_checkpoint(tmp_path):
    path = params(tmp_path, lambda c, t: c["backbones"].update(
        x={"make": "fetch", "model": "vit_tiny_patch16_224", "checkpoint": str(t / "none.pth")}))
    assert "none.pth" in fails(path, "backbones.x.checkpoint", FileNotFoundError)


# --- heads and checkpoints -----------------------------------------------------------------------

def folder_tree(root: Path, classes: int) -> Path:
    """A class-per-folder tree: `classes` folders in train/ and val/, one (empty) file in each val folder."""
    for i in range(classes):
        for split in ("train", "val"):
            (root / split / f"c{i}").mkdir(parents=True)
        (root / "val" / f"c{i}" / "0.png").touch()
    return root


def fetched(cfg, tmp, model="vit_tiny_patch16_224", **arch):
    """Only one backbone, `x`: `model` fetched (at 28 px, patch 4, so the default budgets fit; a
    Fashion-MNIST head unless `arch` says otherwise)."""
    arch = {"img_size": 28, "patch_size": 4, "num_classes": 10, **arch}
    cfg["backbones"] = {"x": {"make": "fetch", "model": model, "arch": arch}}
    cfg["saliency"]["model"] = None
    cfg["eval"]["priors"].remove("model_salient")


def test_a_head_must_have_a_logit_per_class_of_the_source(tmp_path):
    """A 10-class folder source on a 1 000-class head, an ImageNet source on a 10-class head, a
    trained head narrower than its data: one line naming the key and both counts."""
    for sub in "abc":
        (tmp_path / sub).mkdir()
    def folder_on_imagenet_head(cfg, tmp):
        cfg["data"].update(source="folder", root=str(folder_tree(tmp / "ten", 10)))
        fetched(cfg, tmp)
        del cfg["backbones"]["x"]["arch"]["num_classes"]
    msg = fails(params(tmp_path / "a", folder_on_imagenet_head), "backbones.x.model")
    assert "head of 1000 classes, the folder source 10" in msg and "ten/train" in msg

    def imagenet_on_small_head(cfg, tmp):
        cfg["data"].update(source="imagenet", root=str(imagenet_tree(tmp / "in", files=1)))
        fetched(cfg, tmp, num_classes=10)
    msg = fails(params(tmp_path / "b", imagenet_on_small_head), "backbones.x.arch.num_classes")
    assert "head of 10 classes, the imagenet source 1000" in msg and "timm.data.ImageNetInfo" in msg
    assert "the fashion-mnist source 10" in fails(params(tmp_path / "c", arch("spot", num_classes=5)),
                                                  "backbones.spot.arch.num_classes")


def test_an_imagenet_source_needs_imagenet_wnids(tmp_path):
    def edit(cfg, tmp):
        cfg["data"].update(source="imagenet", root=str(folder_tree(tmp / "cats", 3)))
    assert "no folder of" in fails(params(tmp_path, edit), "data.root", FileNotFoundError)


def standin(path: Path, form: str, **arch) -> Path:
    """A vit_tiny state dict (28 px, patch 4, `arch` changes) saved to `path` in one of the forms
    timm reads: a plain .pth, .safetensors, or MAE's {'model': ...}."""
    from safetensors.torch import save_file
    state = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, num_classes=10, **arch).state_dict()
    if form == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "epoch": 1} if form == "mae" else state, path)
    return path


@pytest.mark.parametrize("form, name", [("pth", "w.pth"), ("safetensors", "w.safetensors"), ("mae", "mae.pth")])
def test_a_checkpoint_of_another_architecture_fails_before_any_job(tmp_path, form, name):
    """ViT-S-like weights (width 384) for a ViT-Ti (192), in each checkpoint form: the first tensor
    that does not fit, with both shapes, read from the file's header without loading its data; the
    same file of the right architecture passes."""
    def edit(ckpt):
        def change(cfg, tmp):
            fetched(cfg, tmp)
            cfg["backbones"]["x"]["checkpoint"] = str(ckpt)
        return change
    wrong = standin(tmp_path / f"wrong-{name}", form, embed_dim=384, num_heads=6)
    msg = fails(params(tmp_path, edit(wrong)), "backbones.x.checkpoint")
    assert f"wrong-{name} does not fit this vit_tiny_patch16_224" in msg
    assert "cls_token has shape [1, 1, 384] there, the model wants [1, 1, 192]" in msg
    right = standin(tmp_path / name, form)
    path = params(tmp_path, edit(right))
    check(load_config(path), str(path))


def test_a_checkpoint_that_is_not_weights_fails_before_any_job(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not a checkpoint")

    def edit(cfg, tmp):
        fetched(cfg, tmp)
        cfg["backbones"]["x"]["checkpoint"] = str(bad)
    assert "w.pth is not a readable checkpoint" in fails(params(tmp_path, edit), "backbones.x.checkpoint")


# --- SPoT-ON parts --------------------------------------------------------------------------------

def test_oracle_parts_beyond_the_val_shards(tmp_path):
    """params.yaml writes its 1 000 val images into one shard of data.images_per_shard 2 000: two
    SPoT-ON parts would leave one with no images."""
    def edit(cfg, _):
        cfg["oracle"]["parts"] = 2
    msg = fails(params(tmp_path, edit), "oracle.parts")
    assert "makes 1 shard(s) (1000 images, data.images_per_shard 2000)" in msg
    assert "oracle.parts to at most 1 or data.images_per_shard to at most 500" in msg

    def smaller(cfg, _):
        cfg["oracle"]["parts"], cfg["data"]["images_per_shard"] = 2, 500
    path = params(tmp_path, smaller)
    check(load_config(path), str(path))


# --- duplicate splits -----------------------------------------------------------------------------

def test_duplicate_splits_rejected_by_the_schema(tmp_path):
    path = params(tmp_path, lambda c, _: c["data"].update(splits=["train", "val", "val"]))
    assert "non-unique" in fails(path, "data.splits")


def test_split_name_outside_the_data_layer_alphabet_rejected_by_the_schema(tmp_path):
    path = params(tmp_path, lambda c, _: c["data"].update(splits=["train", "val", "my_split"]))
    assert "my_split" in fails(path, "data.splits.2")
