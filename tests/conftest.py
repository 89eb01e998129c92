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
