"""MLflow: one run per job folder, live while the job runs, completed from its run.json; never fatal.

A job's run (`JobRun`, opened by `spot.workflow.runner` around the stage) starts with the job. It
has the tags MLflow's run context gives (user, source, git) and the job's own, its params, its
input data as MLflow datasets and MLflow's system metrics (`spot.workflow.mlflow_run`). What the
stage logs with `spot.utils.live.log_metrics` goes to MLflow's async, batched queue and to the job's
series.csv. `finish` completes the run from run.json: its metrics (lists as step series) and files.
`sync` logs records later the same way, with run.json's start and end times and series.csv's points.

One run per job folder and params: a finished run replaces the folder's earlier runs with its params
(tag `spot.job`); those with other params stay, tagged `spot.superseded_by`; a failed run replaces
nothing. A record already logged complete (tag `spot.record_hash`) is left alone. A pipeline invocation may open a
parent run (`start_pipeline`, from Snakemake's `onstart`); its jobs find it in SPOT_MLFLOW_PARENT_RUN.

One error rule (`guarded`): the first MLflow failure of a process, after MLflow's own HTTP retries,
is one warning line. The process then leaves that store alone; a run it had open ends FAILED where the
store still answers, never left RUNNING. `check` says at the end of a pipeline run which records no run
holds, and `spot mlflow-sync` logs them, replacing a job's FAILED or orphaned run under the same parent.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from spot.utils import live
from spot.utils.environment import code_version, environment
from spot.utils.io import read_json
from spot.utils.records import digest
from spot.utils.text import describe_error, warn
from spot.workflow.mlflow_run import (
    HASH_TAG,
    JOB_TAG,
    PARAMS_TAG,
    SUPERSEDED_TAG,
    complete,
    in_experiment,
    is_number,
    job_tags,
    log_inputs,
    log_params,
    log_rows,
    metric_name,
    ms,
    source_tags,
    system_metrics,
    ui_link,
)
from spot.workflow.outputs import now_iso
from spot.workflow.series import SeriesFile, read_series

PARENT_TAG, PIPELINE_TAG, ERROR_TAG = "mlflow.parentRunId", "spot.pipeline", "spot.error"
PARENT_ENV = "SPOT_MLFLOW_PARENT_RUN"        # the pipeline's parent run, inherited by its jobs
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}   # it opens on its runs
NOTE = ("SPoT pipeline: one run per job (tag `spot.job`), nested under a run per pipeline invocation; the `report` "
        "run holds the results table. Runs and charts are under *Model training* (top left).")
# A busy shared server gets retries with short backoff (0 s, then 2 s); a dead one costs a process about 2 s, once.
# Job logs get no progress bars (carriage returns) from MLflow's artifact transfers.
DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
            "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "5", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
DOWN: set[str] = set()                       # stores this process found unreachable
_first_job = True                            # no job of this process has started yet


def tracking_uri(cfg: dict | None = None) -> str:       # the variable, else the params file's, else sqlite
    return os.environ.get("MLFLOW_TRACKING_URI") or (cfg or {}).get("mlflow", {}).get("tracking_uri") \
        or "sqlite:///mlflow.db"


def guarded(uri: str, what: str, fn):
    """fn(), or None once store `uri` failed in this process (its first failure: one warning line)."""
    if uri in DOWN:
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - logging never stops a job
        lost(uri, what, e)
        return None


def lost(uri: str, what: str, error: Exception) -> None:
    """Leave store `uri` alone in this process from now on, with one warning line."""
    DOWN.add(uri)
    warn(f"MLflow at {uri}: {what} failed ({describe_error(error)}); the job goes on, its results stay in "
         "run.json files for `spot mlflow-sync`")


@contextlib.contextmanager
def failing(c, run_id: str):
    """Run `run_id` ends FAILED, tagged `spot.error`, if the block raises: a run whose logging broke is not
    left RUNNING (unless the store is gone too)."""
    try:
        yield
    except Exception as e:
        with contextlib.suppress(Exception):
            c.set_tag(run_id, ERROR_TAG, f"logging failed: {describe_error(e)}")
        with contextlib.suppress(Exception):
            c.set_terminated(run_id, "FAILED")
        raise


def connect(uri: str):                      # MLflow's background threads log nothing: failures reach `guarded`
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    import mlflow
    for name in ("mlflow.utils.async_logging", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return mlflow.MlflowClient(uri)


def fluent(uri: str):
    """MLflow's fluent API on store `uri`; MLFLOW_TRACKING_URI, which it exports, put back (the user's choice)."""
    import mlflow
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if chosen is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = chosen
    return mlflow


def job_start() -> str:
    """When the job now starting started (ISO, UTC): the process's start for a `spot` command's first job."""
    global _first_job
    first, _first_job = _first_job, False
    if first and Path(sys.argv[0]).name == "spot":
        return datetime.fromtimestamp(process_start(), UTC).isoformat(timespec="milliseconds")
    return now_iso()


def process_start() -> float:
    """This process's start (Unix seconds, to the clock tick). psutil adds its ticks since boot to /proc/stat's
    boot time, whole seconds rounded down (up to 1 s early: before Snakemake's onstart); Linux's boot clock is exact."""
    import psutil
    if not hasattr(time, "CLOCK_BOOTTIME"):           # not Linux: psutil's time is exact
        return psutil.Process().create_time()
    return psutil.Process().create_time() - psutil.boot_time() + time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def experiment_id(c, name: str) -> str:
    """Id of experiment `name`, created if missing, tagged to open on its runs table."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags=EXPERIMENT_TAGS | {"mlflow.note.content": NOTE})
        except Exception:  # noqa: BLE001 - created by a parallel job in between
            exp = c.get_experiment_by_name(name)
    for k, v in EXPERIMENT_TAGS.items():
        if exp.tags.get(k) != v:
            c.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def init(experiment: str, uri: str) -> str | None:
    """Create the store and the experiment once, before the fan-out (SQLite migration race)."""
    return guarded(uri, "creating the experiment", lambda: experiment_id(connect(uri), experiment))


def new_run(c, exp: str, record: dict, out, parent: str | None = None) -> str:
    """Create the run of a job from its `record` (run.json's fields), as `mlflow.start_run(parent_run_id=...)`
    does but starting when the job started: tags, the parent run (default the pipeline's), params, input datasets."""
    tags = job_tags(record, out)
    if (parent := parent or os.environ.get(PARENT_ENV)) and in_experiment(c, parent, exp):
        tags[PARENT_TAG] = parent
    run_id = c.create_run(exp, start_time=ms(record.get("started")), tags=tags).info.run_id
    with failing(c, run_id):
        log_params(c, run_id, record["params"], record["code_version"])
        log_inputs(c, run_id, record["stage"], record.get("inputs"))
    return run_id


def retire(c, exp: str, job: str, keep: str) -> None:
    """After run `keep` of job `job` finished: the job's other runs with its params are deleted (a rerun
    replaces its run); those with other params stay, tagged `spot.superseded_by` (MLflow compares them), and
    one still RUNNING ends KILLED (its job was killed: a later run of the job folder finished)."""
    params = c.get_run(keep).data.tags.get(PARAMS_TAG)
    for r in c.search_runs([exp], filter_string=f"tags.`{JOB_TAG}` = '{job}'", max_results=1000):
        if r.info.run_id != keep and r.data.tags.get(PARAMS_TAG) == params:
            c.delete_run(r.info.run_id)
        elif r.info.run_id != keep:
            c.set_tag(r.info.run_id, SUPERSEDED_TAG, keep)
            if r.info.status == "RUNNING":
                c.set_terminated(r.info.run_id, "KILLED")


class JobRun:
    """The MLflow run of one job folder, from its start to its end (a context manager around the stage).

    Entering creates the run (the folder's earlier runs deleted) and makes it the active fluent run,
    with MLflow's system metrics. `log` and `start_series` receive `spot.utils.live`'s calls.
    `record_fields()` gives run.json its start time and series file; `finish()` logs run.json into
    the run and ends it. Leaving the block ends a run that `finish` did not: FAILED, KILLED on Ctrl-C.
    The runs of a process nest, so the last opened ends first. MLflow failures follow `guarded`; the run
    then ends FAILED, tagged with the error, where the store still answers.
    """

    def __init__(self, out: str | Path, *, experiment: str, uri: str, stage: str, job: str, params: dict,
                 inputs: dict | None = None, started: str | None = None):
        self.out, self.experiment, self.uri = Path(out), experiment, uri
        self.stage, self.job, self.params, self.inputs = stage, job, params, inputs
        self.started = started or now_iso()
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
        self.client = connect(self.uri)
        self.exp = exp = experiment_id(self.client, self.experiment)
        record = dict(stage=self.stage, job=self.job, params=self.params, code_version=code_version(),
                      environment=environment(), inputs=self.inputs, started=self.started)
        self.run_id = new_run(self.client, exp, record, self.out)
        fluent(self.uri).start_run(run_id=self.run_id, nested=True, log_system_metrics=system_metrics())

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
        rows = [(name, int(step), float(v), t) for k, v in metrics.items()
                if is_number(v) and (name := metric_name(self.stage, k))]
        self.series.append(rows)
        self.call(lambda: self.pending.extend(log_rows(self.client, self.run_id, rows, synchronous=False)))

    def start_series(self, step: int = 0) -> None:
        rows = self.series.restart(step)
        self.call(lambda: self.pending.extend(log_rows(self.client, self.run_id, rows, synchronous=False)))

    def flush(self) -> None:                         # every point logged so far is in the store, or its error raised
        fluent(self.uri).flush_async_logging()
        while self.pending:
            self.pending.pop().wait()

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


def log_record(run_dir: str | Path, experiment: str, uri: str) -> str:
    """Log `<run_dir>/run.json` as a new run of its job, unless an identical record is logged complete
    already; the job's other runs with its params are deleted. The record's own live run, left RUNNING by a
    killed job or FAILED by a failed logging (the job's run that started when the record did), is replaced
    under the same parent run. Returns the run id; raises on store errors."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / "run.json")
    c = connect(uri)
    exp = experiment_id(c, experiment)
    ran = c.search_runs([exp], filter_string=f"tags.`{JOB_TAG}` = '{record['job']}'", max_results=1000)
    if done := [r for r in ran if r.info.status == "FINISHED" and r.data.tags.get(HASH_TAG) == digest(record)]:
        return done[0].info.run_id
    own = [r for r in ran if r.info.start_time == ms(record.get("started"))]
    run_id = new_run(c, exp, record, run_dir, parent=next((r.data.tags.get(PARENT_TAG) for r in own), None))
    with failing(c, run_id):
        log_rows(c, run_id, read_series(run_dir / record["series"]) if record.get("series") else [])
        complete(c, run_id, run_dir, record)
        c.set_terminated(run_id, "FINISHED", end_time=ms(record.get("ended")))
    for r in own:
        c.delete_run(r.info.run_id)
    retire(c, exp, record["job"], keep=run_id)
    return run_id


def sync(root: str | Path, experiment: str, uri: str) -> list[str]:
    """Log every run record under `root` (a job's rerun replaces, an unchanged one is skipped)."""
    from spot.utils.progress import progress
    records = sorted(Path(root).rglob("run.json"))
    try:
        return [log_record(p.parent, experiment, uri) for p in progress(records, desc="mlflow-sync", unit="run")]
    except Exception as e:  # noqa: BLE001 - any store error: one line, the records stay for the next sync
        raise RuntimeError(f"MLflow at {uri} failed: {describe_error(e)}") from None


def check(cfg: dict, params_file: str) -> str:
    """The end of a pipeline run in one line: the link to the runs table, or the records under the root that
    no FINISHED run holds (tag `spot.record_hash`), and the command that logs them."""
    uri, records = tracking_uri(cfg), [read_json(p) for p in sorted(Path(cfg["root"]).rglob("run.json"))]
    fix = "spot mlflow-sync" + ("" if params_file == "params.yaml" else f" --params {params_file}")
    logged, why = set(), ""
    try:
        c = connect(uri)
        exp, token = experiment_id(c, cfg["name"]), None
        while True:
            page = c.search_runs([exp], "attributes.status = 'FINISHED'", max_results=1000, page_token=token)
            logged |= {(r.data.tags.get(JOB_TAG), r.data.tags.get(HASH_TAG)) for r in page}
            if not (token := page.token):
                break
    except Exception as e:  # noqa: BLE001 - an unreachable store: every record waits for the sync
        why = f"; it is unreachable: {describe_error(e)}"
    missing = sorted(r["job"] for r in records if (r["job"], digest(r)) not in logged)
    if not missing:
        return f"spot: warning: MLflow at {uri}{why}" if why else f"MLflow runs: {ui_link(uri, exp)}"
    names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (f"spot: warning: {len(missing)} jobs did not reach MLflow at {uri} ({names}){why}; their results are "
            f"in run.json files: log them with `{fix}`")


def start_pipeline(cfg: dict, params_file: str, engine: str = "snakemake") -> str | None:
    """Open the parent run of one pipeline invocation (its params: the whole config; the params file
    as an artifact) and export its id in SPOT_MLFLOW_PARENT_RUN for the jobs it starts. It also
    creates the store and the experiment. None when MLflow is unreachable (`guarded`)."""
    os.environ.pop(PARENT_ENV, None)
    uri, version = tracking_uri(cfg), code_version()

    def start():
        c = connect(uri)
        when = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        tags = source_tags(version) | {PIPELINE_TAG: engine, "mlflow.runName": f"{engine} {when}",
                                       "mlflow.source.name": "Snakefile" if engine == "snakemake" else engine,
                                       "mlflow.note.content": f"One `{engine}` invocation with `{params_file}`: "
                                                              "its jobs are the nested runs."}
        run_id = c.create_run(experiment_id(c, cfg["name"]), tags=tags).info.run_id
        log_params(c, run_id, {"params_file": params_file}, version)   # the jobs log the values they read
        if Path(params_file).is_file():
            c.log_artifact(run_id, params_file)
        return run_id

    if run_id := guarded(uri, "starting the pipeline's run", start):
        os.environ[PARENT_ENV] = run_id
    return run_id


def end_pipeline(cfg: dict, status: str = "FINISHED") -> None:
    """End the parent run of SPOT_MLFLOW_PARENT_RUN with `status`; delete it if no job logged under it."""
    if not (run_id := os.environ.get(PARENT_ENV)):
        return
    uri = tracking_uri(cfg)

    def end():
        c = connect(uri)
        exp = c.get_run(run_id).info.experiment_id
        if c.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=1):
            c.set_terminated(run_id, status)
        else:
            c.delete_run(run_id)

    guarded(uri, f"ending the pipeline's run {run_id}", end)
