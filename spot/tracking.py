"""MLflow: one run per job folder, logged live while the job runs, replayed from its record; never fatal.

A job's run (`JobRun`, opened by `spot.cli.run_stage` around the stage) starts with the job: tags
(`spot.job`, `spot.stage`, git commit, source, user, the pipeline's parent run), params, the input
data as MLflow datasets and system metrics (where psutil is installed). What the stage logs with
`spot.live.log_metrics` (the training loss, accuracy and learning rate per step, val accuracy per
epoch) goes to MLflow every few seconds and to `<job>/series.csv`. After run.json is written,
`log_record` completes the run: the record's metrics (lists as step series), artifacts (and a
backbone's weights), and ends it. `sync` logs records later the same way (the server was down): start and end
times from run.json, the series from series.csv.

One run per job folder (a per-budget stage's job has one per budget): a new run replaces the folder's
earlier ones (tag `spot.job`); a record already logged complete (tag `spot.record_hash`) is left
alone. MLflow metric names say their stage (`evaluate/top1`, `oracle/accuracy`, `train/loss`);
run.json keeps the stages' own keys.
A pipeline invocation may open a parent run (`start_pipeline`, from Snakemake's `onstart`) whose id
the jobs inherit in SPOT_MLFLOW_PARENT_RUN; runs without one (by hand, DVC) are top-level.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from spot.utils import now_iso, read_json

JOB_TAG, HASH_TAG = "spot.job", "spot.record_hash"
PARENT_TAG, PIPELINE_TAG = "mlflow.parentRunId", "spot.pipeline"
PARENT_ENV = "SPOT_MLFLOW_PARENT_RUN"        # the pipeline's parent run, inherited by its jobs
FLUSH_ENV = "SPOT_MLFLOW_FLUSH_S"            # seconds between live flushes of step series (default 5)
SERIES = "series.csv"                        # a job's step series: key, step, value, timestamp (ms)
# The experiment's kind, "machine learning": MLflow 3 UIs that go by it open the runs table, not the GenAI
# overview. MLflow 3.17's UI goes by its GenAI / Model training switch instead (the browser keeps it; a
# link can set it: #/experiments/<id>?workflowType=machine_learning, as `spot mlflow-init` prints).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
PREFIX = {"oracle": "oracle-part", "oracle-gather": "oracle", "analyze": "analysis"}
RENAME = {"backbone": {"train_loss": "train/epoch_loss", "train_acc": "train/epoch_acc", "step": None,
                       "epoch": None}}
MAX_NOTE = 8000                              # MLflow's longest tag value
DOWN: set[str] = set()                       # tracking URIs a run of this process could not reach


# --- names, times, small helpers -----------------------------------------------------------------

def metric_name(stage: str, key: str) -> str | None:
    """The MLflow name of a record's metric `key` of `stage`: '<stage>/<key>' ('oracle/top1',
    'evaluate/top1'); a training's 'val_top1' is 'val/top1', 'train_loss' (per epoch)
    'train/epoch_loss'; a list 'x_per_step' is the series '<stage>/x'. Names with a '/' are kept;
    None: not logged (a training's 'step')."""
    if "/" in key:
        return key
    if key in RENAME.get(stage, {}):
        return RENAME[stage][key]
    if stage == "backbone" and key.startswith("val_"):
        return "val/" + key[4:]
    key = key.removesuffix("_per_step")
    return f"{PREFIX.get(stage, stage)}/{key}"


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_FIRST_JOB = True


def job_start() -> str:
    """When the job now starting started (ISO, UTC): for the first job of a `spot` command, when its
    process started (Python's start-up and imports are part of the job, as its engine sees it);
    else now (jobs run in-process, e.g. by tests)."""
    global _FIRST_JOB
    first, _FIRST_JOB = _FIRST_JOB, False
    if first and Path(sys.argv[0]).name == "spot":
        try:                                   # Linux: the process's start in clock ticks since boot
            with open(f"/proc/{os.getpid()}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            start = time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
            return datetime.fromtimestamp(start, UTC).isoformat(timespec="milliseconds")
        except (OSError, ValueError, IndexError, AttributeError):   # elsewhere: from now
            pass
    return now_iso()


def ms(iso: str | None) -> int | None:
    """Milliseconds since the epoch of an ISO time (None stays None)."""
    return None if iso is None else int(datetime.fromisoformat(iso).timestamp() * 1000)


def warn(message: str) -> None:
    """One line on stderr: logging problems never stop a job."""
    print(f"spot: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def describe_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def tracking_uri(cfg: dict | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else params.yaml `mlflow.tracking_uri`, else sqlite:///mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (cfg or {}).get("mlflow", {}).get("tracking_uri") \
        or "sqlite:///mlflow.db"


def client(uri: str):
    """An MlflowClient that fails fast on an unreachable server (no minutes of HTTP retries)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def retry(fn, attempts: int = 6, delay: float = 0.5):
    """Call fn, retrying with backoff on errors (a locked SQLite store under parallel jobs)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - any store error is retried, the last one raised
            if i == attempts - 1:
                raise
            time.sleep(delay * 2 ** i)


def chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def experiment_id(c, name: str) -> str:
    """Id of experiment `name`, created if missing, tagged to open on its runs table."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags=EXPERIMENT_TAGS | {
                "mlflow.note.content": "SPoT pipeline: one run per job (tag `spot.job`), nested under a run "
                                       "per pipeline invocation; the `report` run holds the results table. "
                                       "Runs and charts are under *Model training* (top left)."})
        except Exception:  # noqa: BLE001 - created by a parallel job in between
            exp = c.get_experiment_by_name(name)
    for k, v in EXPERIMENT_TAGS.items():
        if exp.tags.get(k) != v:
            c.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def init(experiment: str, uri: str) -> str | None:
    """Create the tracking store and the experiment once, before the fan-out (SQLite migration race)."""
    try:
        return retry(lambda: experiment_id(client(uri), experiment), attempts=3)
    except Exception as e:  # noqa: BLE001
        warn(f"MLflow at {uri} unreachable ({describe_error(e)}); results stay in run.json files for "
             "`spot mlflow-sync`")
        return None


def record_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def job_runs(c, exp: str, job: str) -> list:
    """The (not deleted) runs of job `job`."""
    return c.search_runs([exp], filter_string=f"tags.`{JOB_TAG}` = '{job}'", max_results=1000)


@functools.cache
def git(*args: str) -> str | None:
    """`git <args>` in the package's repository (None outside one)."""
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def source_tags(code_version: str) -> dict:
    """MLflow's source tags: full git commit of `code_version` (a short hash, '-dirty' when the tree
    was modified), the repository URL when it has a remote, the user."""
    import getpass
    short = code_version.removesuffix("-dirty")
    tags = {"mlflow.source.type": "LOCAL", "spot.code_version": code_version}
    commit = git("rev-parse", "--verify", "--quiet", f"{short}^{{commit}}") if short.isalnum() else None
    if commit or (short.isalnum() and len(short) >= 7 and all(ch in "0123456789abcdef" for ch in short)):
        tags["mlflow.source.git.commit"] = commit or short
        if url := git("remote", "get-url", "origin"):
            tags["mlflow.source.git.repoURL"] = url
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    return tags


def parent_run(c, exp: str) -> str | None:
    """The pipeline's parent run (SPOT_MLFLOW_PARENT_RUN) when it is a run of experiment `exp`."""
    rid = os.environ.get(PARENT_ENV)
    if not rid:
        return None
    try:
        return rid if c.get_run(rid).info.experiment_id == exp else None
    except Exception:  # noqa: BLE001 - a stale id: the run is top-level
        return None


def job_tags(stage: str, job: str, code_version: str, out: str | Path) -> dict:
    from spot.pipeline import STAGE
    s = STAGE.get(stage)
    source = f"spot/stages/{s.run.split(':')[0]}.py" if s else "spot/cli.py"
    note = f"**{job}**: {s.help if s else stage}.\n\nJob folder: `{out}`"
    return {JOB_TAG: job, "spot.stage": stage, "mlflow.runName": job, "mlflow.source.name": source,
            "mlflow.note.content": note} | source_tags(code_version)


def env_tags(env: dict | None) -> dict:
    """A record's environment (`spot.environment.environment`) as tags 'spot.env.<key>'."""
    return {f"spot.env.{k}": str(v) for k, v in (env or {}).items() if v is not None}


def run_params(params: dict, code_version: str) -> list:
    from mlflow.entities import Param
    return [Param(k, str(v)[:6000]) for k, v in sorted(params.items())] + [Param("code_version", code_version)]


def log_params(c, run_id: str, params: list) -> None:
    for part in chunks(params, 100):
        c.log_batch(run_id, params=part)


def log_metric_rows(c, run_id: str, rows: list[tuple]) -> None:
    """Rows (key, step, value, timestamp ms) as MLflow metrics, in batches."""
    from mlflow.entities import Metric
    for part in chunks(rows, 1000):
        c.log_batch(run_id, metrics=[Metric(k, float(v), int(t), int(s)) for k, s, v, t in part])


# --- inputs as MLflow datasets ---------------------------------------------------------------------

DATA_FILES = ("manifest.json", "decoded.json")     # an input folder holding one of these is data


def input_folders(inputs: dict | None) -> list[tuple[str, Path]]:
    """(input name, folder) for every folder of a record's `inputs`."""
    return [(name, Path(f)) for name, v in (inputs or {}).items() for f in (v if isinstance(v, list) else [v])]


def sha256_values(tree) -> list[str]:
    if isinstance(tree, dict):
        return [x for k, v in sorted(tree.items()) for x in ([v] if k == "sha256" else sha256_values(v))]
    if isinstance(tree, list):
        return [x for v in tree for x in sha256_values(v)]
    return []


def dataset(name: str, folder: Path, context: str):
    """The MLflow dataset of a data folder: its digest from the shards' sha256 in its manifest (the
    manifest itself without any), its profile the image count per split. None for other folders."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    path = next((folder / f for f in DATA_FILES if (folder / f).is_file()), None)
    if path is None:
        return None
    manifest = read_json(path)
    hashes = sha256_values(manifest)
    digest = hashlib.sha256(("".join(hashes) if hashes else json.dumps(manifest, sort_keys=True)).encode())
    splits = manifest.get("splits", {}) if isinstance(manifest.get("splits"), dict) else {}
    profile = {s: v["count"] for s, v in splits.items() if isinstance(v, dict) and "count" in v}
    if not profile and "shards" in manifest:
        profile = {"images": sum(s.get("count", 0) for s in manifest["shards"])}
    ds = Dataset(name=name, digest=digest.hexdigest()[:16], source_type="local",
                 source=json.dumps({"uri": str(folder.resolve())}), profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def log_inputs(c, run_id: str, stage: str, inputs: dict | None) -> None:
    """Data inputs as MLflow datasets (context 'train' for a training, else 'eval'); every single
    upstream job folder as a tag `spot.input.<name>` = its job."""
    datasets, tags = [], {}
    for name, folder in input_folders(inputs):
        ds = dataset(name, folder, "train" if stage == "backbone" else "eval")
        if ds is not None:
            datasets.append(ds)
        elif not isinstance(inputs[name], list) and (folder / "run.json").is_file():
            tags[f"spot.input.{name}"] = read_json(folder / "run.json")["job"]
    if datasets:
        c.log_inputs(run_id, datasets=datasets)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


# --- step series (series.csv) ----------------------------------------------------------------------

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


def write_series(path: Path, rows: list[tuple]) -> None:
    from spot.utils import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "step", "value", "timestamp"])
        w.writerows(rows)


# --- the live run of a job -------------------------------------------------------------------------

def log_metrics(metrics: dict, step: int) -> None:
    """`spot.live.log_metrics`: log `metrics` at `step` to the job running in this process."""
    from spot import live
    live.log_metrics(metrics, step)


def start_series(step: int = 0) -> None:
    """`spot.live.start_series`: the job's series continue from `step`."""
    from spot import live
    live.start_series(step)


class JobRun:
    """The MLflow run of one job, from its start to its end (a context manager around the stage).

    Entering creates the run (its earlier runs deleted; tags, params, datasets, parent, system
    metrics); `log` sends step series; `record_fields()` gives run.json its start time and series
    file; `finish()` logs run.json into the run and ends it; leaving on an exception ends it FAILED
    (KILLED on Ctrl-C). Any MLflow failure is one warning line: the job goes on, its series stays in
    series.csv and `spot mlflow-sync` logs it later. A store one run of the process found down is not
    tried again by the others (a job writing several folders warns once).
    """

    def __init__(self, out: str | Path, *, experiment: str, uri: str, stage: str, job: str, params: dict,
                 inputs: dict | None = None, started: str | None = None):
        self.out, self.experiment, self.uri = Path(out), experiment, uri
        self.stage, self.job, self.params, self.inputs = stage, job, params, inputs
        self.started = started or now_iso()
        self.run_id: str | None = None
        self.c = None
        self.warned = False
        self.pending: list[tuple] = []
        self.failures = 0
        self.last_flush = time.monotonic()
        self.flush_every = float(os.environ.get(FLUSH_ENV, "5"))
        self.series_file = None
        self.series_started = False
        self.monitor = None
        self.quiet = False                       # offline from the start, without a warning of its own

    # context
    def __enter__(self) -> JobRun:
        from spot import live
        self.previous = live.attach(self)
        try:
            self.start()
        except Exception as e:  # noqa: BLE001
            self.offline(e)
        return self

    def __exit__(self, kind, error, tb) -> None:
        from spot import live
        live.attach(self.previous)
        self.close()
        if kind is not None and self.run_id is not None:
            status = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
            try:
                self.flush()
                self.c.set_tag(self.run_id, "spot.error", describe_error(error)[:MAX_NOTE])
                self.c.set_terminated(self.run_id, status)
            except Exception as e:  # noqa: BLE001
                self.offline(e)

    def start(self) -> None:
        from spot.environment import environment
        from spot.utils import code_version
        if self.uri in DOWN:                     # another run of this job found it down: no second try, no warning
            self.warned = self.quiet = True
            raise ConnectionError(f"{self.uri} unreachable")
        c = self.c = client(self.uri)
        exp = retry(lambda: experiment_id(c, self.experiment), attempts=3)
        # the folder's earlier results are gone (spot.outputs.writing): so are their runs
        retry(lambda: [c.delete_run(r.info.run_id) for r in job_runs(c, exp, self.job)], attempts=3)
        version = code_version()
        tags = job_tags(self.stage, self.job, version, self.out) | env_tags(environment())
        if parent := parent_run(c, exp):
            tags[PARENT_TAG] = parent
        rid = retry(lambda: c.create_run(exp, start_time=ms(self.started), tags=tags).info.run_id, attempts=3)
        retry(lambda: log_params(c, rid, run_params(self.params, version)), attempts=3)
        retry(lambda: log_inputs(c, rid, self.stage, self.inputs), attempts=3)
        self.run_id = rid
        self.monitor = system_metrics(rid, self.uri)

    def offline(self, e: BaseException) -> None:
        """Stop talking to MLflow for this job (one warning); the record is logged at the end or synced."""
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        self.run_id = None
        if not self.warned:
            self.warned = True
            DOWN.add(self.uri)
            warn(f"MLflow logging of {self.job} to {self.uri} failed ({describe_error(e)}); the job goes on, "
                 "run `spot mlflow-sync` later")

    # series
    def start_series(self, step: int = 0) -> None:
        try:
            self._start_series(step)
        except OSError as e:                     # a full disk: the job goes on without its series
            self.series_started, self.series_file = True, None
            warn(f"could not write {self.out / SERIES} ({describe_error(e)}); {self.job} has no step series")

    def _start_series(self, step: int) -> None:
        path = self.out / SERIES
        kept = [r for r in read_series(path) if r[1] <= step] if step > 0 else []
        if self.series_file is not None:
            self.series_file.close()
        write_series(path, kept)
        self.series_file = open(path, "a", newline="", buffering=1)
        self.series_started = True
        if kept and self.run_id is not None:
            self.pending += kept
            self.flush()

    def log(self, metrics: dict, step: int) -> None:
        if not self.series_started:
            self.start_series(0)
        t = int(time.time() * 1000)
        rows = [(name, int(step), float(v), t) for k, v in metrics.items()
                if is_number(v) and (name := metric_name(self.stage, k))]
        if self.series_file is not None:
            try:
                csv.writer(self.series_file).writerows(rows)
            except OSError as e:
                self.series_file = None
                warn(f"could not write {self.out / SERIES} ({describe_error(e)}); its step series stops here")
        if self.run_id is not None:
            self.pending += rows
            if time.monotonic() - self.last_flush >= self.flush_every:
                self.flush()

    def flush(self) -> None:
        """Send the pending series; after three failures in a row, go offline."""
        self.last_flush = time.monotonic()
        if self.run_id is None or not self.pending:
            return
        try:
            log_metric_rows(self.c, self.run_id, self.pending)
            self.pending, self.failures = [], 0
        except Exception as e:  # noqa: BLE001
            self.failures += 1
            if self.failures >= 3:
                self.offline(e)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        if self.series_file is not None:
            self.series_file.close()
            self.series_file = None

    # end of the job
    def record_fields(self) -> dict:
        """run.json's `started` and `series` (a stale series.csv of an earlier attempt is removed)."""
        self.close()
        path = self.out / SERIES
        if not self.series_started:
            path.unlink(missing_ok=True)
        return dict(started=self.started, series=SERIES if path.is_file() else None)

    def finish(self) -> str | None:
        """Log run.json into the live run and end it; without one (MLflow was down at the start, or
        went down), log the record as a new run. Never raises; returns the run id or None."""
        if self.run_id is not None:
            try:
                retry(self.flush_all, attempts=3)
                return retry(lambda: log_record(self.out, self.experiment, self.uri, run_id=self.run_id),
                             attempts=4)
            except Exception as e:  # noqa: BLE001
                self.offline(e)
        if self.quiet and self.uri in DOWN:
            return None
        try:
            run_id = retry(lambda: log_record(self.out, self.experiment, self.uri), attempts=2 if self.warned else 4)
            DOWN.discard(self.uri)
            return run_id
        except Exception as e:  # noqa: BLE001
            self.offline(e)
            return None

    def flush_all(self) -> None:
        if self.pending:
            log_metric_rows(self.c, self.run_id, self.pending)
            self.pending = []


def system_metrics(run_id: str, uri: str):
    """MLflow's system metrics monitor (CPU, memory, disk, network, GPU with pynvml) on `run_id`,
    when psutil is installed and MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is not false."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
        return None
    try:
        import logging

        import psutil  # noqa: F401
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)   # no start/stop lines per job
        monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - no psutil, or the monitor cannot start: no system metrics
        return None


# --- a record into a run ---------------------------------------------------------------------------

def log_record(run_dir: str | Path, experiment: str, uri: str, run_id: str | None = None) -> str:
    """Log `<run_dir>/run.json` as the MLflow run of its job; return the run id.

    `run_id`: the job's live run, completed with the record and ended now. Without it (sync), an
    identical record already logged complete is left alone, else a new run is made from the record
    (start and end times, params, datasets, the series of series.csv) under the pipeline's parent
    run if one is set. Either way the job's other runs are deleted. Raises on store errors (see
    `JobRun.finish`, `safe_log`).
    """
    run_dir = Path(run_dir)
    record = read_json(run_dir / "run.json")
    digest = record_hash(record)
    c = client(uri)
    exp = experiment_id(c, experiment)
    others = job_runs(c, exp, record["job"])
    live = run_id is not None                          # a live run ends now, when its logging is done
    series = read_series(run_dir / record["series"]) if record.get("series") else []
    if run_id is None:
        for r in others:
            if r.data.tags.get(HASH_TAG) == digest and r.info.status == "FINISHED":
                return r.info.run_id
        tags = job_tags(record["stage"], record["job"], record["code_version"], run_dir) | \
            env_tags(record.get("environment"))
        if parent := parent_run(c, exp):
            tags[PARENT_TAG] = parent
        run_id = c.create_run(exp, start_time=ms(record.get("started")), tags=tags).info.run_id
        log_params(c, run_id, run_params(record["params"], record["code_version"]))
        log_inputs(c, run_id, record["stage"], record.get("inputs"))
        log_metric_rows(c, run_id, series)
    complete(c, run_id, run_dir, record, {k for k, *_ in series})
    c.set_tag(run_id, HASH_TAG, digest)                 # last: the run holds the whole record
    c.set_terminated(run_id, "FINISHED", end_time=None if live else ms(record.get("ended")))
    for r in others:
        if r.info.run_id != run_id:
            c.delete_run(r.info.run_id)
    return run_id


def complete(c, run_id: str, run_dir: Path, record: dict, in_series: set[str]) -> None:
    """The record's metrics (scalars at step 0, unless a series of that name was logged; lists as
    series, one point per step), its files (a backbone's weights too), and for the report the
    results table (`results.json`, shown by MLflow as a table), its metrics and tables.md as the
    run's description."""
    stage, t = record["stage"], ms(record.get("ended")) or int(time.time() * 1000)
    rows = []
    for k, v in sorted(record["metrics"].items()):
        name = metric_name(stage, k)
        if name is None:
            continue
        if isinstance(v, list):
            rows += [(name, i, float(x), t) for i, x in enumerate(v) if is_number(x)]
        elif is_number(v) and name not in in_series:
            rows.append((name, 0, float(v), t))
    if stage == "report":
        rows += report_metrics(run_dir, t)
    log_metric_rows(c, run_id, rows)
    files = ["run.json", *record["artifacts"], *([record["series"]] if record.get("series") else [])]
    if stage == "backbone" and (run_dir / "model.safetensors").is_file():
        files.append("model.safetensors")
    for a in dict.fromkeys(files):
        path = run_dir / a
        if path.is_file():
            parent = Path(a).parent
            c.log_artifact(run_id, str(path), artifact_path=None if parent == Path(".") else str(parent))
    if stage == "report":
        report_summary(c, run_id, run_dir)


def safe_log(run_dir: str | Path, experiment: str, uri: str) -> str | None:
    """`log_record` (a new run) with retries that never raises: on failure one warning line, the
    record stays for `spot mlflow-sync`."""
    try:
        return retry(lambda: log_record(run_dir, experiment, uri), attempts=4)
    except Exception as e:  # noqa: BLE001
        warn(f"MLflow logging of {run_dir} to {uri} failed ({describe_error(e)}); run `spot mlflow-sync` later")
        return None


def report_metrics(run_dir: Path, t: int) -> list[tuple]:
    """The report's flat metrics.json ('<backbone>/<prior>/<budget>/top1', ...) as 'report/...' metrics."""
    path = run_dir / "metrics.json"
    flat = read_json(path) if path.is_file() else {}
    return [(f"report/{k}", 0, float(v), t) for k, v in sorted(flat.items()) if is_number(v)]


def report_summary(c, run_id: str, run_dir: Path) -> None:
    """The paper's table readable in the UI: results.csv as an MLflow table, tables.md as the description."""
    if (run_dir / "results.csv").is_file():
        import warnings

        import pandas as pd
        with warnings.catch_warnings():                 # MLflow's select_dtypes warns under pandas 3
            warnings.simplefilter("ignore")
            c.log_table(run_id, pd.read_csv(run_dir / "results.csv"), "results.json")
    if (run_dir / "tables.md").is_file():
        text = (run_dir / "tables.md").read_text()
        cut = "\n\n(cut: the whole table is the artifact tables.md)"
        c.set_tag(run_id, "mlflow.note.content", text if len(text) <= MAX_NOTE else text[:MAX_NOTE - len(cut)] + cut)


def sync(root: str | Path, experiment: str, uri: str) -> list[str]:
    """Log every run record under `root` (a job's rerun replaces, an unchanged one is skipped)."""
    from tqdm import tqdm
    records = sorted(Path(root).rglob("run.json"))
    try:
        return [retry(lambda p=p: log_record(p.parent, experiment, uri), attempts=3)
                for p in tqdm(records, desc="mlflow-sync", unit="run")]
    except Exception as e:  # noqa: BLE001 - any store error: one line, the records stay for the next sync
        raise RuntimeError(f"MLflow at {uri} failed: {describe_error(e)}") from None


# --- a parent run per pipeline invocation ----------------------------------------------------------

def start_pipeline(cfg: dict, params_file: str, engine: str = "snakemake") -> str | None:
    """Open the parent run of one pipeline invocation (its params: the whole config; the params
    file as an artifact) and export its id in SPOT_MLFLOW_PARENT_RUN for the jobs it starts.
    Also creates the store and the experiment. None (one warning) when MLflow is unreachable."""
    from spot.pipeline import flatten
    from spot.utils import code_version
    uri = tracking_uri(cfg)
    os.environ.pop(PARENT_ENV, None)
    try:
        c = client(uri)
        exp = retry(lambda: experiment_id(c, cfg["name"]), attempts=3)
        version = code_version()
        when = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        tags = {PIPELINE_TAG: engine, "mlflow.runName": f"{engine} {when}", "mlflow.source.name": "Snakefile"
                if engine == "snakemake" else engine, "mlflow.note.content":
                f"One `{engine}` invocation with `{params_file}`: its jobs are the nested runs."} | source_tags(version)
        rid = c.create_run(exp, tags=tags).info.run_id
        log_params(c, rid, run_params(flatten({k: v for k, v in cfg.items() if k != "params"}) |
                                      {"params_file": params_file}, version))
        if Path(params_file).is_file():
            c.log_artifact(rid, params_file)
    except Exception as e:  # noqa: BLE001
        warn(f"MLflow at {uri} unreachable ({describe_error(e)}); results stay in run.json files for "
             "`spot mlflow-sync`")
        return None
    os.environ[PARENT_ENV] = rid
    return rid


def end_pipeline(cfg: dict, status: str = "FINISHED") -> None:
    """End the parent run of SPOT_MLFLOW_PARENT_RUN with `status`; delete it if no job logged under it."""
    rid = os.environ.get(PARENT_ENV)
    if not rid:
        return
    uri = tracking_uri(cfg)
    try:
        c = client(uri)
        run = c.get_run(rid)
        children = c.search_runs([run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{rid}'",
                                 max_results=1)
        if children:
            c.set_terminated(rid, status)
        else:
            c.delete_run(rid)
    except Exception as e:  # noqa: BLE001
        warn(f"MLflow at {uri}: could not end the pipeline run {rid} ({describe_error(e)})")
