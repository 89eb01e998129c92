"""Small shared helpers: atomic file output, run records, devices."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

TEMP_PREFIX = ".tmp-"                     # names of files being written (`atomic_path`)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted writer never leaves a file that looks complete (the temp name starts with `.tmp-`).
    A write that fails because the disk is full is a one-line OSError naming `path` (`disk_full`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except Exception as e:
        if disk_full(e, path.parent):
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, f"no space left on device writing {path} ({free} bytes free on its "
                                        "file system)") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def disk_full(e: BaseException, folder: Path) -> bool:
    """Whether the failed write `e` ran out of disk: an ENOSPC / EDQUOT error in its chain (torch
    wraps it in '[enforce fail ...] unexpected pos', safetensors in text), or, for writers that drop
    it (numpy: 'n requested and m written'), the file system of `folder` left without a free byte."""
    seen = e
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free == 0
    except OSError:
        return False


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def write_run_record(out_dir: str | os.PathLike, *, stage: str, job: str, params: dict,
                     metrics: dict, artifacts: list[str], inputs: dict | None = None,
                     started: str | None = None, series: str | None = None) -> dict:
    """Write `<out_dir>/run.json`, the record MLflow logging reads (see docs/contracts.md).

    `job` is the job identity (e.g. "evaluate/spot-s0/uniform/16"); `artifacts` are paths
    relative to `out_dir`; `inputs` maps input names to the folders (or lists of folders) read;
    `started` is the job's start (ISO 8601 UTC, `now_iso`), `ended` is now; `series` names the
    job's step-series file (`spot.tracking.SERIES`) when it logged one; `environment` is this process's
    (`spot.environment.environment`). Written last, so its presence means the stage's outputs are complete.
    """
    from spot.environment import environment
    ended = now_iso()
    record = dict(stage=stage, job=job, params=params, metrics=metrics, artifacts=sorted(artifacts),
                  code_version=code_version(), environment=environment(), started=started or ended, ended=ended)
    if inputs is not None:
        record["inputs"] = {k: [str(f) for f in v] if isinstance(v, list) else str(v) for k, v in inputs.items()}
    if series:
        record["series"] = series
    write_json(Path(out_dir) / "run.json", record)
    return record


def now_iso() -> str:
    """The time now as run.json writes it: ISO 8601, UTC, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def code_version() -> str:
    """Git commit of the working tree (with '-dirty' if modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here)], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version
        return version("spot")


def resolve_device(device: str | None = "auto"):
    """'auto' -> cuda if available else cpu; anything else is passed to torch.device."""
    import torch
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(t, device):
    """Tensor `t` on `device`. A copy from the CPU does not block: torch's default `.to` waits after
    every host-to-device copy until the GPU has run all the work queued before it, so the GPU idles
    while the next launches are prepared (`t` must not change in place afterwards)."""
    return t.to(device, non_blocking=t.device.type == "cpu")


AUTOCAST = {"cuda": "bfloat16"}          # device type -> the dtype models compute in there (autocast)


def autocast_dtype(device):
    """The torch dtype `autocast_for(device)` computes in (bf16 on CUDA), None where it is off."""
    import torch
    name = AUTOCAST.get(torch.device(device).type)
    return None if name is None else getattr(torch, name)


def autocast_for(device):
    """Autocast to `autocast_dtype(device)` (evaluation, the searches, training), a no-op where it is
    None; the tokenizer samples in float32."""
    import torch
    dtype = autocast_dtype(device)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
