"""Messages in one line: what a person reads of a problem."""
from __future__ import annotations

import sys


def one_line(text) -> str:
    """`text` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def describe_error(e: BaseException, limit: int = 200) -> str:
    """'TypeError: <the first line of its message, at most `limit` characters>'."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def warn(message: str) -> None:
    """'spot: warning: <message>', one line on stderr: a problem that does not stop the job."""
    print(f"spot: warning: {one_line(message)}", file=sys.stderr, flush=True)
