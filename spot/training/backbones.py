"""Backbones: what a backbone's config means (`backbone_spec`: the timm model it builds and its data
config, for preflight, the backbone stage and the workflow's plans), building it (`build`,
`uninitialised`), and its files `out/backbones/<name>/{backbone.json, model.safetensors}`, loaded
with one call. Init chains are acyclic and name backbones of the file (`spot.workflow.config.relations`)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from spot.utils.io import atomic_path, read_json, write_json

# torch, timm and the model load in the functions that use them: stages that only read
# backbone.json (analyze, report) and the workflow's plans never import them
if TYPE_CHECKING:
    import torch

    from spot.core.model import SPoTViT

DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class Spec(NamedTuple):
    """Backbone `name` as timm makes it. A fine-tuned one (`init`: the backbone it starts from) has
    its init's model, kwargs and data config (`architecture`), then its own `data_config` keys."""
    name: str
    model: str                 # timm model name (create_model's first argument)
    arch: dict                 # create_model kwargs as written (`kwargs` adds a trained head)
    trained: bool              # make: train (its head has one logit per class of the data)
    init: str | None
    data_config: dict          # preprocessing keys the params file sets over the model's (timm names)

    def kwargs(self, classes: int | None = None) -> dict:
        """timm.create_model kwargs: a trained model's head has `classes` logits (the data's class count)."""
        return {"num_classes": classes, **self.arch} if self.trained else dict(self.arch)

    @classmethod
    def of(cls, name: str, config: dict, train: dict | None) -> Spec:
        """Backbone `name` of config `config` (`backbones.<name>`, validated); a trained one reads `train`'s
        `data_config` (the config's `train`), its own `data_config` keys replacing those."""
        trained = config["make"] == "train"
        data_config = dict(train["data_config"], **config["data_config"]) if trained else dict(config["data_config"])
        return cls(name, config["model"], dict(config["arch"]), trained, config["init"] if trained else None, data_config)


def backbone_spec(cfg: dict, name: str) -> Spec:
    """The `Spec` of backbone `name` of the validated `cfg` (`Spec.of`)."""
    return Spec.of(name, cfg["backbones"][name], cfg["train"])


def architecture(cfg: dict, name: str) -> Spec:
    """The `Spec` whose model and kwargs backbone `name` has: its own, or its init chain's end's."""
    spec = backbone_spec(cfg, name)
    return architecture(cfg, spec.init) if spec.init else spec


