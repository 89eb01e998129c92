"""A job's record (run.json) as the contents of its MLflow run, and records logged after their job.

One run per job folder and params: a finished run replaces the folder's earlier runs with its params (tag
`spot.job`); those with other params stay, tagged `spot.superseded_by`; a failed run replaces nothing. A
record already logged complete (tag `spot.record_hash`) is left alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from spot.utils.io import read_csv, read_json
from spot.utils.progress import progress
from spot.utils.records import as_list, digest
from spot.utils.text import describe_error
from spot.workflow.layout import wildcards
from spot.workflow.stage_table import STAGE
from spot.workflow.tracking.registry import log_model
from spot.workflow.tracking.series import read_series
from spot.workflow.tracking.store import ERROR_TAG, HASH_TAG, JOB_TAG, connect, experiment_id, source_tags

PARAMS_TAG, SUPERSEDED_TAG = "spot.params_hash", "spot.superseded_by"   # the job's lineage; the run that replaced it
PREFIX = {"oracle": "oracle-part", "oracle-gather": "oracle", "analyze": "analysis"}
RENAME = {"backbone": {"train_loss": "train/epoch_loss", "train_acc": "train/epoch_acc", "step": None, "epoch": None}}
DATA_FILES = ("manifest.json", "decoded.json")     # an input folder holding one of these is data
LABEL = {"budget": "N={}", "part": "part {}"}      # a wildcard's value in a run name; others bare
MAX_NOTE = 8000                                    # MLflow's longest tag value


def metric_name(stage: str, key: str) -> str | None:
    """The MLflow name of a record's metric `key` of `stage`: '<stage>/<key>' ('evaluate/top1'); a
    training's 'val_top1' is 'val/top1', 'train_loss' (per epoch) 'train/epoch_loss'; a list
    'x_per_step' is the series '<stage>/x'. Names with a '/' are kept; None: not logged (a training's 'step')."""
    if "/" in key:
        return key
    if key in RENAME.get(stage, {}):
        return RENAME[stage][key]
    if stage == "backbone" and key.startswith("val_"):
        return "val/" + key[4:]
    return f"{PREFIX.get(stage, stage)}/{key.removesuffix('_per_step')}"


def run_name(stage: str, job: str) -> str:
    """'spot-s0 uniform N=16 evaluate' for job 'evaluate/spot-s0/uniform/16': what tells a job's runs
    apart first (MLflow's runs table cuts long names), the stage last."""
    names = wildcards(STAGE[stage].output) if stage in STAGE else []
    values = job.split("/")[1:]
    return " ".join([LABEL.get(n, "{}").format(v) for n, v in zip(names + [""] * len(values), values)] + [stage])


def ms(iso: str | None) -> int | None:
    """Milliseconds since the epoch of an ISO time (None stays None)."""
    return None if iso is None else round(datetime.fromisoformat(iso).timestamp() * 1000)


def iso(ms: int) -> str:
    """run.json's time (ISO 8601, UTC, milliseconds) of a time in milliseconds since the epoch."""
    return datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000).isoformat(timespec="milliseconds")


def job_tags(record: dict, out) -> dict:
    """A job's tags: `spot.job`, `spot.stage`, its lineage, source file and note, its environment
    (`spot.env.<key>`) and the source tags."""
    stage, job = record["stage"], record["job"]
    about = STAGE[stage].help if stage in STAGE else stage
    tags = {JOB_TAG: job, PARAMS_TAG: lineage(record["params"], record.get("inputs")), "spot.stage": stage,
            "mlflow.source.name": f"spot/stages/{stage.replace('-', '_')}.py",
            "mlflow.note.content": f"**{job}**: {about}.\n\nJob folder: `{out}`"}
    env = {f"spot.env.{k}": str(v) for k, v in (record.get("environment") or {}).items() if v is not None}
    return source_tags(record["code_version"]) | tags | env


def lineage(params: dict, inputs: dict | None, seen: dict | None = None) -> str:
    """Digest of a job's params and, through the run.json of its input folders, those of every job
    upstream: two runs of a job with the same lineage computed the same thing."""
    seen = {} if seen is None else seen
    upstream = []
    for folder in sorted(str(f) for v in (inputs or {}).values() for f in as_list(v)):
        if folder not in seen and (Path(folder) / "run.json").is_file():
            up = read_json(Path(folder) / "run.json")
            seen[folder] = lineage(up["params"], up.get("inputs"), seen)
        upstream.append(seen.get(folder))
    return digest([params, upstream])


