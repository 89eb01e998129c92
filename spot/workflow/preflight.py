"""Preflight: what is wrong with a validated configuration (`spot.workflow.config.load_config`) that
only this machine knows, before any job: devices, data folders, files, timm architectures and their
heads, checkpoints' tensors, token budgets against the architectures, SPoT-ON parts against the
data. `check` raises at the first problem, a one-line ValueError or FileNotFoundError
'<source>: <dotted.key>: <problem>'."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from spot.data.imagenet import SOURCE as IMAGENET_SOURCE
from spot.data.imagenet import imagenet_classes
from spot.data.shards import per_split
from spot.data.sources import FASHION_MNIST_FILES, class_folder, make_source, source_classes, split_problem
from spot.training.backbones import UnknownModel, architecture, checkpoint_shapes, uninitialised
from spot.training.checkpoint import misfit
from spot.utils.text import describe_error, one_line


class Problem(Exception):
    """One problem at one config key; `check` turns it into its ValueError / FileNotFoundError."""

    def __init__(self, key: str, message: str, kind: type[Exception] = ValueError):
        super().__init__(message)
        self.key, self.message, self.kind = key, message, kind


def check(cfg: dict, source: str, devices: bool = True) -> None:
    """Raise a one-line ValueError / FileNotFoundError '<source>: <key>: <problem>' for the first
    problem of the validated configuration `cfg` (from `load_config`); return None if there is none.
    `devices=False` leaves out the device check (jobs run on other machines, e.g. SLURM nodes)."""
    try:
        if devices:
            check_device(cfg["device"])
        check_data(cfg["data"])
        check_checkpoints(cfg["backbones"])
        classes = len(source_classes(cfg["data"]["source"], cfg["data"]["root"]))
        models = backbone_models(cfg, classes)
        shapes = {name: shape_of(cfg, name, model) for name, model in models.items()}
        check_heads(cfg, models, classes)
        check_weights(cfg, models)
        check_budgets(cfg, shapes)
        check_parts(cfg)
    except Problem as p:
        raise p.kind(f"{source}: {p.key}: {one_line(p.message)}") from None


# --- device -----------------------------------------------------------------------------------------

def check_device(device: str) -> None:
    """'cuda' / 'cuda:N' must name a CUDA device of this machine."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise Problem("device", f"{device!r} but CUDA is not available on this machine (use auto or cpu)")
    if index >= count:
        raise Problem("device", f"{device!r} but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


# --- data -------------------------------------------------------------------------------------------

def check_data(data: dict) -> None:
    """data.root, its split folders (`spot.data.sources.split_problem`) or Fashion-MNIST files; a folder
    tree has classes (an ImageNet tree: folders named by ImageNet-1k wnids)."""
    root = Path(data["root"])
    for split in data["splits"]:
        if problem := split_problem(data["source"], root, split):
            raise Problem(*problem)
        if data["source"] == "fashion-mnist":
            check_fashion_mnist(root, split)
    if data["source"] == "folder" and not source_classes("folder", root):
        raise Problem("data.root", f"{class_folder(root)} holds no class folder", FileNotFoundError)
    if data["source"] == "imagenet":
        wnids = set(source_classes("folder", root)) & set(imagenet_classes()[0])
        if not wnids:
            raise Problem("data.root", f"no folder of {class_folder(root)} is an ImageNet-1k wnid ({IMAGENET_SOURCE}); "
                          "for other classes use data.source: folder", FileNotFoundError)


def fashion_mnist_missing(root: Path, split: str) -> list[str]:
    """Names of the IDX files of `split` that are in none of the places `fashion_mnist_arrays` reads."""
    stem = FASHION_MNIST_FILES[split]
    names = [f"{stem}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    return [n for n in names if not any(p.is_file() for p in
                                        (root / f"{n}.gz", root / n, root / "FashionMNIST" / "raw" / n))]


def check_fashion_mnist(root: Path, split: str) -> None:
    """The IDX files of Fashion-MNIST split `split` are in `root` (nothing is downloaded)."""
    missing = fashion_mnist_missing(root, split)
    if missing:
        raise Problem("data.root", f"Fashion-MNIST file(s) {', '.join(m + '[.gz]' for m in missing)} of split "
                      f"{split!r} not in {root}; install them with 'apt-get install dataset-fashion-mnist' "
                      "(/usr/share/datasets/fashion-mnist)", FileNotFoundError)


# --- backbones --------------------------------------------------------------------------------------

def check_checkpoints(backbones: dict) -> None:
    """Every backbone's `checkpoint:` file exists."""
    for name, spec in backbones.items():
        if spec.get("checkpoint") and not Path(spec["checkpoint"]).is_file():
            raise Problem(f"backbones.{name}.checkpoint", f"file {spec['checkpoint']} does not exist",
                          FileNotFoundError)


def backbone_models(cfg: dict, classes: int) -> dict[str, torch.nn.Module]:
    """Backbone name -> its timm model without weights (`spot.training.backbones.uninitialised`), each
    distinct architecture built once (a fine-tuned backbone shares its init's); a trained head has
    `classes` logits."""
    built: dict[str, torch.nn.Module] = {}
    models = {}
    for name in cfg["backbones"]:
        spec = architecture(cfg, name)
        if spec.name not in built:
            try:
                built[spec.name] = uninitialised(spec.model, spec.kwargs(classes))
            except UnknownModel as e:
                raise Problem(f"backbones.{spec.name}.model", str(e)) from None
            except Exception as e:  # noqa: BLE001 - any other failure of timm is a bad architecture
                raise Problem(f"backbones.{spec.name}.{'arch' if spec.arch else 'model'}",
                              f"timm cannot build {spec.model!r} ({describe_error(e)})") from None
        models[name] = built[spec.name]
    return models