def describe(model: SPoTViT, name: str, timm_name: str, model_kwargs: dict, source: str, data_config_set: dict,
             **extra) -> dict:
    """The backbone.json record: what `load_backbone` needs to rebuild `model`, plus facts for people.
    `data_config` is the preprocessing the backbone is run with; `data_config_from` says where it
    came from: the timm pretrained config it started from and the keys the params file set
    (`data_config_set`)."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.data_config.items() if k in DATA_KEYS}
    pre = model.vit.pretrained_cfg
    timm_cfg = ".".join(filter(None, (pre.get("architecture"), pre.get("tag"))))
    return dict(name=name, timm_name=timm_name, model_kwargs=model_kwargs, data_config=cfg, source=source,
                data_config_from=dict(timm=timm_cfg, params=data_config_set),
                img_size=list(model.img_size), patch_size=model.k, num_classes=model.num_classes,
                global_pool=model.vit.global_pool, num_params=sum(p.numel() for p in model.parameters()), **extra)


def save_backbone(model: SPoTViT, out_dir: str | Path, meta: dict) -> None:
    """Write the timm state dict (safetensors) and `backbone.json` (`meta`, from `describe`, and the
    weights' sha256, which `load_backbone` checks) atomically."""
    from safetensors.torch import save_file

    from spot.data.loading import file_sha256
    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.vit.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
        sha256 = file_sha256(tmp)
    write_json(out / "backbone.json", dict(meta, weights_sha256=sha256))


class UnknownModel(ValueError):
    """A timm model name that timm does not know."""


def build(timm_name: str, model_kwargs: dict, **create_kwargs) -> torch.nn.Module:
    """timm.create_model with a one-line error naming an unknown model."""
    import timm
    if not timm.is_model(timm_name.split(".")[0]):
        raise UnknownModel(f"unknown timm model {timm_name!r}")
    return timm.create_model(timm_name, **model_kwargs, **create_kwargs)


def uninitialised(timm_name: str, model_kwargs: dict) -> torch.nn.Module:
    """`build(..., pretrained=False)` without the random initialisation (ViT-B: 0.7 s on 2 cores),
    for a state dict to fill: built on the meta device, then given empty CPU memory. A model with
    buffers that no state dict holds (computed when it is built), or one that fails on the meta
    device, is built as usual (a bad config raises the error of that build)."""
    import torch
    try:
        with torch.device("meta"):
            vit = build(timm_name, model_kwargs, pretrained=False)
    except Exception:  # noqa: BLE001 - any failure on the meta device: the usual build, which raises its own
        return build(timm_name, model_kwargs, pretrained=False)
    if {n for n, _ in vit.named_buffers()} - set(vit.state_dict()):
        return build(timm_name, model_kwargs, pretrained=False)
    return vit.to_empty(device="cpu")


def read_meta(backbone_dir: str | Path) -> dict:
    """`backbone_dir`'s backbone.json, its data_config as timm gives it (lists as tuples)."""
    d = Path(backbone_dir)
    if not (d / "backbone.json").is_file():
        raise FileNotFoundError(f"backbone {d} does not exist (no {d / 'backbone.json'})")
    meta = read_json(d / "backbone.json")
    meta["data_config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
    return meta


def load_backbone(backbone_dir: str | Path, device: str | torch.device = "cpu") -> SPoTViT:
    """The SPoTViT saved in `backbone_dir`, in eval mode on `device`, `.data_config` as saved."""
    from safetensors.torch import load_file

    from spot.core.devices import resolve_device
    from spot.core.model import SPoTViT
    from spot.training.checkpoint import check_weights, load_state, read_errors
    meta = read_meta(backbone_dir)
    vit = uninitialised(meta["timm_name"], meta["model_kwargs"])
    weights = Path(backbone_dir) / "model.safetensors"
    with read_errors(weights):
        state = load_file(str(weights))
    load_state(vit, state, weights)
    check_weights(weights, Path(backbone_dir) / "backbone.json", meta.get("weights_sha256"))
    model = SPoTViT(vit, k=meta["patch_size"])
    model.data_config = dict(model.data_config, **meta["data_config"])
    model.meta = meta
    return model.eval().to(resolve_device(device))


def _load_timm_checkpoint(vit: torch.nn.Module, path: str | Path) -> None:
    """Load `path` into `vit` as timm.create_model(checkpoint_path=path) does (weights-only, EMA weights,
    DDP prefixes; .npz by the model's own loader), strictly, with one-line errors naming `path`."""
    import timm

    from spot.training.checkpoint import load_state, read_errors
    with read_errors(path):
        if Path(path).suffix.lower() in (".npz", ".npy"):
            timm.models.load_checkpoint(vit, str(path))
            return
        state = timm.models.load_state_dict(str(path))
    load_state(vit, state, path)


def checkpoint_shapes(path: str | Path) -> dict:
    """The tensors of a state-dict file as `_load_timm_checkpoint` would load them (EMA weights,
    'model' / 'state_dict' entries, DDP prefixes), on the meta device: names and shapes without
    reading the data (a safetensors header; a weights-only, memory-mapped torch.load). One-line
    ValueError naming `path` when it is not a weights file."""
    import timm
    import torch

    from spot.training.checkpoint import read_errors
    with read_errors(path):
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            return timm.models.clean_state_dict(state)
        return timm.models.load_state_dict(str(path), device="meta")


def fetch(name: str, out_dir: str | Path, model: str, checkpoint: str | None = None, pretrained: bool = True,
          data_config: dict | None = None, **model_kwargs) -> dict:
    """Fetch timm model `model` (pretrained weights from the hub, or the state dict in a local
    `checkpoint` file, loaded strictly as timm's `checkpoint_path` would) and save it as backbone
    `name`. Its preprocessing is the timm pretrained config of `model` with the keys of
    `data_config` (mean, std, crop_pct, interpolation, crop_mode) replaced."""
    from spot.core.model import SPoTViT
    from spot.data.geometry import overlay
    vit = build(model, model_kwargs, pretrained=pretrained and not checkpoint)
    if checkpoint:
        _load_timm_checkpoint(vit, checkpoint)
    spot_model = SPoTViT(vit)
    spot_model.data_config = overlay(spot_model.data_config, data_config or {})
    meta = describe(spot_model, name, model, model_kwargs, source="fetch", data_config_set=data_config or {},
                    checkpoint=checkpoint)
    save_backbone(spot_model, out_dir, meta)
    return meta
