"""Training checkpoints: atomic, weights-only (no Python object is ever unpickled), tied to the run that made them.

A checkpoint holds tensors and plain values only (it loads with `torch.load(..., weights_only=True)`)
plus a `fingerprint`, a JSON record of what it belongs to (architecture, tokens, data, training
params, seed). `load_checkpoint` resumes only from a checkpoint with this run's fingerprint; every
failure to read one is a one-line ValueError naming the file.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
import warnings
from pathlib import Path

import torch

from spot.data.loading import file_sha256
from spot.utils.io import atomic_path
from spot.utils.records import flatten, plain

KEYS = ("model", "optimizer", "step", "history")


def fingerprint(**parts) -> dict:
    """What a checkpoint belongs to, e.g. fingerprint(timm_name=..., arch=..., tokens=..., data=digest(...),
    lr=..., epochs=..., seed=...): `parts` as plain JSON values, compared key by key on resume."""
    return plain(parts)


def _reason(e: BaseException) -> str:
    """One line on why torch/safetensors/timm could not read a file (torch's weights-only errors span a page)."""
    while e.__cause__ is not None:                  # timm re-raises torch's error with its own advice
        e = e.__cause__
    text = str(e)
    if m := re.search(r"GLOBAL (\S+) was not an allowed global", text):
        return f"it holds a pickled Python object ({m[1]}), which is never unpickled: only tensors and plain values load"
    if m := re.search(r"WeightsUnpickler error:\s*(.+)", text):
        text = m[1]
    lines = text.strip().splitlines()
    detail = f"{type(e).__name__}: {lines[0].split('. ')[0][:200]}" if lines else type(e).__name__
    return f"it is truncated, corrupt or not a weights file ({detail})"


@contextlib.contextmanager
def read_errors(path: str | Path):
    """Turn any failure inside the block into a one-line ValueError naming `path`; silence torch's warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as e:                          # noqa: BLE001 (any failure to read is the file's)
        raise ValueError(f"{path} is not a readable checkpoint: {_reason(e)}") from None


def misfit(want: dict, state: dict, path: str | Path, name: str) -> str | None:
    """Why the tensors `state` (name -> anything with a `.shape`, meta tensors too) do not load
    strictly into a module `name` whose state dict is `want`, naming `path` and the first bad key;
    None where they do."""
    for k, v in want.items():
        if getattr(state.get(k), "shape", None) is None:
            return f"{path} does not fit this {name}: it lacks {k} (shape {list(v.shape)})"
        if tuple(state[k].shape) != tuple(v.shape):
            return (f"{path} does not fit this {name}: {k} has shape {list(state[k].shape)} there, "
                    f"the model wants {list(v.shape)}")
    extra = [k for k in state if k not in want]
    if extra:
        return f"{path} does not fit this {name}: it has {extra[0]}, which the model lacks ({len(extra)} such keys)"
    return None


def load_state(module: torch.nn.Module, state: dict, path: str | Path) -> None:
    """`module.load_state_dict(state)` (strict), or a one-line ValueError naming `path` and the first bad key."""
    if why := misfit(module.state_dict(), state, path, type(module).__name__):
        raise ValueError(why)
    module.load_state_dict(state)


def save_checkpoint(path: str | Path, *, model_state: dict, optimizer_state: dict, step: int,
                    history: list[dict], fingerprint: dict) -> None:
    """Write a weights-only checkpoint to `path` atomically (a temp file beside it, then renamed)."""
    ckpt = {"model": model_state, "optimizer": optimizer_state, "step": int(step),
            "history": plain(history), "fingerprint": plain(fingerprint)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:     # a file object: a full disk keeps its errno
        torch.save(ckpt, f)


def _diff(made: dict, now: dict, n: int = 3) -> str:
    """'made with seed=0, lr=0.003; this run has seed=1, lr=0.01' over the first `n` differing keys."""
    made, now = flatten(made), flatten(now)
    keys = [k for k in {**now, **made} if made.get(k, KeyError) != now.get(k, KeyError)]
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""

    def value(d, k):
        return "(unset)" if k not in d else d[k] if isinstance(d[k], str) else json.dumps(d[k])

    def show(d):
        return ", ".join(f"{k}={value(d, k)}" for k in keys[:n]) + more
    return f"made with {show(made)}; this run has {show(now)}"


def load_checkpoint(path: str | Path, fingerprint: dict, *, required: bool) -> dict | None:
    """The checkpoint at `path` (model, optimizer, step, history, fingerprint; tensors on CPU), or None
    when there is none. One made for another run (fingerprint differs) is a one-line ValueError when
    `required` (the user asked to resume), else a one-line warning on stderr and None (start over)."""
    path = Path(path)
    if not path.is_file():
        return None
    with read_errors(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in KEYS):
        raise ValueError(f"{path} is not a spot training checkpoint (it needs keys {', '.join(KEYS)})")
    made, now = ckpt.get("fingerprint"), plain(fingerprint)
    if made == now:
        return ckpt
    why = _diff(made, now) if isinstance(made, dict) else "made without a fingerprint (by an older spot)"
    if required:
        raise ValueError(f"checkpoint {path} was {why}: rerun with --no-resume")
    print(f"warning: checkpoint {path} was {why}: starting over", file=sys.stderr)
    return None


def check_weights(path: Path, record: Path, sha256: str | None) -> None:
    """A one-line ValueError when the weights file `path` lacks the `sha256` that `record` (the json
    its job wrote with it) gives: damaged since. A record without one (older spot) is not checked."""
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{path} does not have the sha256 that {record} gives: it changed after its job wrote it "
                         "(run that job again)")
