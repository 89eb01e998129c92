"""`JobRun`: the MLflow run of one job folder while the job runs (a context manager around the stage).

Entering starts the run with MLflow's fluent API, under the pipeline's run (`store.parent_run`), with its
tags, params, input datasets and MLflow's system metrics. What the stage logs with
`spot.utils.live.log_metrics` goes to MLflow's async queue and to the job's series.csv. `finish()` logs
run.json into the run (`record.complete`) and ends it. Leaving the block ends a run that `finish` did not:
FAILED, KILLED on Ctrl-C. A failure of the store follows `store.guarded`: the run then ends FAILED, tagged
with the error, where the store still answers, never left RUNNING.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from spot.utils import live
from spot.utils.environment import code_version, environment
from spot.utils.io import read_json
from spot.utils.text import describe_error
from spot.workflow.outputs import now_iso
from spot.workflow.tracking.record import (
    complete,
    is_number,
    iso,
    job_tags,
    log_inputs,
    log_rows,
    metric_name,
    retire,
    run_name,
    run_params,
)
from spot.workflow.tracking.series import SeriesFile
from spot.workflow.tracking.store import DOWN, ERROR_TAG, connect, experiment_id, fluent, lost, parent_run


class JobRun:
    """The run of job `job` of `stage`, writing folder `out`. `log` and `start_series` receive
    `spot.utils.live`'s calls; `record_fields()` gives run.json its start time (the run's) and series file."""

    def __init__(self, out: str | Path, *, experiment: str, uri: str, stage: str, job: str, params: dict,
                 inputs: dict | None = None):
        self.out, self.experiment, self.uri = Path(out), experiment, uri
        self.stage, self.job, self.params, self.inputs = stage, job, params, inputs
        self.started = now_iso()
        self.series = SeriesFile(self.out, job)
        self.run_id: str | None = None              # the open run
        self.client, self.pending, self.online = None, [], True

    def __enter__(self) -> JobRun:
        self.previous = live.attach(self)
        self.call(self.start)
        return self

    def __exit__(self, kind, error, tb) -> None:
        live.attach(self.previous)
        self.series.close()
        if self.run_id is not None and self.call(self.flush):
            if error is not None:
                self.call(lambda: self.client.set_tag(self.run_id, ERROR_TAG, describe_error(error)))
            self.call(lambda: self.end("KILLED" if issubclass(kind or Exception, KeyboardInterrupt) else "FAILED"))

    def start(self) -> None:
        """Start the run; a one-pass job's runs are open at once, and MLflow's fluent stack would make each the
        child of the one before, so the later ones are created by the client beside it."""
        mlflow, c = fluent(self.uri), connect(self.uri)
        self.client, self.exp = c, experiment_id(c, self.experiment)
        record = dict(stage=self.stage, job=self.job, params=self.params, code_version=code_version(),
                      environment=environment(), inputs=self.inputs)
        tags, name, parent = job_tags(record, self.out), run_name(self.stage, self.job), parent_run(c, self.exp)
        if mlflow.active_run() is not None:
            tags |= {MLFLOW_PARENT_RUN_ID: parent} if parent else {}
            run_id = c.create_run(self.exp, tags=tags, run_name=name).info.run_id
            run = mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=system_metrics())
        else:
            run = mlflow.start_run(experiment_id=self.exp, run_name=name, tags=tags, parent_run_id=parent,
                                   log_system_metrics=system_metrics())
        self.run_id, self.started = run.info.run_id, iso(run.info.start_time)
        mlflow.log_params(run_params(record), run_id=self.run_id)
        log_inputs(c, self.run_id, self.stage, self.inputs)

    def call(self, fn) -> bool:
        """fn() while online, True if it ran. A failure (or the store lost by another run of this process)
        takes the run offline: it ends FAILED, tagged with the error, where the store still answers."""
        if self.online and self.uri not in DOWN:
            try:
                fn()
                return True
            except Exception as e:  # noqa: BLE001 - logging never stops a job
                lost(self.uri, f"logging of {self.job}", e)
                why = f"logging failed: {describe_error(e)}"
        else:
            why = "logging failed: the store failed another run of this process"
        self.online = False
        if self.run_id is not None:
            with contextlib.suppress(Exception):
                self.client.set_tag(self.run_id, ERROR_TAG, why)
            with contextlib.suppress(Exception):
                self.end("FAILED")
        self.run_id = None
        return False

    def end(self, status: str) -> None:
        mlflow = fluent(self.uri)
        if (active := mlflow.active_run()) and active.info.run_id == self.run_id:
            mlflow.end_run(status)                      # the active fluent run: its system metrics stop
        else:
            self.client.set_terminated(self.run_id, status)
        self.run_id = None

    def log(self, metrics: dict, step: int) -> None:
        t = int(time.time() * 1000)
        named = {name: float(v) for k, v in metrics.items() if is_number(v) and (name := metric_name(self.stage, k))}
        self.series.append([(k, int(step), v, t) for k, v in named.items()])
        self.call(lambda: self.pending.append(fluent(self.uri).log_metrics(
            named, step=int(step), timestamp=t, synchronous=False, run_id=self.run_id)))

    def start_series(self, step: int = 0) -> None:
        rows = self.series.restart(step)
        self.call(lambda: self.pending.append(log_rows(self.client, self.run_id, rows, synchronous=False)))

    def flush(self) -> None:                         # every point logged so far is in the store, or its error raised
        fluent(self.uri).flush_async_logging()
        while self.pending:
            if (operation := self.pending.pop()) is not None:
                operation.wait()

    def record_fields(self) -> dict:                 # run.json's `started` and `series` (a stale series.csv removed)
        return dict(started=self.started, series=self.series.name())

    def finish(self) -> str | None:
        """Log run.json into the run and end it; the run id, or None when the run is offline (the
        record stays for `spot mlflow-sync`)."""
        run_id = self.run_id
        done = self.call(self.flush) and self.call(lambda: complete(self.client, run_id, self.out,
                                                                    read_json(self.out / "run.json")))
        done = done and self.call(lambda: retire(self.client, self.exp, self.job, run_id))
        return run_id if done and self.call(lambda: self.end("FINISHED")) else None


def system_metrics() -> bool:
    """MLflow's system metrics (CPU, memory, disk, network, GPU): on unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("false", "0")
