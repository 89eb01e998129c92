"""Placers on disk: `placer.safetensors` (the state dict) and `placer.json` (its arguments and facts)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spot.data.loading import file_sha256
from spot.methods.placer import Placer
from spot.training.checkpoint import check_weights
from spot.utils.io import atomic_path, read_json, write_json


def save_placer(placer: Placer, out_dir: str | Path, meta: dict | None = None) -> None:
    """Write out_dir/placer.safetensors (the state dict) and out_dir/placer.json (`placer.config`
    plus `meta`, e.g. backbone, budget, training settings, and the weights' sha256, which `load_placer`
    checks), atomically."""
    out = Path(out_dir)
    with atomic_path(out / "placer.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in placer.state_dict().items()}, str(tmp))
        sha256 = file_sha256(tmp)
    write_json(out / "placer.json", dict(meta or {}, config=placer.config, weights_sha256=sha256))


def load_placer(out_dir: str | Path, device: str | torch.device = "cpu") -> Placer:
    """The Placer saved by `save_placer` in out_dir, in eval mode on `device` (`.meta`: its placer.json)."""
    meta = read_json(Path(out_dir) / "placer.json")
    placer = Placer(**meta["config"])
    placer.load_state_dict(load_file(str(Path(out_dir) / "placer.safetensors")))
    check_weights(Path(out_dir) / "placer.safetensors", Path(out_dir) / "placer.json", meta.get("weights_sha256"))
    placer.meta = meta
    return placer.eval().to(device)
