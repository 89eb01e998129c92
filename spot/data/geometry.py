"""A data geometry: the keys of a timm data config that decide the decoded pixels, and its folder
name. Standard library only: the workflow plans its decoded folders with it before any model exists."""
from __future__ import annotations

GEOMETRY = ("input_size", "interpolation", "crop_pct", "crop_mode")


def geometry(data_config: dict) -> dict:
    """The keys of a timm data config that decide the decoded pixels (not mean and std)."""
    return {k: list(data_config[k]) if k == "input_size" else data_config[k] for k in GEOMETRY}


def geometry_name(data_config: dict) -> str:
    """A folder name for a geometry, e.g. '28x28-bilinear-crop1-center'."""
    g = geometry(data_config)
    return f"{g['input_size'][1]}x{g['input_size'][2]}-{g['interpolation']}-crop{g['crop_pct']:g}-{g['crop_mode']}"


def parse_geometry(name: str) -> dict:
    """The geometry a `geometry_name` names (its inverse)."""
    size, interpolation, crop, mode = name.split("-")
    h, w = size.split("x")
    return dict(input_size=(3, int(h), int(w)), interpolation=interpolation, crop_pct=float(crop.removeprefix("crop")),
                crop_mode=mode)


def overlay(data_config: dict, *overrides: dict) -> dict:
    """`data_config` with the keys of each of `overrides` in turn replacing its own (lists as tuples,
    as timm gives them)."""
    out = dict(data_config)
    for o in overrides:
        out.update({k: tuple(v) if isinstance(v, list) else v for k, v in o.items()})
    return out
