"""Stage shard: the dataset's splits as WebDataset tars plus manifest.json (`spot.data.shards`)."""
from __future__ import annotations

from pathlib import Path

from spot.data.shards import write_shards
from spot.stages import Record


def run(p, inputs: dict, out: Path, workers: int | None = None) -> Record:
    data = p.data
    manifest = write_shards(data["source"], data["root"], out, splits=data["splits"],
                            images_per_shard=data["images_per_shard"], shard_bytes=data["shard_bytes"],
                            max_per_class=data["max_per_class"], max_images=data["max_images"], seed=p.seed,
                            workers=workers)
    counts = {f"{s}_images": v["count"] for s, v in manifest["splits"].items()}
    empty = sum(len(v["empty_classes"]) for v in manifest["splits"].values())
    return Record(dict(counts, skipped=len(manifest["skipped"]), empty_classes=empty), ["manifest.json"])
