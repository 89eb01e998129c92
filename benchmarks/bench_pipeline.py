"""Each stage's throughput next to the core's on the same model, budget and batch, in one run, on
real ImageNet JPEGs (the shared sample, or tests/data, copied into train/ and val/):

1. the data path from the decoded arrays with a no-op model (images per second), next to decoding
   the JPEG shards on the fly (the loader the stages used before);
2. `spot evaluate` (kNN bank + val at every budget in one pass, as a job) against the model alone
   (forward on tensors already in memory, same prior, budgets and batch): the model's seconds over
   the job's (the evaluate time per budget for `--estimate` splits the job's time as the model's);
3. `spot oracle` (one part: all val shards) against `oracle_search` alone on the same batches (each
   shard on its own, `oracle.batch_size` or `--oracle-batch-tokens` // budget images): image-steps
   per second, stage over core.

    python -m benchmarks.bench_pipeline [--copies 20] [--model vit_tiny_patch16_224] [--img-size 64]
        [--patch 8] [--budgets 16 64] [--batch 64] [--device auto] [--sample DIR] [--estimate config/imagenet.yaml]
        [--compile inductor] [--oracle-batch-tokens 50176] [--images-per-shard 1000]

A ratio near 1 means the stage keeps the model busy; the rest is data, Python and job overhead. On
CUDA (with nvidia-ml-py) the GPU busy fraction of each job, and of the core alone, is sampled every
20 ms. `--estimate` turns the measured per-image times (linear in the budget between the two
budgets measured) into the GPU time of a whole configuration's evaluate, oracle and transfer jobs.
"""
from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import timm
import torch
import yaml

from benchmarks.common import SAMPLE, imagenet_layout, report
from spot import SPoTViT, oracle_search
from spot.cli import main as spot
from spot.core.devices import autocast_for, resolve_device, to_device
from spot.core.model import frozen
from spot.core.priors import positions_for
from spot.data.decoded import Decoded
from spot.data.geometry import geometry_name
from spot.data.stream import make_loader
from spot.stages.oracle import images_per_batch
from spot.training.backbones import describe, load_backbone, save_backbone
from spot.workflow.config import load_config
from spot.workflow.layout import Layout
from spot.workflow.outputs import write_run_record

PRIOR = "isotropic"


def config(tmp: Path, root: Path, a) -> Path:
    """A params file for the copied images, one untrained-backbone slot, budgets `a.budgets`."""
    cfg = yaml.safe_load(Path("params.yaml").read_text())
    cfg.update(name="bench-pipeline", root=str(tmp / "out"), device=a.device,
               mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
               backbones={"b": {"make": "train", "model": a.model,
                                "arch": dict(img_size=a.img_size, patch_size=a.patch, num_classes=1000)}})
    cfg["data"].update(source="imagenet", root=str(root), max_per_class=None, images_per_shard=a.images_per_shard)
    cfg["train"]["data_config"] = {}
    cfg["eval"].update(priors=[PRIOR], budgets=a.budgets, batch_size=a.batch)
    cfg["eval"]["knn"]["bank_size"] = None
    cfg["oracle"].update(prior=PRIOR, budgets=a.budgets, batch_size=a.batch, batch_tokens=a.oracle_batch_tokens,
                         parts=1, steps=a.steps)
    cfg["transfer"]["budgets"] = a.budgets[:1]
    cfg["saliency"]["model"] = None                                  # maps from the image alone
    cfg["placement"].update(methods=[], budgets=a.budgets[:1], transfer=[])   # no label-free placement jobs
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


class GpuBusy:
    """Context manager: the fraction of 20 ms samples in which the GPU ran a kernel (NVML's
    utilisation), in `.busy`; None without CUDA or nvidia-ml-py."""

    def __init__(self):
        self.busy, self.samples, self.stop = None, [], threading.Event()

    def __enter__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # noqa: BLE001 - no GPU, no NVML: nothing to sample
            return self

        def sample():
            while not self.stop.wait(0.02):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if hasattr(self, "thread"):
            self.thread.join()
            self.busy = sum(self.samples) / len(self.samples) / 100 if self.samples else None


def busy_timed(fn) -> tuple[float, float | None]:
    """Seconds and GPU busy fraction of `fn()`."""
    with GpuBusy() as gpu:
        t = timed(fn)
    return t, gpu.busy


