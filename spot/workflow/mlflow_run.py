"""A job's record (run.json) as the contents of its MLflow run: metric names, tags, params, input
datasets, metrics and files. `spot.workflow.tracking` decides when each is logged."""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from datetime import datetime
from pathlib import Path

from spot.utils.io import read_csv, read_json
from spot.utils.records import as_list, digest
from spot.workflow.models import log_model
from spot.workflow.series import read_series

JOB_TAG, HASH_TAG = "spot.job", "spot.record_hash"
PARAMS_TAG, SUPERSEDED_TAG = "spot.params_hash", "spot.superseded_by"   # the job's params; the run that replaced it
PREFIX = {"oracle": "oracle-part", "oracle-gather": "oracle", "analyze": "analysis"}
RENAME = {"backbone": {"train_loss": "train/epoch_loss", "train_acc": "train/epoch_acc", "step": None, "epoch": None}}
DATA_FILES = ("manifest.json", "decoded.json")     # an input folder holding one of these is data
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


def ui_link(uri: str, experiment_id: str) -> str:
    """Where a person sees the experiment's runs table: its URL on a server, else the `mlflow ui` command
    and the page. `workflowType=machine_learning` opens MLflow 3's runs, not its GenAI pages."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ms(iso: str | None) -> int | None:
    """Milliseconds since the epoch of an ISO time (None stays None)."""
    return None if iso is None else int(datetime.fromisoformat(iso).timestamp() * 1000)


def system_metrics() -> bool:
    """MLflow's system metrics (CPU, memory, disk, network, GPU): on unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("false", "0")


def in_experiment(c, run_id: str, exp: str) -> bool:
    """Whether `run_id` is a run of experiment `exp` (a stale parent id of another store is not)."""
    try:
        return c.get_run(run_id).info.experiment_id == exp
    except Exception:  # noqa: BLE001 - no such run here
        return False


def source_tags(version: str) -> dict:
    """The tags MLflow's run context gives (user, source type, git of the entry point), and the git
    commit and remote of the `spot` code when it is `version` (run.json's `code_version`)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_commit, get_git_repo_url
    package = str(Path(__file__).resolve().parents[1])
    tags = resolve_tags({"spot.code_version": version})
    if (commit := get_git_commit(package)) and commit.startswith(version.removesuffix("-dirty")):
        tags |= {"mlflow.source.git.commit": commit, "mlflow.source.git.repoURL": get_git_repo_url(package)}
    return {k: v for k, v in tags.items() if v is not None}


def job_tags(record: dict, out) -> dict:
    """A job's tags: `spot.job`, `spot.stage`, its name, source file and note, its environment
    (`spot.env.<key>`) and the source tags."""
    from spot.workflow.table import STAGE
    stage, job = record["stage"], record["job"]
    about = STAGE[stage].help if stage in STAGE else stage
    tags = {JOB_TAG: job, PARAMS_TAG: lineage(record["params"], record.get("inputs")), "spot.stage": stage,
            "mlflow.runName": job, "mlflow.source.name": f"spot/stages/{stage.replace('-', '_')}.py",
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


def log_params(c, run_id: str, params: dict, version: str) -> None:
    """`params` (values cut to MLflow's 6000 characters) and `code_version`, 100 to a batch."""
    from mlflow.entities import Param
    values = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())] + [Param("code_version", version)]
    for i in range(0, len(values), 100):
        c.log_batch(run_id, params=values[i:i + 100])


def sha256_values(tree) -> list[str]:
    """Every 'sha256' value of a manifest, in sorted key order."""
    if isinstance(tree, dict):
        return [x for k, v in sorted(tree.items()) for x in ([v] if k == "sha256" else sha256_values(v))]
    return [x for v in tree for x in sha256_values(v)] if isinstance(tree, list) else []


def dataset(name: str, folder: Path, context: str):
    """The MLflow dataset of a data folder (None for others): its digest from the shards' sha256 in
    its manifest (the manifest's own without any), its profile the image count per split."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
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


def log_rows(c, run_id: str, rows: list[tuple], synchronous: bool = True) -> list:
    """Rows (key, step, value, timestamp ms) as MLflow metrics, 1000 to a batch; with
    `synchronous=False` through MLflow's async queue, returning its operations to wait on."""
    from mlflow.entities import Metric
    return [c.log_batch(run_id, metrics=[Metric(k, float(v), int(t), int(s)) for k, s, v, t in rows[i:i + 1000]],
                        synchronous=synchronous) for i in range(0, len(rows), 1000)]


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
    log_model(c, run_id, run_dir, record)              # a backbone's weights: its MLflow model
    c.set_tag(run_id, HASH_TAG, digest(record))
