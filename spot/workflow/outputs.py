"""Job folders: complete when run.json is there, written last with what the job did.

A stage's folder is complete exactly when its `run.json` exists. The runner writes it after the
stage returns (`write_run_record`); the folder's lock and the removal of old markers are
`spot.utils.io.writing`'s. While the job runs, the points it logs go to the folder's series.csv
(`Series`), which run.json names.
"""
from __future__ import annotations

import contextlib
import csv
import os
from datetime import UTC, datetime
from pathlib import Path

from spot.utils.environment import code_version, environment
from spot.utils.io import atomic_path, read_json, write_json
from spot.utils.records import as_list, digest

SERIES = "series.csv"


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


def write_run_record(out_dir: str | os.PathLike, *, stage: str, job: str, params: dict,
                     metrics: dict, artifacts: list[str], inputs: dict | None = None,
                     started: str | None = None, series: str | None = None) -> dict:
    """Write `<out_dir>/run.json`, the record MLflow logging reads (see docs/contracts.md).

    `job` is the job identity (e.g. "evaluate/spot-s0/uniform/16"); `artifacts` are paths
    relative to `out_dir`; `inputs` maps input names to the folders (or lists of folders) read;
    `started` is the job's start (ISO 8601 UTC, `now_iso`), `ended` is now; `series` names the
    job's step-series file (`Series.finish`) when it logged one; `environment` is this process's
    (`spot.utils.environment.environment`). Written last, so its presence means the stage's outputs are complete.
    """
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


def lineage(params: dict, inputs: dict | None, seen: dict | None = None) -> str:
    """Digest of a job's params and, through the run.json of its input folders, those of every job upstream."""
    seen, upstream = {} if seen is None else seen, []
    for folder in sorted(str(f) for v in (inputs or {}).values() for f in as_list(v)):
        if folder not in seen and is_complete(folder):
            up = read_json(Path(folder) / "run.json")
            seen[folder] = lineage(up["params"], up.get("inputs"), seen)
        upstream.append(seen.get(folder))
    return digest([params, upstream])


def read_series(path: str | os.PathLike) -> list[tuple[str, int, float, int]]:
    """Rows (key, step, value, time in ms) of a series.csv ([] without one); a line cut by a killed job skipped."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path, newline="") as f:
        for r in csv.DictReader(f):
            with contextlib.suppress(TypeError, ValueError):
                rows.append((r["key"], int(r["step"]), float(r["value"]), int(r["timestamp"])))
    return rows


class Series:
    """Job folder `folder`'s series.csv: rows (key, step, value, time in ms), a line each as the stage logs it."""

    def __init__(self, folder: str | os.PathLike):
        self.path, self.file = Path(folder) / SERIES, None

    def restart(self, step: int = 0) -> list[tuple]:
        """Start the file over, keeping its rows up to `step` (a training resumed from there; 0: none); those rows.
        The new file replaces the old by a rename: a kill meanwhile keeps the old one."""
        kept = [r for r in read_series(self.path) if r[1] <= step] if step else []
        self.close()
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([("key", "step", "value", "timestamp"), *kept])
        self.file = open(self.path, "a", newline="", buffering=1)
        return kept

    def write(self, rows: list[tuple]) -> None:
        """Append `rows`; the first write of a job that did not `restart` starts the file afresh."""
        self.file or self.restart()
        csv.writer(self.file).writerows(rows)

    def close(self) -> None:
        self.file and self.file.close()

    def finish(self) -> str | None:
        """Close the file: its name for run.json's `series`, or None where the job logged nothing (an earlier
        attempt's file is removed)."""
        if self.file is None:
            self.path.unlink(missing_ok=True)
        self.close()
        return SERIES if self.path.is_file() else None
