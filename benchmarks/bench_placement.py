"""Label-free placement at inference, measured beside the backbone in one run, per token budget:
images per second of the backbone alone (a fixed prior), the learned global prior (the same
forward: shared positions), the placer (its CNN, then the backbone) and the entropy search (steps
forward + backward passes, then the forward), with each method's time and FLOPs over the backbone's.

    python -m benchmarks.bench_placement [--batch 256] [--budgets 4 16] [--steps 5] [--device auto]

Defaults: the default config's model (28 px, patch 4, 4 blocks of width 96) and placer (14 px
input, width 8); weights are random (speed does not depend on them).
"""
from __future__ import annotations

import argparse

import timm
import torch

from benchmarks.common import report, timeit
from spot import SPoTViT
from spot.core.cost import count_flops
from spot.core.devices import resolve_device
from spot.methods.entropy_search import entropy_search
from spot.methods.learned_prior import initial_positions
from spot.methods.placer import Placer

ARCH = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--steps", type=int, default=5, help="entropy search steps")
    ap.add_argument("--in-size", type=int, default=14)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    torch.manual_seed(0)
    model = SPoTViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)).to(dev).eval()
    x = torch.randn(a.batch, 3, *model.img_size, device=dev)
    rows = []
    for n in a.budgets:
        prior = initial_positions("isotropic", n, model.img_size, model.k).to(dev).expand(a.batch, -1, -1)
        placer = Placer(n, in_size=a.in_size, width=a.width, init=prior[0].cpu()).to(dev).eval()

        @torch.no_grad()
        def backbone():
            return model(x, prior)

        @torch.no_grad()
        def placed():
            return model(x, placer(x))

        methods = {"backbone (fixed prior)": backbone, "learned global prior": backbone, "placer": placed,
                   f"entropy search ({a.steps} steps)": lambda: entropy_search(model, x, prior, steps=a.steps)}
        base_s, base_flops = timeit(backbone, a.reps), count_flops(backbone, model)
        for name, fn in methods.items():
            s = base_s if fn is backbone else timeit(fn, a.reps)
            rows.append(dict(tokens=n, method=name, img_per_s=a.batch / s, time_vs_backbone=s / base_s,
                             flops_vs_backbone=count_flops(fn, model) / base_flops))
    report("placement", rows)


if __name__ == "__main__":
    main()
