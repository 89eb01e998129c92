"""Stage saliency: one map per image, in shards parallel to the image shards (`spot.core.saliency`)."""
from __future__ import annotations

from pathlib import Path

from spot.core.devices import resolve_device
from spot.data.saliency import write_saliency
from spot.data.shards import default_workers
from spot.stages import Record


def run(p, inputs: dict, out: Path, workers: int | None = None) -> Record:
    manifest = write_saliency(inputs["shards"], out, p.method, p.size, preview=p.pictures,
                              workers=workers or default_workers(), device=resolve_device(p.device))
    return Record(dict(maps=sum(sh["count"] for sh in manifest["shards"])), ["manifest.json", "preview.png"])
