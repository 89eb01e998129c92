"""Stage oracle: SPoT-ON over one part of the val shards (joined by stage oracle-gather)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spot.core.devices import resolve_device, to_device
from spot.core.model import compile_features
from spot.core.priors import NEEDS_SALIENCY, check_budget, positions_for, split_seed
from spot.data.decoded import Decoded
from spot.methods.oracle import oracle_search
from spot.stages import Record
from spot.training.backbones import load_backbone
from spot.utils.io import atomic_path
from spot.utils.progress import progress

FIELDS = ("init", "final", "trajectory", "correct", "snapped", "snapped_correct", "features")


def images_per_batch(batch_size: int, batch_tokens: int | None, budget: int) -> int:
    """Images per SPoT-ON batch at `budget` tokens: `batch_size` (`oracle.batch_size`), or with `batch_tokens`
    (`oracle.batch_tokens`) the same tokens per batch at every budget."""
    return batch_size if batch_tokens is None else max(1, batch_tokens // budget)


def run(p, inputs: dict, out: Path, backbone: str, budget: int, part: int) -> Record:
    """SPoT-ON for every image of the val shards `part::oracle.parts`, each shard in batches of its
    own (`images_per_batch`: a batch never spans two shards, so the batches do not depend on the parts),
    starting from the positions `evaluate` draws for val (prior `oracle.prior`, `split_seed`). Writes part.npz:
    keys, labels, init and final positions (n, N, 2) float32, trajectory (n, T, N, 2) float16 (every
    `oracle.save_every`-th step and the last), correct (n, steps+1), snapped (n, N, 2),
    snapped_correct (n,), features (n, D) at the final positions."""
    device = resolve_device(p.device)
    model = compile_features(load_backbone(inputs["backbone"], device), p.compile)
    check_budget(p.prior, budget, *model.img_size, model.k)
    data = Decoded(inputs["decoded"], model.data_config)
    data.require_head(model.num_classes)
    every = [e["name"] for e in data.index["splits"]["val"]["shards"]]
    shards = every[part::p.parts]
    if not shards:
        raise ValueError(f"part {part} of oracle.parts {p.parts} gets none of the {len(every)} val shards: "
                         f"set oracle.parts to at most {len(every)} (or write more, smaller shards: data.images_per_shard)")
    kept = sorted(set(range(0, p.steps + 1, p.save_every)) | {p.steps})
    found: dict[str, list] = {k: [] for k in ("keys", "labels", *FIELDS)}
    # one reading thread for all the part's shards: it runs ahead across their boundaries
    batches = data.batches("val", images_per_batch(p.batch_size, p.batch_tokens, budget),
                           saliency=p.prior in NEEDS_SALIENCY, shards=shards, device=device)
    for b in progress(batches, desc=f"oracle {backbone}/{budget} part {part}", unit="batch"):
        init = positions_for(p.prior, budget, b.keys, split_seed(p.seed, "val"), *model.img_size,
                             model.k, b.saliency, b.images, device)
        r = oracle_search(model, b.images, to_device(b.labels, device), init, steps=p.steps, lr=p.lr, optimizer=p.optimizer)
        found["keys"] += b.keys
        found["labels"].append(b.labels)
        found["init"].append(r.trajectory[:, 0])
        found["final"].append(r.positions)
        found["trajectory"].append(r.trajectory[:, kept].half())
        for k in ("correct", "snapped", "snapped_correct", "features"):
            found[k].append(getattr(r, k))
    # results stay on the device until the part is done: no wait for the GPU between batches
    arrays = {k: np.asarray(v) if k == "keys" else torch.cat(v).cpu().numpy() for k, v in found.items() if v}
    with atomic_path(out / "part.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    # the part's own accuracy-per-step curve (its images), a step series of its MLflow run
    curve = arrays["correct"].mean(0).tolist() if "correct" in arrays else []
    return Record(dict(images=len(found["keys"]), shards=len(shards), top1_per_step=curve), [])
