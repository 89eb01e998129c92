"""Stage decode: every image and saliency map resized and cropped once for a data geometry
(`spot.data.decoded`); the stages after it read ready tensors."""
from __future__ import annotations

from pathlib import Path

from spot.data.decoded import write_decoded
from spot.data.geometry import parse_geometry
from spot.stages import Record


def run(p, inputs: dict, out: Path, geometry: str, workers: int | None = None) -> Record:
    index = write_decoded(inputs["shards"], inputs["saliency"], out, parse_geometry(geometry), workers=workers)
    return Record({f"{s}_images": v["count"] for s, v in index["splits"].items()}, ["decoded.json"])
