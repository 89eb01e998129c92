"""Which GPU each job used: GPU slots (`spot.workflow.gpus`) on a machine's real GPUs.

    python -m benchmarks.gpu_slots --jobs 16 --root out/bench/gpu-slots   # 16 jobs at once, then the table
    python -m benchmarks.gpu_slots --root out                              # a pipeline's run.json files

With --jobs N, N processes start at once and take slots as pipeline jobs do; each computes on its GPU for
a few seconds and writes <root>/job-<i>/run.json with its environment (`spot.utils.environment`, as a
job's run.json) and the PCI bus of the GPU torch used. Then every run.json under --root is printed: the
job, CUDA_VISIBLE_DEVICES, its slot, the device, and (for these jobs) the PCI bus: distinct buses, one
job per GPU at a time. On a CPU, SPOT_GPUS=0,1 with --device auto checks the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def job(i: int, root: Path, device: str) -> None:
    from spot.utils.environment import environment
    from spot.workflow.gpus import gpu_slot
    with gpu_slot(SimpleNamespace(gpu=True), {"device": device, "gpus": {"ids": "all", "jobs_per_gpu": 1}}):
        import torch
        started = time.time()
        bus = None
        if torch.cuda.is_available():
            x = torch.randn(4096, 4096, device="cuda")
            while time.time() - started < 3:
                x = (x @ x).clamp(-1, 1)
            torch.cuda.synchronize()
            bus = getattr(torch.cuda.get_device_properties(0), "pci_bus_id", None)
        else:
            time.sleep(1)
        out = root / f"job-{i}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(dict(job=f"job-{i}", environment=environment(), pci_bus=bus,
                                                      started=started, ended=time.time()), indent=1))


def table(root: Path) -> None:
    """A line per run.json under `root`: job, CUDA_VISIBLE_DEVICES, slot, device (PCI bus)."""
    for path in sorted(root.rglob("run.json")):
        r = json.loads(path.read_text())
        env = r.get("environment") or {}
        bus = f" bus {r['pci_bus']}" if r.get("pci_bus") is not None else ""
        print(f"{r.get('job', path.parent.name):40s} gpus={env.get('gpus')} slot={env.get('gpu_slot')} "
              f"{env.get('device')}{bus}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=0, help="start this many jobs at once first")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        job(a.child, a.root, a.device)
        return
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_slots", "--root", str(a.root), "--device",
                               a.device, "--child", str(i)]) for i in range(a.jobs)]
    if any(p.wait() for p in procs):
        sys.exit("gpu_slots: a job failed")
    table(a.root)
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        print("(CUDA_VISIBLE_DEVICES was set: the jobs took no slot)")


if __name__ == "__main__":
    main()
