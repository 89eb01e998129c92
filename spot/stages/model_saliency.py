"""Stage model-saliency: a saliency map per image from a trained backbone of the pipeline
(`spot.methods.model_saliency.input_gradient`), for the `model_salient` prior and case study 3."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spot.core.devices import resolve_device
from spot.data.decoded import Decoded
from spot.methods.model_saliency import input_gradient
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.utils.figures import save_preview, to_display
from spot.utils.io import atomic_path
from spot.utils.progress import progress


def run(p, inputs: dict, out: Path, backbone: str) -> Record:
    """Maps of `saliency.size` for the kNN bank's train images (the first `eval.knn.bank_size`) and
    every val image, in the decoded order: <split>-saliency.npy (n, size, size) uint8,
    <split>-keys.npy, and preview.png (the first `report.pictures` val images above their maps)."""
    device, size = resolve_device(p.device), p.size
    model = load_backbone(inputs["backbone"], device)
    data = Decoded(inputs["decoded"], model.data_config)
    dc, shown, counts = model.data_config, [], {}
    for split, limit in (("train", p.bank_size), ("val", None)):
        keys, maps = [], []
        for b in progress(data.batches(split, p.batch_size, limit=limit, device=device),
                      desc=f"model saliency {backbone} {split}", unit="batch"):
            m = input_gradient(model, b.images.to(device), size).cpu()
            keys += b.keys
            maps.append((m * 255).round().to(torch.uint8).numpy())
            if split == "val" and len(shown) < p.pictures:
                imgs = to_display(b.images[:p.pictures - len(shown)].cpu(), dc["mean"], dc["std"])
                shown += list(zip(imgs, m))
        for what, arr in (("saliency", np.concatenate(maps)), ("keys", np.asarray(keys))):
            with atomic_path(out / f"{split}-{what}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, arr)
        counts[split] = len(keys)
    save_preview(shown, out / "preview.png")
    return Record(dict(train_maps=counts["train"], val_maps=counts["val"]), ["preview.png"])
