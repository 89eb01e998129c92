"""Logs a person can read: one line per progress update in a log file, with totals and ETA, the
passes named right, and every file that does not parse named in its error (#28, finding 6)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from spot.utils import progress as progress_module
from spot.utils.io import read_csv, read_json


def test_a_bar_in_a_log_file_writes_lines_with_count_total_and_eta(monkeypatch):
    log = io.StringIO()                                         # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    for _ in progress_module.progress(progress_module.Counted(iter(range(5)), 5), desc="val job", unit="batch"):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 5 and all(line.startswith("val job:") for line in lines)
    assert re.search(r"5/5 \[.*<", lines[-1]), lines[-1]       # count/total [elapsed<remaining ...]


@pytest.mark.parametrize("name, text, reader", [("run.json", '{"a": "x\ty"}', read_json),
                                                 ("manifest.json", "{", read_json),
                                                 ("results.csv", 'a,b\n1,"2\n', read_csv)])
def test_a_file_that_does_not_parse_is_named_in_the_error(tmp_path, name, text, reader):
    path = tmp_path / "job" / name
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        reader(path)


def test_job_logs_of_the_smoke_dag_are_lines_with_totals_and_the_bank_named(smoke_run):
    """The job logs Snakemake keeps (<root>/logs): no carriage returns; the evaluate jobs' bars
    name the kNN bank pass and count to their totals."""
    cwd, _ = smoke_run
    logs = sorted(Path(cwd, "out", "logs").rglob("*.log"))
    assert logs
    assert not [p for p in logs if "\r" in p.read_text()]
    evaluate = "".join(p.read_text() for p in logs if "/evaluate/" in str(p))
    assert re.search(r"^kNN bank \S+: .* (\d+)/\1 \[", evaluate, re.M), evaluate[:2000]
    assert re.search(r"^val \S+: .* (\d+)/\1 \[", evaluate, re.M)
    assert not re.search(r"^train \S+: ", evaluate, re.M)
