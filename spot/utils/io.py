"""Files: atomic writes, JSON, and one writer at a time per output folder.

`atomic_path` writes under a temporary name and renames on success, so an interrupted writer never
leaves a file that looks complete. `writing(folder)` takes the folder's lock, so a second writer
stops with one line. It removes the completion markers of an earlier run first: a run killed
half-way never leaves a folder that looks complete.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp-"                     # names of files being written (`atomic_path`)
MARKERS = ("run.json", "manifest.json")   # a folder holding one of these looks complete
LOCK = ".lock"


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
            raise no_space(path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def no_space(path: Path) -> OSError:
    """The one-line error of a write to `path` that ran out of disk."""
    free = shutil.disk_usage(path.parent).free
    return OSError(errno.ENOSPC, f"no space left on device writing {path} ({free} bytes free on its file system)")


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
    """The JSON in `path`; a file that does not parse is a one-line ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); run the job that writes it again") from None


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
    """Delete the `atomic_path` temporary files (`.tmp-*`) in `folder` and its subfolders:
    what a killed job left half-written (a decode job's arrays are gigabytes). Call while holding
    the folder's lock: no other writer's files are there then."""
    for parent, _, files in os.walk(folder):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                os.unlink(os.path.join(parent, name))


def read_csv(path: str | os.PathLike):
    """The pandas DataFrame of the CSV in `path`; a file that does not parse is a one-line ValueError naming it."""
    import pandas as pd
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid CSV ({' '.join(str(e).split())})") from None
