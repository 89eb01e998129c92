"""MLflow tracking, never fatal: a run per job folder, live while the job runs (`JobRun`) or logged from its run.json
later (`sync`), nested under a run per pipeline invocation (`start_pipeline`); `check`, the end-of-run line."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
import warnings
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric
from mlflow.models import ModelSignature
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import Schema, TensorSpec
from mlflow.utils.git_utils import get_git_commit, get_git_repo_url

from spot.utils import live
from spot.utils.environment import code_version, environment
from spot.utils.io import read_csv, read_json
from spot.utils.progress import progress
from spot.utils.records import as_list, digest
from spot.utils.text import describe_error, warn
from spot.workflow.layout import wildcards
from spot.workflow.outputs import now_iso
from spot.workflow.table import STAGE

JOB_TAG, HASH_TAG, ERROR_TAG = "spot.job", "spot.record_hash", "spot.error"   # the job; its record, logged whole
PARAMS_TAG, SUPERSEDED_TAG = "spot.params_hash", "spot.superseded_by"   # the job's lineage; the run replacing it
PARENT_ENV, SERIES, MAX_NOTE = "SPOT_MLFLOW_PARENT_RUN", "series.csv", 8000   # MAX_NOTE: MLflow's longest tag
PREFIX = {"oracle": "oracle-part", "oracle-gather": "oracle", "analyze": "analysis"}
RENAME = {"backbone": {"train_loss": "train/epoch_loss", "train_acc": "train/epoch_acc", "step": None, "epoch": None}}
LABEL = {"budget": "N={}", "part": "part {}"}      # a wildcard's value in a run name; others bare
MODEL_FILES = {"backbone": ("model.safetensors", "backbone.json"), "placer": ("placer.safetensors", "placer.json")}
# A dead server costs a process about 2 s, once (retries after 0 s and 2 s); no progress bars in job logs
DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
            "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "5", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"}
KIND = {"mlflow.experimentKind": "custom_model_development"}      # the experiment opens on its runs table
DOWN: dict[str, str] = {}                          # the stores this process found failing: their error
F32, is_number = np.dtype(np.float32), lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)


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
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    for name in ("mlflow.utils.async_logging", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    os.environ.pop("MLFLOW_TRACKING_URI", None) if chosen is None else os.environ.update(MLFLOW_TRACKING_URI=chosen)
    if experiment and not KIND.items() <= (exp := mlflow.set_experiment(experiment)).tags.items():
        mlflow.set_experiment_tags(KIND)
    return exp.experiment_id if experiment else None


def init(experiment: str, uri: str) -> str | None:
    """Create the store and the experiment once, before the fan-out (SQLite's migrations race)."""
    return guarded(uri, "creating the experiment", lambda: connect(uri, experiment))


def ui_link(uri: str, exp: str) -> str:
    """The experiment's runs table (MLflow 3's, not its GenAI pages): its URL, else `mlflow ui` and the page."""
    page = f"#/experiments/{exp}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def source_tags(version: str) -> dict:
    """MLflow's run context tags (user, source), with the git commit of the `spot` code if it is `version`."""
    package, tags = str(Path(__file__).resolve().parents[2]), resolve_tags({"spot.code_version": version})
    if (commit := get_git_commit(package)) and commit.startswith(version.removesuffix("-dirty")):
        tags |= {"mlflow.source.git.commit": commit, "mlflow.source.git.repoURL": get_git_repo_url(package)}
    return {k: v for k, v in tags.items() if v is not None}


def start_pipeline(cfg: dict, params_file: str, engine: str = "snakemake") -> str | None:
    """Open the parent run of a pipeline invocation (param and artifact: the params file) and export its id in
    SPOT_MLFLOW_PARENT_RUN for the jobs. It spans Snakemake's hooks: MLflow's client holds it, not the fluent API."""
    os.environ.pop(PARENT_ENV, None)
    uri, version = tracking_uri(cfg), code_version()

    def start():
        exp, tags = connect(uri, cfg["name"]), source_tags(version) | {"spot.pipeline": engine, "mlflow.source.name": "Snakefile" if engine ==
                                       "snakemake" else engine, "mlflow.note.content": f"One `{engine}` invocation "
                                       f"with `{params_file}`: its jobs are the nested runs."}
        run = mlflow.MlflowClient().create_run(exp, None, tags, f"{engine} {datetime.now():%F %T}")
        mlflow.log_params({"params_file": params_file, "code_version": version}, run_id=run.info.run_id)
        if Path(params_file).is_file():
            mlflow.log_artifact(params_file, run_id=run.info.run_id)
        return run.info.run_id

    if run_id := guarded(uri, "starting the pipeline's run", start):
        os.environ[PARENT_ENV] = run_id
    return run_id


def end_pipeline(cfg: dict, status: str = "FINISHED") -> None:
    """End the parent run of SPOT_MLFLOW_PARENT_RUN with `status`; delete it if no job logged under it."""
    if run_id := os.environ.get(PARENT_ENV):
        connect(uri := tracking_uri(cfg))
        c = mlflow.MlflowClient()
        guarded(uri, f"ending the pipeline's run {run_id}", lambda: c.set_terminated(run_id, status) if c.search_runs(
            [c.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1)
            else c.delete_run(run_id))


def check(cfg: dict, params_file: str) -> str:
    """The end of a pipeline run in one line: the runs table, or the records under the root that no FINISHED run
    holds (tag `spot.record_hash`) and the command that logs them."""
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
    """MLflow's name of `stage`'s metric `key`: 'evaluate/top1'; a training's 'val_top1' is 'val/top1', 'train_loss'
    'train/epoch_loss', 'step' None (not logged); a list 'x_per_step' is the series '<stage>/x'."""
    if "/" in key or key in RENAME.get(stage, {}):
        return RENAME.get(stage, {}).get(key, key)
    if stage == "backbone" and key.startswith("val_"):
        return "val/" + key[4:]
    return f"{PREFIX.get(stage, stage)}/{key.removesuffix('_per_step')}"


def run_name(stage: str, job: str) -> str:
    """'spot-s0 uniform N=16 evaluate' for job 'evaluate/spot-s0/uniform/16': what tells runs apart first."""
    names, values = wildcards(STAGE[stage].output) if stage in STAGE else [], job.split("/")[1:]
    return " ".join([LABEL.get(n, "{}").format(v) for n, v in zip(names + [""] * len(values), values)] + [stage])


def ms(iso: str) -> int:                            # run.json's time (ISO 8601) in ms since the epoch
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def lineage(params: dict, inputs: dict | None, seen: dict | None = None) -> str:
    """Digest of a job's params and, through the run.json of its input folders, those of every job upstream."""
    seen, upstream = {} if seen is None else seen, []
    for folder in sorted(str(f) for v in (inputs or {}).values() for f in as_list(v)):
        if folder not in seen and (Path(folder) / "run.json").is_file():
            up = read_json(Path(folder) / "run.json")
            seen[folder] = lineage(up["params"], up.get("inputs"), seen)
        upstream.append(seen.get(folder))
    return digest([params, upstream])


def sha256s(tree) -> list[str]:                     # every 'sha256' of a manifest, in sorted key order
    if isinstance(tree, dict):
        return [x for k, v in sorted(tree.items()) for x in ([v] if k == "sha256" else sha256s(v))]
    return [x for v in tree for x in sha256s(v)] if isinstance(tree, list) else []


def dataset(name: str, folder: Path, context: str) -> DatasetInput | None:
    """A data folder's MLflow dataset (None for others): digest from its manifest's sha256s, profile its splits' sizes."""
    if not (path := next((folder / f for f in ("manifest.json", "decoded.json") if (folder / f).is_file()), None)):
        return None
    manifest = read_json(path)
    splits = manifest["splits"] if isinstance(manifest.get("splits"), dict) else {}
    profile = {s: v["count"] for s, v in splits.items() if isinstance(v, dict) and "count" in v}
    data = Dataset(name, digest(sha256s(manifest) or manifest), "local", json.dumps({"uri": str(folder.resolve())}),
                   profile=json.dumps(profile))
    return DatasetInput(data, tags=[InputTag("mlflow.data.context", context)])


def begin(record: dict, out: Path, exp: str, parent: str | None, start: int | None = None) -> str:
    """Start job folder `out`'s run of `record` under run `parent`, as MLflow's active run, with its tags, params
    and datasets; its id. A replay back-dated to `start` (ms) and a job's later folders (open beside the first:
    the fluent API would nest them in it) are created by MLflow's client."""
    stage, job, c = record["stage"], record["job"], mlflow.MlflowClient()
    tags = source_tags(record["code_version"]) | {f"spot.env.{k}": str(v) for k, v in record["environment"].items()
                                                  if v is not None} | {
        JOB_TAG: job, PARAMS_TAG: lineage(record["params"], record.get("inputs")), "spot.stage": stage,
        "mlflow.source.name": f"spot/stages/{stage.replace('-', '_')}.py",
        "mlflow.note.content": f"**{job}**: {STAGE[stage].help if stage in STAGE else stage}.\n\nJob folder: `{out}`"}
    if start is None and mlflow.active_run() is None:
        run_id = mlflow.start_run(None, exp, run_name(stage, job), tags=tags, parent_run_id=parent).info.run_id
    else:
        run_id = c.create_run(exp, start, tags | ({"mlflow.parentRunId": parent} if parent else {}),
                              run_name(stage, job)).info.run_id
        mlflow.start_run(run_id, nested=True, log_system_metrics=False if start else None)
    mlflow.log_params({**record["params"], "code_version": record["code_version"]}, run_id=run_id)
    datasets = [d for name, v in (record.get("inputs") or {}).items() for f in as_list(v)
                if (d := dataset(name, Path(f), "train" if stage == "backbone" else "eval"))]
    for attempt in range(len(datasets) + 1 if datasets else 0):   # MLflow get-or-creates a dataset's row in two
        try:                                 # steps: a concurrent job may insert it in between, and a retry finds it
            c.log_inputs(run_id, datasets=datasets)
            break
        except Exception as e:
            if attempt == len(datasets) or "unique" not in str(e).lower():
                raise
    return run_id


def read_series(path: Path) -> list[tuple[str, int, float, int]]:
    """Rows (key, step, value, time in ms) of a series.csv ([] without one); a line cut by a killed job skipped."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path, newline="") as f:
        for r in csv.DictReader(f):
            with contextlib.suppress(TypeError, ValueError):
                rows.append((r["key"], int(r["step"]), float(r["value"]), int(r["timestamp"])))
    return rows


def log_rows(rows: list[tuple], synchronous: bool = True):    # (key, step, value, ms): the fluent API has one step
    metrics = [Metric(k, float(v), int(t), int(s)) for k, s, v, t in rows]
    return mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics, synchronous=synchronous)


def complete(out: Path, record: dict, exp: str, replay: bool = False) -> None:
    """Fill MLflow's active run from job folder `out`'s run.json: series (`replay`: else logged live), numbers (a
    list a point per step, a scalar at step 0 unless in the series), files, the report's results table and
    tables.md as the note, a backbone's or placer's model, tag `spot.record_hash`; retire the job's older runs."""
    stage, t, run_id = record["stage"], ms(record["ended"]), mlflow.active_run().info.run_id
    series = read_series(out / record["series"]) if record.get("series") else []
    rows, logged = list(series) if replay else [], {k for k, *_ in series}
    for k, v in sorted(record["metrics"].items()):   # the report's cells stay in its table, not a column each
        if (name := metric_name(stage, k)) and isinstance(v, list):
            rows += [(name, i, x, t) for i, x in enumerate(v) if is_number(x)]
        elif name and is_number(v) and name not in logged:
            rows.append((name, 0, v, t))
    log_rows(rows)
    for name in dict.fromkeys(["run.json", *record["artifacts"], *filter(None, [record.get("series")])]):
        if (out / name).is_file():
            mlflow.log_artifact(str(out / name), os.path.dirname(name) or None)
    if stage == "report" and (out / "results.csv").is_file():
        with warnings.catch_warnings(action="ignore"):          # MLflow's select_dtypes warns under pandas 3
            mlflow.log_table(read_csv(out / "results.csv"), "results.json")
    if stage == "report" and (out / "tables.md").is_file():
        text, cut = (out / "tables.md").read_text(), "\n\n(cut: the whole table is the artifact tables.md)"
        mlflow.set_tag("mlflow.note.content", text if len(text) <= MAX_NOTE else text[:MAX_NOTE - len(cut)] + cut)
    if stage in MODEL_FILES and (out / MODEL_FILES[stage][0]).is_file():
        log_model(out, record)
    mlflow.set_tag(HASH_TAG, digest(record))
    # the job's other runs of its lineage are deleted (a rerun replaces its run: a killed job's, a failed log's);
    # the others stay, tagged `spot.superseded_by` (MLflow compares them), one still RUNNING (its job killed) KILLED
    c, lineage_ = mlflow.MlflowClient(), mlflow.active_run().data.tags.get(PARAMS_TAG)
    for r in mlflow.search_runs([exp], f"tags.`{JOB_TAG}` = '{record['job']}'", output_format="list"):
        if r.info.run_id != run_id and r.data.tags.get(PARAMS_TAG) == lineage_:
            c.delete_run(r.info.run_id)
        elif r.info.run_id != run_id:
            c.set_tag(r.info.run_id, SUPERSEDED_TAG, run_id)
            if r.info.status == "RUNNING":
                c.set_terminated(r.info.run_id, "KILLED")


def end_active(status: str, error: str | None = None) -> None:
    """End MLflow's active run with `status` (its system metrics stop), tagged `spot.error` = `error` if any."""
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
        self.out, self.experiment, self.uri = Path(out), experiment, uri
        self.stage, self.job, self.params, self.inputs = stage, job, params, inputs
        self.started, self.run_id, self.series, self.pending = now_iso(), None, None, []

    def __enter__(self) -> JobRun:
        self.previous = live.attach(self)
        self.call(self.start)
        return self

    def __exit__(self, kind, error, tb) -> None:    # a stage's error, or no `finish`: FAILED (Ctrl-C: KILLED)
        live.attach(self.previous)
        if self.series:
            self.series.close()
        if self.run_id and self.call(self.flush):
            status = "KILLED" if kind and issubclass(kind, KeyboardInterrupt) else "FAILED"
            self.call(lambda: self.end(status, error and describe_error(error)))

    def start(self) -> None:
        self.exp = connect(self.uri, self.experiment)    # the pipeline's run, if of this store and experiment:
        parent = mlflow.search_runs([self.exp], f"run_id = '{os.environ.get(PARENT_ENV)}'", output_format="list")
        record = dict(stage=self.stage, job=self.job, params=self.params, code_version=code_version(),
                      environment=environment(), inputs=self.inputs)
        self.run_id = begin(record, self.out, self.exp, parent[0].info.run_id if parent else None)
        start = timedelta(milliseconds=mlflow.active_run().info.start_time)   # run.json's `started`: the run's
        self.started = (datetime(1970, 1, 1, tzinfo=UTC) + start).isoformat(timespec="milliseconds")

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
        if self.series is None:
            self.start_series()
        csv.writer(self.series).writerows([(k, step, v, t) for k, v in named.items()])
        self.call(lambda: self.pending.append(mlflow.log_metrics(named, step, synchronous=False, run_id=self.run_id,
                                                                 timestamp=t)))

    def start_series(self, step: int = 0) -> None:
        """Start series.csv over, keeping and logging an earlier attempt's points up to `step` (a training resumed
        from its checkpoint at `step`)."""
        kept = [r for r in read_series(self.out / SERIES) if r[1] <= step] if step else []
        if self.series:
            self.series.close()
        self.out.mkdir(parents=True, exist_ok=True)
        self.series = open(self.out / SERIES, "w", newline="", buffering=1)
        csv.writer(self.series).writerows([("key", "step", "value", "timestamp"), *kept])
        self.call(lambda: self.pending.append(log_rows(kept, synchronous=False)))

    def flush(self) -> None:                         # every point logged so far is in the store, or its error raised
        mlflow.flush_async_logging()
        for operation in filter(None, self.pending):
            operation.wait()
        self.pending.clear()

    def record_fields(self) -> dict:
        """run.json's `started` (the run's) and `series` (None without one: an earlier attempt's removed)."""
        if self.series is None:
            (self.out / SERIES).unlink(missing_ok=True)
        else:
            self.series.close()
        return dict(started=self.started, series=SERIES if (self.out / SERIES).is_file() else None)

    def finish(self) -> str | None:
        """Fill the run from run.json and end it: its id, or None if the store failed (`spot mlflow-sync` logs it)."""
        run_id = self.run_id
        fill = lambda: (self.flush(), complete(self.out, read_json(self.out / "run.json"), self.exp), self.end("FINISHED"))
        return run_id if self.call(fill) else None


def log_record(out: str | Path, experiment: str, uri: str) -> str:
    """Log `<out>/run.json` as a new run of its job with its times and series, unless a FINISHED run holds it, under
    the parent of the job's own live run, which it replaces. Returns the run id; raises on store errors."""
    out, exp, c = Path(out), connect(uri, experiment), mlflow.MlflowClient()
    record = read_json(out / "run.json")
    ran, started = mlflow.search_runs([exp], f"tags.`{JOB_TAG}` = '{record['job']}'", output_format="list"), ms(record["started"])
    if done := [r for r in ran if r.info.status == "FINISHED" and r.data.tags.get(HASH_TAG) == digest(record)]:
        return done[0].info.run_id
    parent = next((r.data.tags["mlflow.parentRunId"] for r in ran if r.info.start_time == started
                   and "mlflow.parentRunId" in r.data.tags), None)
    try:
        run_id = begin(record, out, exp, parent, started)
        complete(out, record, exp, replay=True)
        end_active("FINISHED")
    except Exception as e:                           # ended FAILED, not left RUNNING, where the store answers
        with contextlib.suppress(Exception):
            mlflow.active_run() and end_active("FAILED", f"logging failed: {describe_error(e)}")
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


def log_model(out: Path, record: dict) -> None:
    """A backbone's or placer's weights as the active run's registered, described model: pyfunc.py's code (its
    inputs and outputs) and the job's files. Pip requirements named (inferring them loads the model: seconds)."""
    (weights, about), p = (out / f for f in MODEL_FILES[record["stage"]]), record["params"]
    meta = read_json(about)
    if record["stage"] == "placer":
        n, chans, side = meta["config"]["n"], meta["config"]["in_chans"], meta["config"]["in_size"]
        name, text = f"spot-placer-{meta['backbone']}-{n}", f"Placer of backbone `{meta['backbone']}` for N = {n} tokens"
        example = dict(images=np.zeros((1, chans, side, side), np.float32))
        signature = ModelSignature(Schema([TensorSpec(F32, (-1, chans, -1, -1), "images")]),
                                   Schema([TensorSpec(F32, (-1, n, 2), "positions")]))
    else:
        size, spec = meta["data_config"]["input_size"], {k.split(".", 2)[2]: v for k, v in p.items()
                                                         if k.startswith(f"backbones.{meta['name']}.")}
        example = dict(images=np.zeros((1, *size), np.float32),     # a zero image, read at four positions
                       positions=np.array([[[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]], np.float32))
        signature = ModelSignature(Schema([TensorSpec(F32, (-1, *size), "images"),
                                           TensorSpec(F32, (-1, -1, 2), "positions")]),
                                   Schema([TensorSpec(F32, (-1, meta["num_classes"]), "logits")]))
        name, top1 = f"spot-{meta['name']}", record["metrics"].get("val_top1")
        text = (f"Backbone `{meta['name']}`: timm `{meta['timm_name']}`, {meta['img_size'][0]} px, patch "
                f"{meta['patch_size']}, {meta['num_classes']} classes, {meta['num_params'] / 1e6:.2f} M params; " + (
                    f"fetched ({spec.get('checkpoint') or 'timm pretrained'})" if meta["source"] != "train" else
                    f"trained from {spec.get('init') or 'scratch'} with {spec.get('tokens', 'grid')} tokens, seed "
                    f"{spec.get('seed', p.get('seed'))}" + ("" if top1 is None else f"; val top-1 {top1:.4f}")))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("pyfunc.py")), model_config=dict(stage=record["stage"]),
        registered_model_name=name, artifacts=dict(weights=str(weights), meta=str(about)), signature=signature,
        input_example=example, pip_requirements=[f"{p}=={version(p)}" for p in ("torch", "timm", "safetensors", "numpy")])
    mlflow.MlflowClient().update_model_version(
        name, info.registered_model_version, f"{text}; job `{record['job']}`, code {record['code_version']}.")
