"""A job's step series on disk: `series.csv` in its folder, one row per point (key, step, value,
timestamp in ms), appended as the job logs. run.json names the file; `spot mlflow-sync` replays it."""
from __future__ import annotations

import csv
from pathlib import Path

from spot.utils.io import atomic_path
from spot.utils.text import describe_error, warn

SERIES = "series.csv"


def read_series(path: Path) -> list[tuple[str, int, float, int]]:
    """Rows (key, step, value, timestamp ms) of a series file ([] without one)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append((r["key"], int(r["step"]), float(r["value"]), int(r["timestamp"])))
            except (TypeError, ValueError):     # a line cut short by a killed job
                continue
    return rows


class SeriesFile:
    """The series file of job folder `folder`, written as the job logs. A full disk is one warning:
    the job goes on without the rest of its series."""

    def __init__(self, folder: Path, job: str):
        self.path, self.job = Path(folder) / SERIES, job
        self.file = None
        self.started = False

    def restart(self, step: int = 0) -> list[tuple]:
        """Start the file over, keeping an earlier attempt's rows up to `step` (a training resumed from
        its checkpoint at `step`; 0: none). Returns the rows kept."""
        kept = [r for r in read_series(self.path) if r[1] <= step] if step > 0 else []
        self.close()
        self.started = True
        try:
            with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([("key", "step", "value", "timestamp"), *kept])
            self.file = open(self.path, "a", newline="", buffering=1)
        except OSError as e:
            warn(f"could not write {self.path} ({describe_error(e)}); {self.job} has no step series")
        return kept

    def append(self, rows: list[tuple]) -> None:
        if not self.started:
            self.restart()
        if self.file is None:
            return
        try:
            csv.writer(self.file).writerows(rows)
        except OSError as e:
            self.close()
            warn(f"could not write {self.path} ({describe_error(e)}); its step series stops here")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def name(self) -> str | None:
        """run.json's `series`: the file's name, or None without a series (a stale file of an earlier
        attempt is removed)."""
        self.close()
        if not self.started:
            self.path.unlink(missing_ok=True)
        return SERIES if self.path.is_file() else None
