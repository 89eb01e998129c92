"""GPU slots: one GPU per job on a machine with several, which Snakemake does not give local jobs
(it assigns no GPU ids: its issue #281).

A GPU job (`Stage.gpu`) whose config says `device: cuda` (or `auto`, with several GPUs) takes a free slot before torch
starts CUDA and holds it until the job ends. A slot is a lock file, `<locks>/gpu<id>.<n>`, locked with
`fcntl.flock`: the kernel drops the lock with the process, so a killed job frees its slot and no stale
lock is left. The job then sees only its GPU (`CUDA_VISIBLE_DEVICES=<id>`, so `cuda` is `cuda:0` there).
With every slot taken, a job waits for one: jobs never share a slot.

The GPUs: `gpus.ids` of the params file (`all`: those `nvidia-smi` lists), `gpus.jobs_per_gpu` slots
each; SPOT_GPUS=0,1,2 and SPOT_JOBS_PER_GPU=2 on the command line win. Nothing is done where something
else chose already: a SLURM job (SLURM_JOB_ID), a set CUDA_VISIBLE_DEVICES, a torchrun rank, or
`device: cpu` / `cuda:N`. The lock files live in SPOT_GPU_LOCKS (default: /tmp/spot-gpus-<user id>),
one folder for every pipeline of the machine's user.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def default_locks() -> Path:
    return Path(os.environ.get("SPOT_GPU_LOCKS") or Path(tempfile.gettempdir()) / f"spot-gpus-{os.getuid()}")


def visible_gpus() -> list[str]:
    """The indices of the GPUs `nvidia-smi` lists (none without it). Asked of the driver, not of torch:
    torch would remember the count from before CUDA_VISIBLE_DEVICES is set."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return r.stdout.split() if r.returncode == 0 else []


def gpu_ids(setting) -> list[str]:
    """The GPUs jobs may use: SPOT_GPUS ('0,1,2'), else `setting` (`gpus.ids`: 'all' or a list)."""
    if ids := os.environ.get("SPOT_GPUS", "").strip():
        return [i.strip() for i in ids.split(",") if i.strip()]
    return visible_gpus() if setting == "all" else [str(i) for i in setting]


def jobs_per_gpu(setting: int) -> int:
    value = os.environ.get("SPOT_JOBS_PER_GPU", "").strip() or setting
    if not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"SPOT_JOBS_PER_GPU={value!r} is not a count of jobs (1, 2, ...)")
    return int(value)


def chosen_elsewhere() -> str | None:
    """What already chose this job's GPU (SLURM, CUDA_VISIBLE_DEVICES, torchrun), else None."""
    return ("SLURM" if "SLURM_JOB_ID" in os.environ else
            "CUDA_VISIBLE_DEVICES" if "CUDA_VISIBLE_DEVICES" in os.environ else
            "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)


@dataclass
class Slot:
    gpu: str
    index: int
    file: object = None            # the open lock file: the slot is held while it is open

    @property
    def name(self) -> str:
        return f"gpu{self.gpu}.{self.index}"

    def release(self) -> None:
        if self.file is not None:
            self.file.close()      # closing the descriptor drops the flock
            self.file = None


def take(gpus: list[str], per_gpu: int = 1, locks: Path | None = None, poll: float = 0.5) -> Slot:
    """A free slot of `gpus` (`per_gpu` each), locked; waits while every one is held. Slots fill one
    per GPU first, so jobs spread over the GPUs before any two share one."""
    if not gpus:
        raise ValueError("no GPU to take a slot of (name them in gpus.ids or SPOT_GPUS)")
    locks = locks or default_locks()
    locks.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for index in range(per_gpu):
            for gpu in gpus:
                slot = Slot(gpu, index)
                f = open(locks / slot.name, "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                slot.file = f
                return slot
        if not waiting:
            print(f"spot: every GPU slot ({len(gpus)} GPUs x {per_gpu}) is taken; waiting for one", file=sys.stderr)
            waiting = True
        time.sleep(poll)


@contextlib.contextmanager
def gpu_slot(stage, cfg: dict):
    """For the block, a GPU job of `cfg` holds a slot and sees only its GPU (CUDA_VISIBLE_DEVICES, and
    SPOT_GPU_SLOT for its run.json); yields the slot, or None where the job takes none."""
    setting = cfg.get("gpus") or {}
    wanted = stage.gpu and cfg["device"] in ("cuda", "auto") and not chosen_elsewhere()
    ids = gpu_ids(setting.get("ids", "all")) if wanted else []
    if not ids or (cfg["device"] == "auto" and len(ids) == 1):     # (auto on one GPU: jobs share it, as before)
        yield None
        return
    slot = take(ids, jobs_per_gpu(setting.get("jobs_per_gpu", 1)))
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SPOT_GPU_SLOT")}
    os.environ.update(CUDA_VISIBLE_DEVICES=slot.gpu, SPOT_GPU_SLOT=slot.name)
    print(f"spot: GPU {slot.gpu} (slot {slot.name})", file=sys.stderr)
    try:
        yield slot
    finally:
        slot.release()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
