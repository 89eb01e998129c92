"""Progress bars: one factory for every long loop, so logs read the same under any engine.

On a terminal a bar redraws in place. Elsewhere (a Snakemake, DVC or SLURM log file) each update is
its own line, without carriage returns, at most one every `LOG_INTERVAL` seconds: a log stays a
file a person can `tail`, with the count, total, rate and ETA on each line.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_INTERVAL = float(os.environ.get("SPOT_PROGRESS_INTERVAL", 10))   # seconds between lines in a log file


class Lines:
    """A text stream that writes each of tqdm's redraws as one line (the carriage returns dropped)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if line := text.replace("\r", "").rstrip():
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kw) -> tqdm:
    """`tqdm(iterable, **kw)` on stderr: in place on a terminal, else one line per update (`Lines`)."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kw)
    return tqdm(iterable, file=Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL * 6, ncols=100,
                ascii=True, **kw)


class Counted:
    """An iterator with a known length (`len`), so a bar over it shows a total and an ETA."""

    def __init__(self, items, n: int):
        self.items, self.n = iter(items), n

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.items)

    def __len__(self) -> int:
        return self.n
