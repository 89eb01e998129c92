import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
IMAGENET_SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def imagenet_sample() -> Path:
    assert IMAGENET_SAMPLE.is_dir(), f"{IMAGENET_SAMPLE} is missing (shared/ must sit beside the repo)"
    return IMAGENET_SAMPLE


def smoke_config(root: Path, **changes) -> Path:
    """config/smoke.yaml with outputs and the MLflow store under `root`, plus top-level `changes`;
    written to root/params.yaml, whose path is returned."""
    import yaml
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg.update(root=str(root / "out"), mlflow={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}, **changes)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def smoke_stages(tmp_path_factory):
    """Shards, saliency maps and the two trained backbones of the smoke config, made through `spot`
    in-process: (params path, config dict, output root)."""
    from spot.cli import main
    from spot.config import load_config
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    params = smoke_config(tmp_path_factory.mktemp("smoke"))
    cfg = load_config(params)
    for argv in (["shard"], ["saliency"], ["backbone", "--name", "spot-a"], ["backbone", "--name", "grid-b"]):
        assert main([*argv, "--params", str(params)]) == 0, argv
    return params, cfg, Path(cfg["root"])
