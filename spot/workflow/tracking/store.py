"""The MLflow store: where it is, the experiment, the pipeline's parent run, and one error rule.

The first failure of a store in a process, after MLflow's own HTTP retries, is one warning line
(`guarded`, `lost`); the process then leaves that store alone. Results stay in run.json files, which
`check` names at the end of a pipeline run and `spot mlflow-sync` logs.
"""
from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

import mlflow
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.git_utils import get_git_commit, get_git_repo_url

from spot.utils.environment import code_version
from spot.utils.io import read_json
from spot.utils.records import digest
from spot.utils.text import describe_error, warn

JOB_TAG, HASH_TAG, ERROR_TAG = "spot.job", "spot.record_hash", "spot.error"   # the job; its record, logged whole
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


def connect(uri: str) -> mlflow.MlflowClient:   # MLflow's background threads log nothing: failures reach `guarded`
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    for name in ("mlflow.utils.async_logging", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return mlflow.MlflowClient(uri)


def fluent(uri: str):
    """MLflow's fluent API on store `uri`; MLFLOW_TRACKING_URI, which it exports, put back (the user's choice)."""
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if chosen is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = chosen
    return mlflow


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


def ui_link(uri: str, experiment_id: str) -> str:
    """Where a person sees the experiment's runs table: its URL on a server, else the `mlflow ui` command
    and the page. `workflowType=machine_learning` opens MLflow 3's runs, not its GenAI pages."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def source_tags(version: str) -> dict:
    """The tags MLflow's run context gives (user, source type), and the git commit and remote of the `spot`
    code when it is `version` (run.json's `code_version`), not those of the entry point's checkout."""
    package = str(Path(__file__).resolve().parents[2])
    tags = resolve_tags({"spot.code_version": version})
    if (commit := get_git_commit(package)) and commit.startswith(version.removesuffix("-dirty")):
        tags |= {"mlflow.source.git.commit": commit, "mlflow.source.git.repoURL": get_git_repo_url(package)}
    return {k: v for k, v in tags.items() if v is not None}


def parent_run(c, exp: str) -> str | None:
    """The pipeline's run the jobs of this process nest under (SPOT_MLFLOW_PARENT_RUN), if it is a run of `exp`."""
    if not (run_id := os.environ.get(PARENT_ENV)):
        return None
    try:
        return run_id if c.get_run(run_id).info.experiment_id == exp else None
    except Exception:  # noqa: BLE001 - a stale id of another store
        return None


def start_pipeline(cfg: dict, params_file: str, engine: str = "snakemake") -> str | None:
    """Open the parent run of one pipeline invocation (param: the params file, also its artifact; the jobs log
    the values they read) and export its id in SPOT_MLFLOW_PARENT_RUN for the jobs it starts. It also creates
    the store and the experiment. None when MLflow is unreachable (`guarded`)."""
    os.environ.pop(PARENT_ENV, None)
    uri, version = tracking_uri(cfg), code_version()

    def start():
        c = connect(uri)
        tags = source_tags(version) | {"spot.pipeline": engine,
                                       "mlflow.source.name": "Snakefile" if engine == "snakemake" else engine,
                                       "mlflow.note.content": f"One `{engine}` invocation with `{params_file}`: "
                                                              "its jobs are the nested runs."}
        name = f"{engine} {datetime.now():%Y-%m-%d %H:%M:%S}"
        run_id = c.create_run(experiment_id(c, cfg["name"]), tags=tags, run_name=name).info.run_id
        c.log_batch(run_id, params=[mlflow.entities.Param("params_file", params_file),
                                    mlflow.entities.Param("code_version", version)])
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
        if c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1):
            c.set_terminated(run_id, status)
        else:
            c.delete_run(run_id)

    guarded(uri, f"ending the pipeline's run {run_id}", end)


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
