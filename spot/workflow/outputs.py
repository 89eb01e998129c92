"""Job folders: complete when run.json is there, written last with what the job did.

A stage's folder is complete exactly when its `run.json` exists. The runner writes it after the
stage returns (`write_run_record`); the folder's lock and the removal of old markers are
`spot.utils.io.writing`'s.
"""
from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from spot.utils.environment import code_version, environment
from spot.utils.io import write_json


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
    job's step-series file (`spot.workflow.tracking.SERIES`) when it logged one; `environment` is this process's
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
