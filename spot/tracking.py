"""MLflow logging of run records (`run.json`): one MLflow run per job, idempotent, never fatal."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

from spot.utils import read_json

log = logging.getLogger("spot.tracking")
JOB_TAG, HASH_TAG = "spot.job", "spot.record_hash"


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


def experiment_id(c, name: str) -> str:
    """Id of experiment `name`, created if missing."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # noqa: BLE001 - created by a parallel job in between
        return c.get_experiment_by_name(name).experiment_id


def init(experiment: str, uri: str) -> str | None:
    """Create the tracking store and the experiment once, before the fan-out (SQLite migration race)."""
    try:
        return retry(lambda: experiment_id(client(uri), experiment))
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow at {uri} unreachable ({type(e).__name__}); results stay in run.json files "
                      "for `spot mlflow-sync`")
        return None


def record_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def log_record(run_dir: str | Path, experiment: str, uri: str) -> str:
    """Log `<run_dir>/run.json` as the MLflow run tagged with its job; return the run id.

    Idempotent: an identical record already logged is left alone; a changed record (new params
    or metrics for the same job) replaces the job's run. Raises on store errors (see `safe_log`).
    """
    run_dir = Path(run_dir)
    record = read_json(run_dir / "run.json")
    digest = record_hash(record)
    c = client(uri)
    exp = experiment_id(c, experiment)
    runs = c.search_runs([exp], filter_string=f"tags.`{JOB_TAG}` = '{record['job']}'")
    for r in runs:
        if r.data.tags.get(HASH_TAG) == digest:
            return r.info.run_id
        c.delete_run(r.info.run_id)
    tags = {JOB_TAG: record["job"], HASH_TAG: digest, "spot.stage": record["stage"],
            "spot.code_version": record["code_version"], "mlflow.runName": record["job"]}
    run = c.create_run(exp, tags=tags)
    rid = run.info.run_id
    from mlflow.entities import Metric, Param
    now = int(time.time() * 1000)
    params = [Param(k, str(v)[:6000]) for k, v in sorted(record["params"].items())]
    params.append(Param("code_version", record["code_version"]))
    metrics = [Metric(k, float(v), now, 0) for k, v in sorted(record["metrics"].items())
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    c.log_batch(rid, metrics=metrics, params=params)
    c.log_artifact(rid, str(run_dir / "run.json"))
    for a in record["artifacts"]:
        path = run_dir / a
        if path.is_file():
            c.log_artifact(rid, str(path), artifact_path=str(Path(a).parent) if Path(a).parent != Path(".") else None)
    c.set_terminated(rid)
    return rid


def safe_log(run_dir: str | Path, experiment: str, uri: str) -> str | None:
    """`log_record` with retries that never raises: on failure warn, keep the record for mlflow-sync."""
    try:
        return retry(lambda: log_record(run_dir, experiment, uri), attempts=4)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"MLflow logging of {run_dir} to {uri} failed ({type(e).__name__}: {str(e)[:200]}); "
                      "run `spot mlflow-sync` later")
        return None


def sync(root: str | Path, experiment: str, uri: str) -> list[str]:
    """Log every run record under `root` (a job's rerun replaces, an unchanged one is skipped)."""
    from tqdm import tqdm
    records = sorted(Path(root).rglob("run.json"))
    try:
        return [log_record(p.parent, experiment, uri) for p in tqdm(records, desc="mlflow-sync", unit="run")]
    except Exception as e:  # noqa: BLE001 - any store error: one line, the records stay for the next sync
        raise RuntimeError(f"MLflow at {uri} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