def sha256_values(tree) -> list[str]:
    """Every 'sha256' value of a manifest, in sorted key order."""
    if isinstance(tree, dict):
        return [x for k, v in sorted(tree.items()) for x in ([v] if k == "sha256" else sha256_values(v))]
    return [x for v in tree for x in sha256_values(v)] if isinstance(tree, list) else []


def dataset(name: str, folder: Path, context: str) -> DatasetInput | None:
    """The MLflow dataset of a data folder (None for others): its digest from the shards' sha256 in
    its manifest (the manifest's own without any), its profile the image count per split."""
    path = next((folder / f for f in DATA_FILES if (folder / f).is_file()), None)
    if path is None:
        return None
    manifest = read_json(path)
    hashes = "".join(sha256_values(manifest))
    splits = manifest["splits"] if isinstance(manifest.get("splits"), dict) else {}
    profile = {s: v["count"] for s, v in splits.items() if isinstance(v, dict) and "count" in v}
    if not profile and "shards" in manifest:
        profile = {"images": sum(s.get("count", 0) for s in manifest["shards"])}
    data = Dataset(name=name, digest=hashlib.sha256(hashes.encode()).hexdigest()[:16] if hashes else digest(manifest),
                   source_type="local", source=json.dumps({"uri": str(folder.resolve())}), profile=json.dumps(profile))
    return DatasetInput(data, tags=[InputTag("mlflow.data.context", context)])


def log_inputs(c, run_id: str, stage: str, inputs: dict | None) -> None:
    """Data inputs as MLflow datasets (context 'train' for a training, else 'eval'); every single
    upstream job folder as a tag `spot.input.<name>` = its job. MLflow get-or-creates a dataset's row in
    two steps, so a concurrent job may insert it in between: the call is then retried, and finds it (each
    failure means one more of the rows exists, so one retry per dataset is always enough)."""
    datasets = []
    for name, value in (inputs or {}).items():
        for folder in map(Path, as_list(value)):
            if (data := dataset(name, folder, "train" if stage == "backbone" else "eval")) is not None:
                datasets.append(data)
            elif not isinstance(value, list) and (folder / "run.json").is_file():
                c.set_tag(run_id, f"spot.input.{name}", read_json(folder / "run.json")["job"])
    for attempt in range(len(datasets) + 1 if datasets else 0):
        try:
            return c.log_inputs(run_id, datasets=datasets)
        except Exception as e:
            if attempt == len(datasets) or not duplicate(e):
                raise


def duplicate(error: Exception) -> bool:
    """Whether a store error is a row inserted concurrently (SQLite's IntegrityError, PostgreSQL's UniqueViolation)."""
    return any(s in str(error) for s in ("UNIQUE constraint failed", "UniqueViolation", "duplicate key value"))


def log_rows(c, run_id: str, rows: list[tuple], synchronous: bool = True):
    """Rows (key, step, value, timestamp ms) as MLflow metrics; with `synchronous=False` through MLflow's
    async queue, returning its operation to wait on."""
    return c.log_batch(run_id, metrics=[Metric(k, float(v), int(t), int(s)) for k, s, v, t in rows],
                       synchronous=synchronous)


