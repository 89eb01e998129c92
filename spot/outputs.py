"""Output folders: one writer at a time, completion marker removed first and written last.

A stage's folder is complete exactly when its `run.json` exists (written last by
`spot.utils.write_run_record`). `writing(folder)` takes the folder's lock, so a second writer stops
with one line, and removes the markers of an earlier run before anything is written, so a run
killed half-way never leaves a folder that looks complete, and the temporary files it left.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import NamedTuple

from spot.utils import TEMP_PREFIX

MARKERS = ("run.json", "manifest.json")


class Record(NamedTuple):
    """What a stage reports about its job: metrics (name -> number, or a list: one value per step)
    and artifacts (files in its folder, relative paths). The CLI adds the job's identity and params
    and writes them as run.json, last."""
    metrics: dict
    artifacts: list[str]
LOCK = ".lock"


_HELD: set[Path] = set()                         # folders this process holds (nested `writing` is a no-op)


@contextlib.contextmanager
def writing(folder: str | os.PathLike, markers: tuple[str, ...] = MARKERS):
    """Hold `<folder>/.lock` (non-blocking: a second writer gets a one-line RuntimeError), delete
    `markers` and the temporary files a killed writer left (`remove_temporary`) before yielding it.
    The lock dies with the process; a folder this process already holds is yielded as it is; a
    folder made here and left empty is removed."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        yield folder
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another spot process is writing {folder} (lock {folder / LOCK})") from None
        for name in markers:
            (folder / name).unlink(missing_ok=True)
        remove_temporary(folder)
        _HELD.add(key)
        yield folder
    finally:
        _HELD.discard(key)
        os.close(fd)
        if made and os.listdir(folder) == [LOCK]:
            (folder / LOCK).unlink()
            folder.rmdir()


def remove_temporary(folder: str | os.PathLike) -> None:
    """Delete the `spot.utils.atomic_path` temporary files (`.tmp-*`) in `folder` and its subfolders:
    what a killed job left half-written (a decode job's arrays are gigabytes). Call while holding
    the folder's lock: no other writer's files are there then."""
    for parent, _, files in os.walk(folder):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                os.unlink(os.path.join(parent, name))


def is_complete(folder: str | os.PathLike) -> bool:
    """True when `folder` holds its completion marker run.json."""
    return (Path(folder) / "run.json").is_file()


def require_complete(folder: str | os.PathLike, what: str) -> Path:
    """`folder`, or a one-line FileNotFoundError naming it when its run.json is missing (not run,
    still running, or killed half-way)."""
    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(f"{what} {folder} is not complete (no run.json): run its stage first")
    return folder
