"""A backbone's geometry before it exists: `planned_data_config`, from its
`spot.training.backbones.backbone_spec` and timm's pretrained config (cached: the stage table and
dvc.yaml plan every job's decoded images with it, without importing timm)."""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
from pathlib import Path

from spot.data.geometry import GEOMETRY, overlay
from spot.training.backbones import backbone_spec
from spot.utils.io import read_json, write_json


def planned_data_config(cfg: dict, backbone: str) -> dict:
    """The geometry backbone `backbone` of `cfg` will have (what `spot.core.model.SPoTViT`, `fetch` and
    training give it): timm's pretrained config of its model at its image size (a fine-tuned one: its
    `init`'s), then the keys its `Spec.data_config` sets."""
    spec = backbone_spec(cfg, backbone)
    if spec.init:
        dc = planned_data_config(cfg, spec.init)
    else:
        pre = pretrained_geometry(spec.model)
        if pre is None:
            raise ValueError(f"backbones.{backbone}.model: unknown timm model {spec.model!r}")
        size = spec.arch.get("img_size", pre["input_size"][1:])
        size = (size, size) if isinstance(size, int) else tuple(size)
        dc = dict(pre, input_size=(3, *size))
    dc = overlay(dc, spec.data_config)
    return {k: dc[k] for k in GEOMETRY}


@functools.cache
def pretrained_geometry(model: str) -> dict | None:
    """The geometry of timm model `model`'s pretrained config (None: no such model), kept per timm
    version in `$XDG_CACHE_HOME/spot/` (default ~/.cache) and per process: every job plans its input
    folders with it, and reading the cache spares the jobs that load no model the import of timm (2 s)."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spot" / \
        f"timm-{importlib.metadata.version('timm')}-pretrained.json"
    try:
        cache = read_json(path)
    except (OSError, ValueError):
        cache = {}
    if model not in cache:
        import timm  # only on a cache miss (2 s)
        pre = timm.models.get_pretrained_cfg(model)
        if pre is None:
            return None
        cache[model] = dict(input_size=list(pre.input_size), interpolation=pre.interpolation,
                            crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)
        with contextlib.suppress(OSError):                       # a read-only home: no cache, same answer
            write_json(path, cache)
    return cache[model]