def record_rows(record: dict, run_dir: Path) -> list[tuple]:
    """The record's metrics as rows: scalars at step 0 (unless its series has a point of that name),
    lists one point per step. The report's cells stay in its results table (a metric each would add a
    thousand columns to MLflow's runs table; evaluate runs hold them as `evaluate/top1`, `evaluate/knn`)."""
    stage, t = record["stage"], ms(record.get("ended")) or int(time.time() * 1000)
    in_series = {k for k, *_ in read_series(run_dir / record["series"])} if record.get("series") else set()
    rows = []
    for k, v in sorted(record["metrics"].items()):
        if (name := metric_name(stage, k)) is None:
            continue
        if isinstance(v, list):
            rows += [(name, i, float(x), t) for i, x in enumerate(v) if is_number(x)]
        elif is_number(v) and name not in in_series:
            rows.append((name, 0, float(v), t))
    return rows


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def complete(c, run_id: str, run_dir: Path, record: dict) -> None:
    """The record's metrics (`record_rows`), its files (a backbone's weights: its MLflow model), the report's
    results.csv as an MLflow table and tables.md as the run's description, and last the tag
    `spot.record_hash`: the run holds the whole record."""
    log_rows(c, run_id, record_rows(record, run_dir))
    files = ["run.json", *record["artifacts"], *([record["series"]] if record.get("series") else [])]
    for name in dict.fromkeys(files):
        if (run_dir / name).is_file():
            folder = str(Path(name).parent)
            c.log_artifact(run_id, str(run_dir / name), artifact_path=None if folder == "." else folder)
    if record["stage"] == "report" and (run_dir / "results.csv").is_file():
        with warnings.catch_warnings():                 # MLflow's select_dtypes warns under pandas 3
            warnings.simplefilter("ignore")
            c.log_table(run_id, read_csv(run_dir / "results.csv"), "results.json")
    if record["stage"] == "report" and (run_dir / "tables.md").is_file():
        text, cut = (run_dir / "tables.md").read_text(), "\n\n(cut: the whole table is the artifact tables.md)"
        c.set_tag(run_id, "mlflow.note.content", text if len(text) <= MAX_NOTE else text[:MAX_NOTE - len(cut)] + cut)
    log_model(c, run_id, run_dir, record)
    c.set_tag(run_id, HASH_TAG, digest(record))


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


def log_record(run_dir: str | Path, experiment: str, uri: str) -> str:
    """Log `<run_dir>/run.json` as a new run of its job, unless an identical record is logged complete
    already. The run has the job's times, from run.json, so MLflow's client creates it (the fluent API starts
    runs now) under the parent of the record's own live run, which it replaces: left RUNNING by a killed job
    or FAILED by a failed logging. Returns the run id; raises on store errors."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / "run.json")
    c = connect(uri)
    exp = experiment_id(c, experiment)
    ran = c.search_runs([exp], filter_string=f"tags.`{JOB_TAG}` = '{record['job']}'", max_results=1000)
    if done := [r for r in ran if r.info.status == "FINISHED" and r.data.tags.get(HASH_TAG) == digest(record)]:
        return done[0].info.run_id
    own = [r for r in ran if r.info.start_time == ms(record.get("started"))]
    parent = next(({MLFLOW_PARENT_RUN_ID: p} for r in own if (p := r.data.tags.get(MLFLOW_PARENT_RUN_ID))), {})
    run_id = c.create_run(exp, start_time=ms(record.get("started")), tags=job_tags(record, run_dir) | parent,
                          run_name=run_name(record["stage"], record["job"])).info.run_id
    try:
        c.log_batch(run_id, params=[Param(k, str(v)) for k, v in run_params(record).items()])
        log_inputs(c, run_id, record["stage"], record.get("inputs"))
        log_rows(c, run_id, read_series(run_dir / record["series"]) if record.get("series") else [])
        complete(c, run_id, run_dir, record)
        c.set_terminated(run_id, "FINISHED", end_time=ms(record.get("ended")))
    except Exception as e:                              # not left RUNNING where the store still answers
        with contextlib.suppress(Exception):
            c.set_tag(run_id, ERROR_TAG, f"logging failed: {describe_error(e)}")
        with contextlib.suppress(Exception):
            c.set_terminated(run_id, "FAILED")
        raise
    for r in own:
        c.delete_run(r.info.run_id)
    retire(c, exp, record["job"], keep=run_id)
    return run_id


def run_params(record: dict) -> dict:
    """A run's params: the job's (MLflow cuts values to its 6000 characters) and `code_version`."""
    return {**record["params"], "code_version": record["code_version"]}


def sync(root: str | Path, experiment: str, uri: str) -> list[str]:
    """Log every run record under `root` (a job's rerun replaces, an unchanged one is skipped)."""
    records = sorted(Path(root).rglob("run.json"))
    try:
        return [log_record(p.parent, experiment, uri) for p in progress(records, desc="mlflow-sync", unit="run")]
    except Exception as e:  # noqa: BLE001 - any store error: one line, the records stay for the next sync
        raise RuntimeError(f"MLflow at {uri} failed: {describe_error(e)}") from None
