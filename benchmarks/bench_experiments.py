"""Experiment stages on the default model size (28 px Fashion-MNIST, patch 4, 4 blocks of width 96),
run as `spot` jobs on a default-sized config, measured in one run:

1. `evaluate` (kNN bank on train + top-1 on val) in images per second, per token budget;
2. `oracle` (SPoT-ON on the val shards, one part) in image-steps per second, per token budget.

    python -m benchmarks.bench_experiments [--images 1000] [--device auto]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import yaml

from benchmarks.common import report
from spot import SPoTViT
from spot.cli import main as spot
from spot.training.backbones import describe, save_backbone
from spot.workflow.layout import Layout
from spot.workflow.outputs import write_run_record

ARCH = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)
BUDGETS = (4, 16, 49)


def config(tmp: Path, images: int, steps: int, device: str) -> Path:
    """params.yaml with its data cut to `images` per split and outputs under `tmp`."""
    cfg = yaml.safe_load(Path("params.yaml").read_text())
    cfg.update(root=str(tmp / "out"), device=device, mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
               backbones={"b": {"make": "train", "arch": ARCH}})
    cfg["data"].update(max_per_class=images // 10, images_per_shard=images)
    cfg["eval"].update(priors=["isotropic"], budgets=list(BUDGETS))
    cfg["eval"]["knn"]["bank_size"] = None
    cfg["oracle"].update(budgets=list(BUDGETS), steps=steps, parts=1)
    cfg["transfer"]["budgets"] = [BUDGETS[0]]
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="images per split")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        params = config(Path(tmp), a.images, a.steps, a.device)
        assert spot(["shard", "--params", str(params)]) == 0
        out = Layout(Path(tmp) / "out")("backbone", backbone="b")               # an untrained backbone
        model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH))
        save_backbone(model, out, describe(model, "b", "vit_tiny_patch16_224", ARCH, source="bench"))
        write_run_record(out, stage="backbone", job="backbone/b", params={}, metrics={}, artifacts=[])
        for n in BUDGETS:
            t = time.perf_counter()
            assert spot(["evaluate", "--params", str(params), "--backbone", "b", "--prior", "isotropic",
                         "--budget", str(n)]) == 0
            dt = time.perf_counter() - t
            rows.append(dict(stage="evaluate", tokens=n, images=2 * a.images, seconds=dt, img_per_s=2 * a.images / dt))
        for n in BUDGETS:
            t = time.perf_counter()
            assert spot(["oracle", "--params", str(params), "--backbone", "b", "--budget", str(n), "--part", "0"]) == 0
            dt = time.perf_counter() - t
            rows.append(dict(stage=f"oracle ({a.steps} steps)", tokens=n, images=a.images, seconds=dt,
                             img_steps_per_s=a.images * a.steps / dt))
    report("experiments", rows)


if __name__ == "__main__":
    main()