def shape_of(cfg: dict, name: str, model: torch.nn.Module) -> tuple[int, int, int]:
    """(height, width, patch) that SPoTViT reads from backbone `name`'s `model`; Problem where SPoTViT
    would refuse it."""
    spec = architecture(cfg, name)
    pe = getattr(model, "patch_embed", None)
    if not isinstance(getattr(pe, "proj", None), torch.nn.Conv2d):
        raise Problem(f"backbones.{spec.name}.model", f"{spec.model!r} is not a timm VisionTransformer with a conv "
                      "patch embedding (SPoTViT needs one)")
    (h, w), (ph, pw) = tuple(pe.img_size), tuple(pe.patch_size)
    if ph != pw:
        raise Problem(arch_key(spec, "patch_size"), f"patch_size {ph}x{pw} is not square "
                      "(SPoTViT needs square patches)")
    if h % ph or w % pw:
        raise Problem(arch_key(spec, "img_size", "patch_size"), f"img_size {h}x{w} is not divisible by patch_size {ph}")
    return h, w, ph


def arch_key(spec, *keys: str) -> str:
    """'backbones.<name>.arch.<key>' for the first of `keys` set in `spec.arch`, else 'backbones.<name>.model'."""
    return next((f"backbones.{spec.name}.arch.{k}" for k in keys if k in spec.arch), f"backbones.{spec.name}.model")


def check_heads(cfg: dict, models: dict[str, torch.nn.Module], classes: int) -> None:
    """Every head has one logit per class of the source (`classes`), in its order: an ImageNet
    source is labelled with the 1 000 classes of ImageNet-1k, a folder source with its class folders."""
    data = cfg["data"]
    why = {"imagenet": f"its labels are ImageNet-1k's index ({IMAGENET_SOURCE})",
           "folder": f"the class folders of {class_folder(Path(data['root']))}"}.get(data["source"], "its classes")
    for name, model in models.items():
        spec = architecture(cfg, name)
        if model.num_classes != classes:
            raise Problem(arch_key(spec, "num_classes"),
                          f"{spec.model!r} has a head of {model.num_classes} classes, the {data['source']} source "
                          f"{classes} ({why}): a head must read the source's labels")


def check_weights(cfg: dict, models: dict[str, torch.nn.Module]) -> None:
    """Every `checkpoint:` holds the tensors of its backbone's architecture, names and shapes, read
    without their data (`spot.training.backbones.checkpoint_shapes`); .npz files, which timm reads with the
    model's own loader, are left to the job."""
    for name, spec in cfg["backbones"].items():
        path = spec.get("checkpoint")
        if not path or Path(path).suffix.lower() in (".npz", ".npy"):
            continue
        key = f"backbones.{name}.checkpoint"
        try:
            have = checkpoint_shapes(path)
        except ValueError as e:
            raise Problem(key, str(e)) from None
        model = models[name]
        if why := misfit(model.state_dict(), have, path, f"{spec['model']} ({type(model).__name__})"):
            raise Problem(key, why)


# --- token budgets ----------------------------------------------------------------------------------

def check_budgets(cfg: dict, shapes: dict[str, tuple[int, int, int]]) -> None:
    """Budgets fit every backbone: at most its patch cells under the grid prior, at most its pixels
    always; train.token_range's lower bound at most the cells of each `make: train` backbone."""
    grid = {"eval": "grid" in cfg["eval"]["priors"] and "eval.priors",
            "oracle": cfg["oracle"]["prior"] == "grid" and "oracle.prior",
            "transfer": cfg["oracle"]["prior"] == "grid" and "oracle.prior"}
    for stage, why in grid.items():
        for budget in cfg[stage]["budgets"]:
            for name, (h, w, k) in shapes.items():
                cells = (h // k) * (w // k)
                if why and budget > cells:
                    raise Problem(f"{stage}.budgets", f"{budget} tokens exceed the {cells} patch cells of backbone "
                                  f"{name!r} ({h}x{w} px, patch {k}) under the grid prior ({why})")
                if budget > h * w:
                    raise Problem(f"{stage}.budgets", f"{budget} tokens exceed the {h * w} pixels of backbone "
                                  f"{name!r}'s {h}x{w} images")
    low = cfg["train"]["token_range"][0]
    for name, (h, w, k) in shapes.items():
        if cfg["backbones"][name]["make"] == "train" and low > (h // k) * (w // k):
            raise Problem("train.token_range", f"lower bound {low} exceeds the {(h // k) * (w // k)} patch cells "
                          f"of backbone {name!r} ({h}x{w} px, patch {k})")


# --- SPoT-ON parts ----------------------------------------------------------------------------------

def check_parts(cfg: dict) -> None:
    """oracle.parts at most the val shards the shard stage will write (each part gets whole shards):
    the val images listed as the shard stage lists them, data.images_per_shard to a shard (more
    shards where data.shard_bytes comes first, never fewer)."""
    data, parts = cfg["data"], cfg["oracle"]["parts"]
    images = len(make_source(data["source"], data["root"], "val", seed=cfg["seed"],
                             max_per_class=per_split(data["max_per_class"], "val"),
                             max_images=per_split(data["max_images"], "val")))
    shards = math.ceil(images / data["images_per_shard"])
    if parts > shards:
        raise Problem("oracle.parts", f"{parts} SPoT-ON jobs per backbone and budget, but the val split makes "
                      f"{shards} shard(s) ({images} images, data.images_per_shard {data['images_per_shard']}) and a "
                      f"job gets whole shards: set oracle.parts to at most {shards}"
                      + (f" or data.images_per_shard to at most {images // parts}" if images >= parts else ""))
