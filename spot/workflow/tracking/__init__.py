"""MLflow tracking, never fatal: a run per job folder, live while the job runs (`JobRun`) or logged from its run.json
later (`sync`), nested under a run per pipeline invocation (`start_pipeline`); `check`, the end-of-run line."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.git_utils import get_git_commit

from spot.utils import live
from spot.utils.environment import code_version, environment
from spot.utils.io import read_csv, read_json
from spot.utils.progress import progress
from spot.utils.records import as_list, digest
from spot.utils.text import describe_error, warn
from spot.workflow.layout import wildcards
from spot.workflow.outputs import Series, lineage, now_iso, read_series
from spot.workflow.stage_table import STAGE

JOB_TAG, HASH_TAG, ERROR_TAG = "spot.job", "spot.record_hash", "spot.error"   # the job; its record, logged whole
PARAMS_TAG, SUPERSEDED_TAG = "spot.params_hash", "spot.superseded_by"   # the job's lineage; the run replacing it
PARENT_ENV, MAX_NOTE = "SPOT_MLFLOW_PARENT_RUN", 8000   # MAX_NOTE: MLflow's longest tag
PREFIX = {"oracle": "oracle-part", "oracle-gather": "oracle", "analyze": "analysis"}
RENAME = {"backbone": {"train_loss": "train/epoch_loss", "train_acc": "train/epoch_acc", "step": None, "epoch": None}}
LABEL = {"budget": "N={}", "part": "part {}"}      # a wildcard's value in a run name; others bare
# A dead server costs a process about 2 s, once (retries after 0 s and 2 s); no progress bars in job logs
DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
            "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "5", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"}
KIND = {"mlflow.experimentKind": "custom_model_development"}      # the experiment opens on its runs table
DOWN: dict[str, str] = {}                          # the stores this process found failing: their error


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics(rows) -> list[Metric]:                  # rows (key, step, value, time in ms)
    return [Metric(k, float(v), int(t), int(s)) for k, s, v, t in rows]


def ms(iso: str) -> int:                            # run.json's time (ISO 8601) in ms
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def tracking_uri(cfg: dict | None = None) -> str:       # the variable, else the params file's, else sqlite
    return os.environ.get("MLFLOW_TRACKING_URI") or (cfg or {}).get("mlflow", {}).get("tracking_uri") \
        or "sqlite:///mlflow.db"


def guarded(uri: str, what: str, fn):
    """fn(), or None once store `uri` failed in this process (its first failure: one warning line)."""
    if uri not in DOWN:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - logging never stops a job
            DOWN[uri] = describe_error(e)
            warn(f"MLflow at {uri}: {what} failed ({DOWN[uri]}); the job goes on, its results stay in run.json "
                 "files for `spot mlflow-sync`")


def connect(uri: str, experiment: str | None = None) -> str | None:
    """Point MLflow at store `uri` (not exporting MLFLOW_TRACKING_URI: it outranks the params file); the id of
    `experiment`, created if missing. MLflow's background threads log nothing: their errors reach `guarded`."""
    os.environ.update({k: os.environ.get(k, v) for k, v in DEFAULTS.items()})
    for name in ("mlflow.utils.async_logging", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    os.environ.pop("MLFLOW_TRACKING_URI", None) if chosen is None else os.environ.update(MLFLOW_TRACKING_URI=chosen)
    if experiment and not KIND.items() <= (exp := mlflow.set_experiment(experiment)).tags.items():
        mlflow.set_experiment_tags(KIND)
    return exp.experiment_id if experiment else None


def init(experiment: str, uri: str) -> str | None:  # the store and experiment, once before the fan-out (SQLite races)
    return guarded(uri, "creating the experiment", lambda: connect(uri, experiment))


def ui_link(uri: str, exp: str) -> str:          # the runs table (MLflow 3's, not its GenAI pages): URL, or `mlflow ui`
    page = f"#/experiments/{exp}?workflowType=machine_learning"
    http = uri.startswith(("http://", "https://"))
    return f"{uri.rstrip('/')}/{page}" if http else f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def source_tags(version: str) -> dict:             # MLflow's run context (user, source); the `spot` code's git commit
    tags, commit = resolve_tags({"spot.code_version": version}), get_git_commit(str(Path(__file__).parents[2])) or ""
    if commit.startswith(version.removesuffix("-dirty")):
        tags["mlflow.source.git.commit"] = commit
    return {k: v for k, v in tags.items() if v is not None}


def start_pipeline(cfg: dict, params_file: str) -> str | None:
    """Open the parent run of a Snakemake invocation, its id in SPOT_MLFLOW_PARENT_RUN for the jobs (it spans
    Snakemake's hooks: MLflow's client holds it, not the fluent API's stack)."""
    os.environ.pop(PARENT_ENV, None)
    uri, version = tracking_uri(cfg), code_version()

    def start():
        exp, tags = connect(uri, cfg["name"]), source_tags(version) | {"spot.pipeline": "snakemake",
                                                                       "mlflow.source.name": "Snakefile"}
        run_id = mlflow.MlflowClient().create_run(exp, None, tags, f"snakemake {datetime.now():%F %T}").info.run_id
        mlflow.log_params({"params_file": params_file, "code_version": version}, run_id=run_id)
        if Path(params_file).is_file():
            mlflow.log_artifact(params_file, run_id=run_id)
        return run_id

    if run_id := guarded(uri, "starting the pipeline's run", start):
        os.environ[PARENT_ENV] = run_id
    return run_id


def end_pipeline(cfg: dict, status: str = "FINISHED") -> None:
    """End the parent run of SPOT_MLFLOW_PARENT_RUN with `status`; delete it if no job logged under it."""
    if run_id := os.environ.get(PARENT_ENV):
        connect(uri := tracking_uri(cfg))
        c = mlflow.MlflowClient()
        nested = lambda: c.search_runs([c.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        guarded(uri, f"ending the pipeline's run {run_id}",
                lambda: c.set_terminated(run_id, status) if nested() else c.delete_run(run_id))


def check(cfg: dict, params_file: str) -> str:
    """The end of a pipeline run: the runs table, or the records no FINISHED run holds and the command that logs them."""
    uri, records = tracking_uri(cfg), [read_json(p) for p in sorted(Path(cfg["root"]).rglob("run.json"))]
    fix, logged, why = "spot mlflow-sync" + ("" if params_file == "params.yaml" else f" --params {params_file}"), set(), ""
    try:
        runs = mlflow.search_runs([exp := connect(uri, cfg["name"])], "status = 'FINISHED'", output_format="list")
        logged = {(r.data.tags.get(JOB_TAG), r.data.tags.get(HASH_TAG)) for r in runs}
    except Exception as e:  # noqa: BLE001 - an unreachable store: every record waits for the sync
        why = f"; it is unreachable: {describe_error(e)}"
    if not (missing := sorted(r["job"] for r in records if (r["job"], digest(r)) not in logged)):
        return f"spot: warning: MLflow at {uri}{why}" if why else f"MLflow runs: {ui_link(uri, exp)}"
    names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (f"spot: warning: {len(missing)} jobs did not reach MLflow at {uri} ({names}){why}; their results are "
            f"in run.json files: log them with `{fix}`")


def metric_name(stage: str, key: str) -> str | None:
    """'evaluate/top1'; a training's 'val/top1', 'train/epoch_loss', 'step': None (not logged); 'x_per_step': '<stage>/x'."""
    if "/" in key or key in RENAME.get(stage, {}):
        return RENAME.get(stage, {}).get(key, key)
    if stage == "backbone" and key.startswith("val_"):
        return "val/" + key[4:]
    return f"{PREFIX.get(stage, stage)}/{key.removesuffix('_per_step')}"


def run_name(stage: str, job: str) -> str:         # 'spot-s0 uniform N=16 evaluate': what tells runs apart first
    names, values = wildcards(STAGE[stage].output) if stage in STAGE else [], job.split("/")[1:]
    return " ".join([LABEL.get(n, "{}").format(v) for n, v in zip(names + [""] * len(values), values)] + [stage])


def sha256s(tree) -> list[str]:                     # every 'sha256' of a manifest, in sorted key order
    if isinstance(tree, dict):
        return [x for k, v in sorted(tree.items()) for x in ([v] if k == "sha256" else sha256s(v))]
    return [x for v in tree for x in sha256s(v)] if isinstance(tree, list) else []


def dataset(name: str, folder: Path, context: str) -> DatasetInput | None:
    """A data folder's MLflow dataset (None for others): digest of its shards' sha256s, profile its split sizes."""
    if not (path := next((folder / f for f in ("manifest.json", "decoded.json") if (folder / f).is_file()), None)):
        return None
    manifest = read_json(path)
    splits = manifest["splits"] if isinstance(manifest.get("splits"), dict) else {}
    profile = {s: v["count"] for s, v in splits.items() if isinstance(v, dict) and "count" in v}
    data = Dataset(name, digest(sha256s(manifest) or manifest), "local", json.dumps({"uri": str(folder.resolve())}),
                   profile=json.dumps(profile))
    return DatasetInput(data, tags=[InputTag("mlflow.data.context", context)])


def begin(record: dict, out: Path, exp: str, parent: str | None, start: int | None = None) -> str:
    """Start the run of `record` (job folder `out`) under run `parent` as MLflow's active run. MLflow's client creates
    a replay back-dated to `start` (ms) and a job's later folders (the fluent API would nest them in the first)."""
    stage, job = record["stage"], record["job"]
    tags = source_tags(record["code_version"]) | {f"spot.env.{k}": str(v) for k, v in record["environment"].items()
                                                  if v is not None} | {
        JOB_TAG: job, "spot.stage": stage, PARAMS_TAG: lineage(record["params"], record.get("inputs")),
        "mlflow.source.name": f"spot/stages/{stage.replace('-', '_')}.py", "mlflow.note.content": f"Job folder: `{out}`"}
    if start is None and mlflow.active_run() is None:
        return mlflow.start_run(None, exp, run_name(stage, job), tags=tags, parent_run_id=parent).info.run_id
    tags |= {"mlflow.parentRunId": parent} if parent else {}
    run_id = mlflow.MlflowClient().create_run(exp, start, tags, run_name(stage, job)).info.run_id
    return mlflow.start_run(run_id, nested=True, log_system_metrics=False if start else None).info.run_id


def log_inputs(record: dict, run_id: str) -> None:
    """The run's params (the job's and `code_version`) and its input data folders as MLflow datasets."""
    mlflow.log_params({**record["params"], "code_version": record["code_version"]}, run_id=run_id)
    datasets = [d for name, v in (record.get("inputs") or {}).items() for f in as_list(v)
                if (d := dataset(name, Path(f), "train" if record["stage"] == "backbone" else "eval"))]
    for retries in reversed(range(len(datasets) + 1 if datasets else 0)):   # MLflow get-or-creates a dataset's row in
        try:                        # two steps: a concurrent job may insert it in between, and a retry finds it
            return mlflow.MlflowClient().log_inputs(run_id, datasets=datasets)
        except Exception as e:
            if not retries or "unique" not in str(e).lower():
                raise


def complete(out: Path, record: dict, exp: str, replay: bool = False) -> None:
    """Fill MLflow's active run from `out`'s run.json (its series too if `replay`, else logged live), and retire the
    job's runs it replaces: those of its lineage are deleted, the others tagged `spot.superseded_by` (MLflow compares
    them), one still RUNNING (its job killed) ended KILLED."""
    run, stage, t = mlflow.active_run(), record["stage"], ms(record["ended"])
    series = read_series(out / record["series"]) if record.get("series") else []
    rows, live_keys = list(series) if replay else [], {k for k, *_ in series}
    for k, v in sorted(record["metrics"].items()):   # a list: a point per step; a scalar: step 0, unless in the series
        if (name := metric_name(stage, k)) and isinstance(v, list):
            rows += [(name, i, x, t) for i, x in enumerate(v) if is_number(x)]
        elif name and is_number(v) and name not in live_keys:
            rows.append((name, 0, v, t))
    mlflow.MlflowClient().log_batch(run.info.run_id, metrics(rows))    # the fluent API has one step and time for all
    for name in dict.fromkeys(["run.json", *record["artifacts"], *filter(None, [record.get("series")])]):
        if (out / name).is_file():
            mlflow.log_artifact(str(out / name), os.path.dirname(name) or None)
    if stage == "report" and (out / "results.csv").is_file():   # the report's cells: a table, not a column each
        with warnings.catch_warnings(action="ignore"):          # MLflow's select_dtypes warns under pandas 3
            mlflow.log_table(read_csv(out / "results.csv"), "results.json")
    if stage == "report" and (out / "tables.md").is_file():
        text, cut = (out / "tables.md").read_text(), "\n\n(cut: the whole table is the artifact tables.md)"
        mlflow.set_tag("mlflow.note.content", text if len(text) <= MAX_NOTE else text[:MAX_NOTE - len(cut)] + cut)
    if stage in ("backbone", "placer"):
        from spot.workflow.tracking.pyfunc import log_model  # (torch) a backbone's or placer's registered model
        log_model(out, record)
    mlflow.set_tag(HASH_TAG, digest(record))
    c, me = mlflow.MlflowClient(), run.info.run_id
    others = f"tags.`{JOB_TAG}` = '{record['job']}' and run_id != '{me}'"
    for r in mlflow.search_runs([exp], others, output_format="list"):
        if r.data.tags.get(PARAMS_TAG) == run.data.tags[PARAMS_TAG]:
            c.delete_run(r.info.run_id)
        else:
            c.set_tag(r.info.run_id, SUPERSEDED_TAG, me)
            if r.info.status == "RUNNING":
                c.set_terminated(r.info.run_id, "KILLED")


def end_active(status: str, error: str | None = None) -> None:    # its system metrics stop; tagged with `error`
    try:
        if error and mlflow.active_run():
            mlflow.set_tag(ERROR_TAG, error)
    finally:
        mlflow.end_run(status)


class JobRun:
    """The run of job `job` of `stage` writing folder `out`, live while the job runs: `log` and `start_series` take
    `spot.utils.live`'s calls (to MLflow's async queue and to series.csv); `finish` fills it from run.json and ends
    it. A store failure (`guarded`) ends it FAILED, tagged, never RUNNING. A job's runs end last-opened first."""

    def __init__(self, out: str | Path, *, experiment: str, uri: str, stage: str, job: str, params: dict,
                 inputs: dict | None = None):
        self.out, self.experiment, self.uri, self.stage, self.job = Path(out), experiment, uri, stage, job
        self.params, self.inputs, self.started, self.run_id = params, inputs, now_iso(), None
        self.series, self.pending = Series(self.out), []        # MLflow's async operations to wait on

    def __enter__(self) -> JobRun:
        self.previous = live.attach(self)
        self.call(self.start)
        return self

    def __exit__(self, kind, error, tb) -> None:    # a stage's error, or no `finish`: FAILED (Ctrl-C: KILLED)
        live.attach(self.previous)
        self.series.close()
        status = "KILLED" if kind and issubclass(kind, KeyboardInterrupt) else "FAILED"
        if self.run_id and self.call(self.flush):
            self.call(lambda: self.end(status, error and describe_error(error)))

    def start(self) -> None:
        self.exp = connect(self.uri, self.experiment)    # the pipeline's run, if of this store and experiment:
        parent = mlflow.search_runs([self.exp], f"run_id = '{os.environ.get(PARENT_ENV)}'", output_format="list")
        record = dict(stage=self.stage, job=self.job, params=self.params, code_version=code_version(),
                      environment=environment(), inputs=self.inputs)
        self.run_id = begin(record, self.out, self.exp, parent[0].info.run_id if parent else None)
        start = timedelta(milliseconds=mlflow.active_run().info.start_time)   # run.json's `started`: the run's
        self.started = (datetime(1970, 1, 1, tzinfo=UTC) + start).isoformat(timespec="milliseconds")
        log_inputs(record, self.run_id)

    def call(self, fn) -> bool:
        """fn() while the store answers, True if it ran; else the run ends FAILED, tagged with the error."""
        if guarded(self.uri, f"logging of {self.job}", lambda: fn() or True):
            return True
        with contextlib.suppress(Exception):
            self.run_id and self.end("FAILED", f"logging failed: {DOWN[self.uri]}")
        return False

    def end(self, status: str, error: str | None = None) -> None:
        self.run_id = None
        end_active(status, error)

    def log(self, metrics: dict, step: int) -> None:
        t, step = int(time.time() * 1000), int(step)
        named = {n: float(v) for k, v in metrics.items() if is_number(v) and (n := metric_name(self.stage, k))}
        self.series.write([(k, step, v, t) for k, v in named.items()])
        self.call(lambda: self.pending.append(mlflow.log_metrics(named, step, synchronous=False, run_id=self.run_id,
                                                                 timestamp=t)))

    def start_series(self, step: int = 0) -> None:   # series.csv over, keeping (and logging) the points up to `step`
        kept = self.series.restart(step)
        self.call(lambda: self.pending.append(mlflow.MlflowClient().log_batch(self.run_id, metrics(kept),
                                                                              synchronous=False)))

    def flush(self) -> None:                         # every point logged so far is in the store, or its error raised
        mlflow.flush_async_logging()
        for operation in filter(None, self.pending):
            operation.wait()
        self.pending.clear()

    def record_fields(self) -> dict:                 # run.json's `started` (the run's) and `series` (None: none)
        return dict(started=self.started, series=self.series.finish())

    def finish(self) -> str | None:
        """Fill the run from run.json and end it: its id, or None if the store failed (`spot mlflow-sync` logs it)."""
        run_id = self.run_id
        fill = lambda: (self.flush(), complete(self.out, read_json(self.out / "run.json"), self.exp),
                        self.end("FINISHED"))
        return run_id if self.call(fill) else None


def log_record(out: str | Path, experiment: str, uri: str) -> str:
    """Log `<out>/run.json` as a new run of its job with its times and series, unless a FINISHED run holds it, under
    the parent of the job's own live run, which it replaces; its id. Raises on store errors."""
    out, exp, c = Path(out), connect(uri, experiment), mlflow.MlflowClient()
    record = read_json(out / "run.json")
    ran = mlflow.search_runs([exp], f"tags.`{JOB_TAG}` = '{record['job']}'", output_format="list")
    if done := [r for r in ran if r.info.status == "FINISHED" and r.data.tags.get(HASH_TAG) == digest(record)]:
        return done[0].info.run_id
    started, parents = ms(record["started"]), [r.data.tags.get("mlflow.parentRunId") for r in ran]
    parent = next((p for r, p in zip(ran, parents) if p and r.info.start_time == started), None)
    try:
        log_inputs(record, run_id := begin(record, out, exp, parent, started))
        complete(out, record, exp, replay=True)
        end_active("FINISHED")
    except Exception as e:                           # ended FAILED, not left RUNNING, where the store answers
        with contextlib.suppress(Exception):
            end_active("FAILED", f"logging failed: {describe_error(e)}")
        raise
    c.set_terminated(run_id, "FINISHED", end_time=ms(record["ended"]))
    return run_id


def sync(root: str | Path, experiment: str, uri: str) -> list[str]:
    """Log every run.json under `root` (`log_record`); a store error is one line, the records wait for the next."""
    records = sorted(Path(root).rglob("run.json"))
    try:
        return [log_record(p.parent, experiment, uri) for p in progress(records, desc="mlflow-sync", unit="run")]
    except Exception as e:  # noqa: BLE001 - any store error
        raise RuntimeError(f"MLflow at {uri} failed: {describe_error(e)}") from None

