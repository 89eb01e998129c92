"""Preflight: what is wrong with a schema-validated configuration that is knowable without running a
job (device, data folders, files, architectures, token budgets). `check` raises at the first problem,
a one-line ValueError or FileNotFoundError '<source>: <dotted.key>: <problem>'."""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from spot.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES

DEFAULT_TIMM = "vit_tiny_patch16_224"   # the timm architecture of `make: train` without `model`


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
        shapes = backbone_shapes(cfg)
        check_budgets(cfg, shapes)
    except Problem as p:
        raise p.kind(f"{source}: {p.key}: {one_line(p.message)}") from None


def one_line(text: str) -> str:
    """`text` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, with its type name."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


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
    """Splits distinct and including 'train'; data.root, its split folders or files, synset_words."""
    splits = data["splits"]
    dup = sorted({s for s in splits if splits.count(s) > 1})
    if dup:
        raise Problem("data.splits", f"{', '.join(dup)} listed more than once")
    if "train" not in splits:
        raise Problem("data.splits", "needs 'train' (the kNN bank of eval and the data of make: train)")
    root = Path(data["root"])
    if not root.is_dir():
        raise Problem("data.root", f"folder {root} does not exist", FileNotFoundError)
    for split in splits:
        if data["source"] == "fashion-mnist":
            check_fashion_mnist(root, split)
        elif not (root / split).is_dir():
            raise Problem("data.root", f"split folder {root / split} does not exist (data.splits: {split})",
                          FileNotFoundError)
    if data.get("synset_words"):
        check_synset_words(Path(data["synset_words"]))


def fashion_mnist_missing(root: Path, split: str) -> list[str]:
    """Names of the IDX files of `split` that are in none of the places `fashion_mnist_arrays` reads."""
    stem = FASHION_MNIST_FILES[split]
    names = [f"{stem}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    return [n for n in names if not any(p.is_file() for p in
                                        (root / f"{n}.gz", root / n, root / "FashionMNIST" / "raw" / n))]


def check_fashion_mnist(root: Path, split: str) -> None:
    """`split` is a Fashion-MNIST split whose IDX files are in `root` (nothing is downloaded)."""
    if split not in FASHION_MNIST_FILES:
        raise Problem("data.splits", f"fashion-mnist has splits {', '.join(FASHION_MNIST_FILES)}, not {split!r}")
    missing = fashion_mnist_missing(root, split)
    if missing:
        raise Problem("data.root", f"Fashion-MNIST file(s) {', '.join(m + '[.gz]' for m in missing)} of split "
                      f"{split!r} not in {root}; install them with 'apt-get install dataset-fashion-mnist' "
                      "(/usr/share/datasets/fashion-mnist)", FileNotFoundError)


def check_synset_words(path: Path) -> None:
    """The file exists and each non-blank line is '<wnid> <names>'."""
    if not path.is_file():
        raise Problem("data.synset_words", f"file {path} does not exist", FileNotFoundError)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Problem("data.synset_words", f"{path} cannot be read ({first_line(e)})") from None
    for number, line in enumerate(lines, 1):
        if line.strip() and len(line.strip().split(" ", 1)) != 2:
            raise Problem("data.synset_words", f"{path} line {number} is not '<wnid> <names>': {line.strip()[:80]!r}")


# --- backbones --------------------------------------------------------------------------------------

def check_checkpoints(backbones: dict) -> None:
    """Every backbone's `checkpoint:` file exists."""
    for name, spec in backbones.items():
        if spec.get("checkpoint") and not Path(spec["checkpoint"]).is_file():
            raise Problem(f"backbones.{name}.checkpoint", f"file {spec['checkpoint']} does not exist",
                          FileNotFoundError)


def num_classes(data: dict) -> int:
    """The class count of the data source where it is cheap to know (only shapes depend on it)."""
    if data["source"] == "fashion-mnist":
        return len(FASHION_MNIST_CLASSES)
    train = Path(data["root"]) / "train"
    count = sum(1 for d in train.iterdir() if d.is_dir()) if train.is_dir() else 0
    return count or 10


def model_spec(cfg: dict, name: str, seen: tuple = ()) -> tuple[str, str, dict]:
    """(backbone whose spec defines the architecture, timm name, create_model kwargs) of backbone
    `name`: a `make: train` with `init` has the architecture of its init backbone."""
    spec = cfg["backbones"][name]
    if spec["make"] == "train" and spec.get("init"):
        if spec["init"] in (*seen, name):
            chain = " -> ".join((*seen, name, spec["init"]))
            raise Problem(f"backbones.{(*seen, name)[0]}.init", f"init cycle {chain}")
        return model_spec(cfg, spec["init"], (*seen, name))
    arch = dict(spec.get("arch") or {})
    if spec["make"] == "fetch":
        return name, spec["model"], arch
    return name, spec.get("model", DEFAULT_TIMM), {"num_classes": num_classes(cfg["data"]), **arch}


def build_meta(name: str, timm_name: str, kwargs: dict, has_arch: bool) -> torch.nn.Module:
    """The timm model, built without weights on the meta device (on the CPU if meta is refused)."""
    if not timm.is_model(timm_name.split(".")[0]):
        raise Problem(f"backbones.{name}.model", f"unknown timm model {timm_name!r}")
    key = f"backbones.{name}.arch" if has_arch else f"backbones.{name}.model"
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of timm is a bad architecture
        if "meta" not in str(e):
            raise Problem(key, f"timm cannot build {timm_name!r} ({first_line(e)})") from None
    try:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise Problem(key, f"timm cannot build {timm_name!r} ({first_line(e)})") from None


def shape_of(model: torch.nn.Module, name: str, timm_name: str, arch: dict) -> tuple[int, int, int]:
    """(height, width, patch) that SPoTViT reads from `model`; Problem where SPoTViT would refuse it."""
    pe = getattr(model, "patch_embed", None)
    if not isinstance(getattr(pe, "proj", None), torch.nn.Conv2d):
        raise Problem(f"backbones.{name}.model", f"{timm_name!r} is not a timm VisionTransformer with a conv "
                      "patch embedding (SPoTViT needs one)")
    (h, w), (ph, pw) = tuple(pe.img_size), tuple(pe.patch_size)
    if ph != pw:
        raise Problem(arch_key(name, arch, "patch_size"), f"patch_size {ph}x{pw} is not square "
                      "(SPoTViT needs square patches)")
    if h % ph or w % pw:
        raise Problem(arch_key(name, arch, "img_size", "patch_size"),
                      f"img_size {h}x{w} is not divisible by patch_size {ph}")
    return h, w, ph


def arch_key(name: str, arch: dict, *keys: str) -> str:
    """'backbones.<name>.arch.<key>' for the first of `keys` set in `arch`, else 'backbones.<name>.model'."""
    return next((f"backbones.{name}.arch.{k}" for k in keys if k in arch), f"backbones.{name}.model")


def backbone_shapes(cfg: dict) -> dict[str, tuple[int, int, int]]:
    """Backbone name -> (height, width, patch), building each distinct architecture once."""
    built: dict[str, tuple[int, int, int]] = {}
    shapes = {}
    for name in cfg["backbones"]:
        owner, timm_name, kwargs = model_spec(cfg, name)
        if owner not in built:
            arch = cfg["backbones"][owner].get("arch") or {}
            model = build_meta(owner, timm_name, kwargs, bool(arch))
            built[owner] = shape_of(model, owner, timm_name, arch)
        shapes[name] = built[owner]
    return shapes


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
