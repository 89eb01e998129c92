"""ToMe at r = 13 on timm's AugReg ViT-B/16, against the ToMe paper (Bolya et al., ICLR 2023, off the
shelf: 84.57 -> 82.60 % top-1 on ImageNet-1k val), on the same images at r = 0 and r = 13.

    python -m benchmarks.bench_tome --val /datasets/imagenet/val [--checkpoint FILE] [--limit 10000]

Needs the weights (the Hugging Face cache, or --checkpoint: a local state-dict file) and ImageNet val
(`<val>/<wnid>/*.JPEG`); without either it prints why and exits 0 (the device has no internet)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MODEL = "vit_base_patch16_224.augreg_in21k_ft_in1k"     # timm 0.4.12's vit_base_patch16_224, the paper's


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val", type=Path, help="ImageNet val folder (<wnid>/*.JPEG)")
    ap.add_argument("--checkpoint", type=Path, help="local weights of the model (else the Hugging Face cache)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--limit", type=int, default=None, help="first images of val (default all)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")             # weights from the cache or --checkpoint, no download
    import timm
    import torch
    from timm.data import ImageNetInfo, create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    from spot.core.model import SPoTViT
    from spot.methods.merging import tome_flops, tome_forward
    if a.val is None or not a.val.is_dir():
        print(f"bench_tome: skipped, no ImageNet val folder (--val {a.val})")
        return 0
    try:
        if a.checkpoint:
            vit = timm.create_model(a.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(a.checkpoint)))
        else:
            vit = timm.create_model(a.model, pretrained=True)
    except (OSError, ValueError, RuntimeError) as e:         # nothing cached, or an unreadable file
        print(f"bench_tome: skipped, no weights of {a.model} at hand ({type(e).__name__}: {str(e)[:120]})")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SPoTViT(vit).eval().to(device)
    data = ImageFolder(str(a.val), transform=create_transform(**resolve_data_config({}, model=vit)))
    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    classes = torch.tensor([index[c] for c in data.classes])
    if a.limit:
        data = torch.utils.data.Subset(data, range(min(a.limit, len(data))))
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch, num_workers=8, pin_memory=True)
    correct, n, start = {0: 0, a.r: 0}, 0, time.time()
    with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), classes[y].to(device)
            for r in correct:
                correct[r] += (tome_forward(model, x, r).argmax(1) == y).sum().item()
            n += len(y)
    top1 = {r: 100 * c / n for r, c in correct.items()}
    res = dict(model=a.model, images=n, top1_r0=top1[0], top1_r=top1[a.r], r=a.r, drop=top1[0] - top1[a.r],
               paper=dict(r0=84.57, r13=82.60, drop=1.97), gflops_r0=tome_flops(model, 0) / 1e9,
               gflops_r=tome_flops(model, a.r) / 1e9, seconds=round(time.time() - start, 1), device=device)
    print(json.dumps(res, indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "tome.json").write_text(json.dumps(res, indent=1))
    ok = abs(res["drop"] - 1.97) <= 1.0
    print(f"bench_tome: ToMe r={a.r} costs {res['drop']:.2f} points (paper 1.97): {'as published' if ok else 'DIFFERS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
