"""Kernel launches of the GPU jobs' hot loops, counted side by side in one run: an evaluate forward
(no grad) and one SPoT-ON step (forward, backward to the positions, optimizer step) of a frozen
ViT under bf16 autocast, with the frozen model's Linear weights cast at every forward (plain
autocast) and held in bf16 for the block (`spot.core.model.frozen(model, device)`).

A launch is an aten op that is not a view. At small budgets a SPoT-ON step is bound by launches,
not by the GPU (ViT-B at 25 tokens, batch 256: about 9 µs per launch against 70 ms of GPU work per
5 steps, measured on an H200), so fewer launches is faster there. Without a GPU, CUDA's autocast is
emulated on the CPU (the same casting rules); the counts do not depend on the batch.

    python -m benchmarks.bench_launches [--model vit_base_patch16_224] [--budget 25] [--device auto]
"""
from __future__ import annotations

import argparse
import collections
from unittest import mock

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spot.core.devices
import spot.methods.oracle
from benchmarks.common import report
from spot import SPoTViT, oracle_search, sample_positions
from spot.core.devices import autocast_for, resolve_device
from spot.core.model import frozen

NO_KERNEL = {"_unsafe_view", "lift_fresh", "detach", "alias", "_record_function_enter_new", "_record_function_exit"}


class Launches(TorchDispatchMode):
    """Counts the aten ops run in the block that launch a kernel, per op, in `.ops`."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--budget", type=int, default=25)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    if dev.type != "cuda":
        spot.core.devices.AUTOCAST[dev.type] = spot.core.devices.AUTOCAST["cuda"]       # emulate CUDA's autocast here
    torch.manual_seed(0)
    model = SPoTViT(timm.create_model(a.model, pretrained=False)).to(dev).eval()
    x = torch.randn(2, 3, *model.img_size, device=dev)
    pos = sample_positions("isotropic", 2, a.budget, *model.img_size, k=model.k).to(dev)
    labels = torch.zeros(2, dtype=torch.long, device=dev)

    def forward(held):
        with frozen(model, dev if held else None), Launches() as n, torch.no_grad(), autocast_for(dev):
            model(x, pos)
        return n.ops

    def step(held):                            # a search of 2 steps minus one of 1 step: one step, no fixed part
        def search(steps):
            with mock.patch.object(spot.methods.oracle, "frozen", frozen if held else lambda m, device: frozen(m)), \
                    Launches() as n:
                oracle_search(model, x, labels, pos, steps=steps)
            return n.ops
        return search(2) - search(1)

    rows = []
    for what, count in (("evaluate forward", forward), ("SPoT-ON step", step)):
        cast, held = count(False), count(True)
        rows.append(dict(bench=what, tokens=a.budget, launches_autocast=sum(cast.values()),
                         launches_held=sum(held.values()), casts_autocast=cast["_to_copy"],
                         casts_held=held["_to_copy"], ratio=sum(held.values()) / sum(cast.values())))
    report("launches", rows)


if __name__ == "__main__":
    main()
