"""Stage analyze: saliency under the initial vs the final oracle positions (case study 3), and a
picture sheet of the search trajectories."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from spot.data.decoded import Decoded
from spot.data.imagenet import short_name
from spot.data.saliency import SaliencyMaps
from spot.stages import Record
from spot.training.backbones import read_meta
from spot.utils.figures import draw_trajectories, save_fig, to_display
from spot.utils.io import atomic_path, read_json, write_json


def saliency_at(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, N) saliency read bilinearly at positions (B, N, 2) (y, x) in [0, 1] from maps (B, H, W)."""
    grid = (2 * positions - 1).flip(-1)[:, None]
    return F.grid_sample(maps[:, None], grid, mode="bilinear", align_corners=False)[:, 0, 0]


def run(p, inputs: dict, out: Path, backbone: str, budget: int) -> Record:
    """Writes saliency.parquet (per image: key, the mean saliency under the tokens at the start `init`
    and the end `final`, and `model_init`, `model_final` under the model's maps), saliency.json (mean
    saliency at the start and the end, the fraction of images whose
    tokens moved to more salient pixels; the same prefixed `model_` under the maps of stage
    model-saliency, when the config makes them) and trajectories.png (`report.pictures` images, titled
    with their class names)."""
    pictures = p.pictures
    found = pd.read_parquet(inputs["oracle"] / "results.parquet").set_index("key")
    prior = read_json(inputs["oracle"] / "run.json")["params"]["oracle.prior"]
    meta = read_meta(inputs["backbone"])
    dc = meta["data_config"]
    model_maps = SaliencyMaps(inputs["model_saliency"]) if "model_saliency" in inputs else None
    sums: dict[str, list] = {}                            # "<prefix><init|final>" -> per-batch (B,) means
    shown = []
    data = Decoded(inputs["decoded"], dc)
    keys = []
    for b in data.batches("val", 256, saliency=True):
        rows = found.loc[b.keys]
        keys += b.keys
        init, final = (torch.from_numpy(np.stack(rows[c].to_numpy()).astype(np.float32)).view(len(b.keys), -1, 2)
                       for c in ("init", "final"))
        maps = {"": b.saliency} | ({"model_": model_maps("val", b.keys)} if model_maps else {})
        for prefix, m in maps.items():
            sums.setdefault(prefix + "init", []).append(saliency_at(m, init).mean(1))
            sums.setdefault(prefix + "final", []).append(saliency_at(m, final).mean(1))
        if len(shown) < pictures:
            imgs = to_display(b.images[:pictures - len(shown)], dc["mean"], dc["std"])
            shown += [(im, np.stack([i, f]), short_name(data.class_names[y]))
                      for im, i, f, y in zip(imgs, init.numpy(), final.numpy(), b.labels.tolist())]
    metrics, per_image = {}, {k: torch.cat(v).numpy() for k, v in sums.items()}
    for prefix in ("", "model_") if model_maps else ("",):
        init_s, final_s = torch.from_numpy(per_image[prefix + "init"]), torch.from_numpy(per_image[prefix + "final"])
        metrics |= {f"{prefix}saliency_init": init_s.mean().item(), f"{prefix}saliency_final": final_s.mean().item(),
                    f"{prefix}saliency_delta": (final_s - init_s).mean().item(),
                    f"{prefix}frac_images_more_salient": (final_s > init_s).float().mean().item()}
    metrics["n"] = len(init_s)
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(2 * max(1, len(shown)), 2.3), squeeze=False)
    for ax, (im, traj, name) in zip(axes[0], shown):
        draw_trajectories(ax, im, traj, meta["patch_size"])
        ax.set_title(name, fontsize=7)
    fig.suptitle(f"SPoT-ON {backbone} {prior} N={budget}: start (cyan) -> end (red)")
    save_fig(fig, out / "trajectories.png")
    write_json(out / "saliency.json", metrics)
    with atomic_path(out / "saliency.parquet") as tmp:
        pd.DataFrame(dict(key=keys, **per_image)).to_parquet(tmp, index=False)
    return Record(metrics, ["saliency.json", "saliency.parquet", "trajectories.png"])
