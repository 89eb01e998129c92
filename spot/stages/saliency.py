"""Stage saliency: one map per image, in shards parallel to the image shards (`spot.core.saliency`)."""
from __future__ import annotations

from pathlib import Path

from spot.core.devices import resolve_device
from spot.data.saliency import write_saliency
from spot.data.shards import default_workers
from spot.stages import Record


def run(cfg: dict, inputs: dict, out: Path, workers: int | None = None) -> Record:
    saliency = cfg["saliency"]
    manifest = write_saliency(inputs["shards"], out, saliency["method"], saliency["size"], preview=cfg["report"]["pictures"],
                              workers=workers or default_workers(), device=resolve_device(cfg["device"]))
    return Record(dict(maps=sum(sh["count"] for sh in manifest["shards"])), ["manifest.json", "preview.png"])
