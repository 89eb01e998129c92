"""Backbones on disk: `out/backbones/<name>/{backbone.json, model.safetensors}`, loaded with one call."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from spot.model import SPoTViT
from spot.utils import atomic_path, read_json, resolve_device, write_json, write_run_record

DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def describe(model: SPoTViT, name: str, timm_name: str, model_kwargs: dict, source: str, **extra) -> dict:
    """The backbone.json record: what `load_backbone` needs to rebuild `model`, plus facts for people."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.data_config.items() if k in DATA_KEYS}
    return dict(name=name, timm_name=timm_name, model_kwargs=model_kwargs, data_config=cfg, source=source,
                img_size=list(model.img_size), patch_size=model.k, num_classes=model.num_classes,
                global_pool=model.vit.global_pool, num_params=sum(p.numel() for p in model.parameters()), **extra)


def save_backbone(model: SPoTViT, out_dir: str | Path, meta: dict) -> None:
    """Write the timm state dict (safetensors) and `backbone.json` (`meta`, from `describe`) atomically."""
    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.vit.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(out / "backbone.json", meta)


def build(timm_name: str, model_kwargs: dict, **create_kwargs) -> torch.nn.Module:
    """timm.create_model with a one-line error naming an unknown model."""
    if not timm.is_model(timm_name.split(".")[0]):
        raise ValueError(f"unknown timm model {timm_name!r}")
    return timm.create_model(timm_name, **model_kwargs, **create_kwargs)


def load_backbone(backbone_dir: str | Path, device: str | torch.device = "cpu") -> SPoTViT:
    """The SPoTViT saved in `backbone_dir`, in eval mode on `device`, `.data_config` as saved."""
    d = Path(backbone_dir)
    if not (d / "backbone.json").is_file():
        raise FileNotFoundError(f"backbone {d} does not exist (no {d / 'backbone.json'})")
    meta = read_json(d / "backbone.json")
    vit = build(meta["timm_name"], meta["model_kwargs"], pretrained=False)
    vit.load_state_dict(load_file(str(d / "model.safetensors")))
    model = SPoTViT(vit, k=meta["patch_size"])
    model.data_config = dict(model.data_config, **{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in meta["data_config"].items()})
    model.meta = meta
    return model.eval().to(resolve_device(device))


def fetch(name: str, out_dir: str | Path, model: str, checkpoint: str | None = None, pretrained: bool = True,
          **model_kwargs) -> dict:
    """Fetch timm model `model` (pretrained weights from the hub, or the state dict in a local
    `checkpoint` file, loaded strictly by timm's `checkpoint_path`) and save it as backbone `name`."""
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint file {checkpoint} does not exist (backbones.{name}.checkpoint)")
    extra = dict(checkpoint_path=str(checkpoint), pretrained=False) if checkpoint else dict(pretrained=pretrained)
    vit = build(model, model_kwargs, **extra)
    spot_model = SPoTViT(vit)
    meta = describe(spot_model, name, model, model_kwargs, source="fetch", checkpoint=checkpoint)
    save_backbone(spot_model, out_dir, meta)
    write_run_record(out_dir, stage="backbone", job=f"backbone/{name}",
                     params=dict(backbone=name, timm_name=model, checkpoint=str(checkpoint), pretrained=pretrained),
                     metrics=dict(num_params=meta["num_params"]), artifacts=["backbone.json"])
    return meta
