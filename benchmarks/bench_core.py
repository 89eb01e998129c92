"""Core compute, measured side by side in one run:

1. subpixel tokenizer + linear embedding vs timm's conv patch embedding (same tokens, 196 at ViT-B/16);
2. SPoTViT on the full grid vs the wrapped timm ViT-B/16 (forward);
3. SPoTViT throughput at 25 / 49 / 100 / 196 tokens;
4. SPoT-ON oracle speed (image-steps per second);
5. with --compile: the bf16 forward (as evaluation runs it) and SPoT-ON, eager and through
   `torch.compile` (as `eval.compile` / `oracle.compile` run them), after a warm-up call that compiles.

    python benchmarks/bench_core.py [--batch 16] [--model vit_base_patch16_224] [--device auto]
        [--budgets 25 49 100 196] [--compile inductor]
"""
from __future__ import annotations

import argparse

import timm
import torch

from benchmarks.common import report, timeit
from spot import SPoTViT, extract_windows, oracle_search, sample_positions
from spot.core.devices import autocast_for, resolve_device
from spot.core.model import compile_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budgets", type=int, nargs="+", default=[25, 49, 100, 196])
    ap.add_argument("--compile", help="torch.compile backend for the compiled rows (e.g. inductor)")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    torch.manual_seed(0)
    vit = timm.create_model(a.model, pretrained=False).to(dev).eval()
    model = SPoTViT(vit).eval()
    x = torch.randn(a.batch, 3, *model.img_size, device=dev)
    grid = model.grid_positions(a.batch, dev)
    rows = []

    w, b = model.embed_weight()
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"

        def spot_embed():             # backward w.r.t. the positions (what the oracle needs)
            pos = grid.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = extract_windows(x, pos, model.k).flatten(2) @ w.detach().T + b.detach()
                if grad:
                    out.sum().backward()

        def conv_embed():             # backward w.r.t. the image (a grid has no positions)
            img = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = vit.patch_embed(img)
                if grad:
                    out.sum().backward()
        t_spot, t_conv = timeit(spot_embed, a.reps), timeit(conv_embed, a.reps)
        rows.append(dict(bench=f"embed {mode}", tokens=model.num_tokens, spot_ms=1e3 * t_spot, timm_ms=1e3 * t_conv,
                         ratio=t_spot / t_conv))

    with torch.no_grad():
        t_spot = timeit(lambda: model(x, grid), a.reps)
        t_timm = timeit(lambda: vit(x), a.reps)
    rows.append(dict(bench="model forward (full grid)", tokens=model.num_tokens, spot_ms=1e3 * t_spot,
                     timm_ms=1e3 * t_timm, ratio=t_spot / t_timm))

    for n in a.budgets:
        pos = sample_positions("isotropic", a.batch, n, *model.img_size, k=model.k).to(dev)
        with torch.no_grad():
            t = timeit(lambda: model(x, pos), a.reps)
        rows.append(dict(bench="model forward", tokens=n, spot_ms=1e3 * t, img_per_s=a.batch / t,
                         ratio=t / t_timm))

    labels = torch.randint(0, vit.num_classes, (a.batch,), device=dev)
    steps = 3
    for n in a.budgets:
        pos = sample_positions("isotropic", a.batch, n, *model.img_size, k=model.k).to(dev)
        t = timeit(lambda: oracle_search(model, x, labels, pos, steps=steps), max(1, a.reps - 1))
        rows.append(dict(bench=f"oracle ({steps} steps)", tokens=n, spot_ms=1e3 * t, img_per_s=a.batch * steps / t))

    if a.compile:
        compiled = compile_features(SPoTViT(vit).eval(), a.compile)
        for n in a.budgets:
            pos = sample_positions("isotropic", a.batch, n, *model.img_size, k=model.k).to(dev)
            for what, fn in (("eval forward (bf16 on CUDA)", lambda m: m(x, pos)),
                             (f"oracle ({steps} steps)", lambda m: oracle_search(m, x, labels, pos, steps=steps))):
                with torch.set_grad_enabled(what.startswith("oracle")), autocast_for(dev):
                    t_eager, t_comp = timeit(lambda: fn(model), a.reps), timeit(lambda: fn(compiled), a.reps)
                per = a.batch * (steps if what.startswith("oracle") else 1)
                rows.append(dict(bench=f"{what}, compiled ({a.compile}) vs eager", tokens=n, spot_ms=1e3 * t_comp,
                                 img_per_s=per / t_comp, ratio=t_comp / t_eager))
                print(rows[-1], flush=True)
    report("core", rows)


if __name__ == "__main__":
    main()
