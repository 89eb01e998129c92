"""What made a result: package versions, the accelerator, the CPU and the kernels it runs, the lock file.

`environment()` is recorded in every job's run.json, tagged on its MLflow run (`spot.env.*`) and
summarised in the report's header, so a number names the machine and software that computed it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"
PACKAGES = ("torch", "timm", "numpy", "mlflow", "snakemake", "dvc")
# The CPU kernels every x86-64 job runs, whatever its machine: torch's own, oneDNN's and MKL's at AVX2
# width, also where the CPU has AVX-512 (see `pin_cpu_kernels`).
CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
KERNEL_VARIABLES = (*CPU_KERNELS, "MKL_CBWR")       # recorded when set (MKL_CBWR: MKL's reproducible branches)


def pin_cpu_kernels() -> None:
    """Run torch's CPU kernels at AVX2 width on any x86-64 machine, so one with AVX-512 computes what one
    without does: set each variable of `CPU_KERNELS` not set already. Call it before torch loads; a
    value the user set wins (and is recorded). A no-op once torch is loaded (its kernels are chosen)."""
    if platform.machine().lower() in ("x86_64", "amd64") and "torch" not in sys.modules:
        for name, value in CPU_KERNELS.items():
            os.environ.setdefault(name, value)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def lock_digest(path: Path = LOCK_FILE) -> str | None:
    """The first 16 hex digits of the lock file's sha256; None without one (an installed package)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def locked_versions(path: Path = LOCK_FILE) -> dict[str, str]:
    """Package name (normalised) -> version pinned by the lock file ('name==version' lines)."""
    pins = {}
    for line in path.read_text().splitlines() if path.is_file() else ():
        name, sep, rest = line.partition("==")
        if sep and not line.startswith((" ", "#")):
            pins[normalise(name)] = rest.split()[0].rstrip("\\").strip()
    return pins


def normalise(name: str) -> str:
    """A package name as PEP 503 compares them: lowercase, runs of '-', '_', '.' as one '-'."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def lock_mismatches(path: Path = LOCK_FILE) -> list[str]:
    """'name installed!=locked' for every locked package installed at another version (missing ones
    are left out: the lock also pins optional extras)."""
    out = []
    for name, pinned in sorted(locked_versions(path).items()):
        installed = package_version(name)
        if installed is not None and installed != pinned:
            out.append(f"{name} {installed}!={pinned}")
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """The software and hardware of this process: python and package versions, CUDA and cuDNN of the
    torch build, the device jobs run on (`cuda` if any, else `cpu`), the GPUs the job saw
    (CUDA_VISIBLE_DEVICES: from its GPU slot, `spot.workflow.gpus`, from SLURM or the user) and its slot,
    the CPU model, the instruction set
    torch's CPU kernels dispatch to, torch's thread count, the kernel-library variables that are set,
    the lock file's digest and the locked packages installed at other versions."""
    import torch
    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES},
            "cuda": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_slot": os.environ.get("SPOT_GPU_SLOT"), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "kernels": " ".join(f"{v}={os.environ[v]}" for v in KERNEL_VARIABLES if v in os.environ) or None,
            "lock": lock_digest(), "lock_mismatches": lock_mismatches() or None}


def code_version() -> str:
    """Git commit of the working tree (with '-dirty' if modified), else the package version."""
    here = Path(__file__).resolve().parents[1]          # the spot package
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here)], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version
        return version("spot")