def job(argv: list[str]) -> tuple[float, float | None]:
    """Seconds and GPU busy fraction of one `spot` command run in this process (exits if it fails)."""
    codes = []
    torch._dynamo.reset()                   # compiled forwards start cold, as in a job's own process
    t, busy = busy_timed(lambda: codes.append(spot(argv)))
    if codes[-1] != 0:
        raise SystemExit(f"spot {' '.join(argv)} failed")
    return t, busy


def estimate(path: str, per_image: dict) -> list[dict]:
    """GPU hours of config `path`'s evaluate, oracle and transfer jobs from measured seconds per
    image (evaluate, transfer) and per image-step (oracle), {stage: (budget_a, t_a, budget_b, t_b)},
    linear in the budget. Bank and val sizes: data.max_per_class x classes (ImageNet: 1000; val
    50 per class when null), the kNN bank capped at eval.knn.bank_size."""
    cfg = load_config(path)
    per_class = cfg["data"]["max_per_class"] or {}
    n_val = 50 * 1000 if per_class.get("val") is None else per_class["val"] * 1000
    n_bank = min(x for x in (1_281_167 if per_class.get("train") is None else per_class["train"] * 1000,
                             cfg["eval"]["knn"].get("bank_size") or 10**9))

    def seconds(stage, n):
        a, ta, b, tb = per_image[stage]
        return max(ta + (tb - ta) * (n - a) / (b - a), min(ta, tb))     # never below a measured time
    backbones, rows = len(cfg["backbones"]), []
    ev = sum(seconds("evaluate", n) for n in cfg["eval"]["budgets"]) * len(cfg["eval"]["priors"]) * backbones
    rows.append(dict(bench=f"estimate {path}: evaluate", hours=ev * (n_bank + n_val) / 3600))
    orc = sum(seconds("oracle", n) for n in cfg["oracle"]["budgets"]) * backbones * cfg["oracle"]["steps"]
    rows.append(dict(bench=f"estimate {path}: oracle", hours=orc * n_val / 3600))
    tr = sum(seconds("evaluate", n) for n in cfg["transfer"]["budgets"]) * backbones ** 2
    rows.append(dict(bench=f"estimate {path}: transfer", hours=tr * n_val / 3600))
    rows.append(dict(bench=f"estimate {path}: all GPU stages", hours=sum(r["hours"] for r in rows)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=20, help="copies of each sample image per split")
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sample", type=Path, default=SAMPLE, help="folder of <wnid>_<name>.JPEG files to copy")
    ap.add_argument("--estimate", help="a params file whose GPU time to estimate from the measured rates")
    ap.add_argument("--compile", help="also run the evaluate and oracle jobs with eval/oracle.compile: COMPILE")
    ap.add_argument("--oracle-batch-tokens", type=int, help="oracle.batch_tokens of the oracle jobs and the core's batches")
    ap.add_argument("--images-per-shard", type=int, default=1000, help="data.images_per_shard: images per shard (a SPoT-ON "
                    "batch stays within a shard)")
    a = ap.parse_args()
    device = resolve_device(a.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = config(tmp, imagenet_layout(a.sample, tmp / "imagenet", a.copies, ("train", "val")), a)
        layout = Layout(tmp / "out")
        for stage in ("shard", "saliency"):
            t, busy = job([stage, "--params", str(params)])
            rows.append(dict(bench=f"{stage} stage", seconds=t, gpu_busy=busy))
        arch = dict(img_size=a.img_size, patch_size=a.patch, num_classes=1000)
        model = SPoTViT(timm.create_model(a.model, pretrained=False, **arch))
        out = layout("backbone", backbone="b")                               # an untrained backbone
        save_backbone(model, out, describe(model, "b", a.model, arch, source="bench"))
        write_run_record(out, stage="backbone", job="backbone/b", params={}, metrics={}, artifacts=[])
        model = load_backbone(out, device)
        dc, geometry = model.data_config, geometry_name(model.data_config)
        t, _ = job(["decode", "--params", str(params), "--geometry", geometry])
        data = Decoded(layout("decoded", geometry=geometry), dc)
        n_val, n_all = len(data.array("val", "labels")), sum(len(data.array(s, "labels")) for s in ("train", "val"))
        rows.append(dict(bench="decode stage (JPEG decode + resize + crop, once)", images=n_all, seconds=t,
                         per_s=n_all / t))
        t = timed(lambda: [b.images.to(device) for b in data.batches("val", a.batch, device=device)])
        rows.append(dict(bench="data path: decoded arrays, no-op model", images=n_val, seconds=t, per_s=n_val / t))
        jpeg = min(n_val, 4096)                                        # slow: a sample of the split is enough
        t = timed(lambda: [b.images.to(device) for b in itertools.islice(
            make_loader(layout("shards"), "val", dc, a.batch), -(-jpeg // a.batch))])
        rows.append(dict(bench="data path: JPEG shards decoded on the fly", images=jpeg, seconds=t, per_s=jpeg / t))
        batches = list(data.batches("val", a.batch, device=device))
        core, core_busy = {}, {}                                   # budget -> seconds of the model alone, GPU busy
        for n in a.budgets:
            def model_only():
                with frozen(model, device), torch.no_grad(), autocast_for(device):     # as run_split holds it
                    for _ in ("train", "val"):                     # the bank pass, then val
                        for b in batches:
                            pos = positions_for(PRIOR, n, b.keys, 0, *model.img_size, model.k, device=device)
                            tok = model.forward_features(b.images, pos)
                            model.vit.forward_head(tok, pre_logits=True), model.vit.forward_head(tok)
            t, core_busy[n] = busy_timed(model_only)
            core[n] = t * n_all / (2 * n_val)
        shards, sizes = data.index["splits"]["val"]["shards"], {}

        def oracle_core(n):                                        # on the stage's batches: each shard on its own
            oracle = load_config(params)["oracle"]
            sizes[n] = min(images_per_batch(oracle["batch_size"], oracle["batch_tokens"], n),
                           max(s["count"] for s in shards))
            own = [b for s in shards for b in data.batches("val", sizes[n], shards=[s["name"]], device=device)]
            ys = [to_device(b.labels, device) for b in own]
            return busy_timed(lambda: [oracle_search(
                model, b.images, y, positions_for(PRIOR, n, b.keys, 1, *model.img_size, model.k, device=device),
                steps=a.steps, lr=2.4e-2) for b, y in zip(own, ys)])
        core_oracle = {n: oracle_core(n) for n in a.budgets}
        variants, per_image = [(params, "")], {}
        if a.compile:                                              # the same jobs with compiled forwards
            cfg = yaml.safe_load(params.read_text())
            cfg["eval"]["compile"] = cfg["oracle"]["compile"] = a.compile
            compiled = tmp / "compiled.yaml"
            compiled.write_text(yaml.safe_dump(cfg))
            variants.append((compiled, f", compiled ({a.compile})"))
        for path, how in variants:
            first = len(rows)
            t, busy = job(["evaluate", "--params", str(path), "--backbone", "b", "--prior", PRIOR])
            images = n_all * len(a.budgets)
            rows.append(dict(bench=f"evaluate job{how}, {'+'.join(map(str, a.budgets))} tokens in one pass",
                             images=images, seconds=t, per_s=images / t, core_per_s=images / sum(core.values()),
                             stage_over_core=sum(core.values()) / t, gpu_busy=busy,
                             core_gpu_busy=None if None in core_busy.values() else
                             sum(core_busy[n] * core[n] for n in a.budgets) / sum(core.values())))
            per_image[how] = {"evaluate": [x for n in a.budgets for x in (n, t * core[n] / sum(core.values()) / n_all)]}
            for n in a.budgets:
                t, busy = job(["oracle", "--params", str(path), "--backbone", "b", "--budget", str(n), "--part", "0"])
                rows.append(dict(bench=f"oracle job{how} ({a.steps} steps), {n} tokens, batches of {sizes[n]}",
                                 images=n_val, seconds=t,
                                 per_s=n_val * a.steps / t, core_per_s=n_val * a.steps / core_oracle[n][0],
                                 stage_over_core=core_oracle[n][0] / t, gpu_busy=busy, core_gpu_busy=core_oracle[n][1]))
                per_image[how].setdefault("oracle", []).extend([n, t / (n_val * a.steps)])
            if a.estimate and len(a.budgets) > 1:
                rows += [dict(r, bench=r["bench"] + how) for r in
                         estimate(a.estimate, {k: tuple(v[:2] + v[-2:]) for k, v in per_image[how].items()})]
            print(*rows[first:], sep="\n", flush=True)                  # (in case a later job runs out of time)
    t = timed(lambda: subprocess.run([sys.executable, "-m", "spot.cli", "evaluate", "--help"], check=True,
                                     capture_output=True))
    rows.append(dict(bench="job start-up: `spot evaluate --help` in a new process", images=0, seconds=t))
    report("pipeline", rows)


if __name__ == "__main__":
    main()
