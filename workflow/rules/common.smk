import os
import sys
from functools import partial
from pathlib import Path

import yaml

from spot.utils.environment import lock_digest
from spot.utils.records import as_list
from spot.workflow.config import read as read_params
from spot.workflow.config import validate as validate_params
from spot.workflow.layout import Layout
from spot.workflow.stage_table import STAGE, STAGES

# A bad params file stops Snakemake with one line, as `spot validate` prints it (no traceback).
try:
    # A full configuration file replaces params.yaml (Snakemake would merge it key by key).
    if PARAMS != "params.yaml":
        config.clear()
        config.update(read_params(PARAMS))
    config.pop("params", None)
    validate_params(config, PARAMS)
    if not (workflow.remote_exec or workflow.subprocess_exec):  # once, in the main snakemake, not per job
        from spot.workflow.preflight import check as preflight

        preflight(config, PARAMS, devices=workflow.local_exec)  # a cluster's jobs run elsewhere
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"snakemake: error: {e}")

LAYOUT = Layout(config["root"])
# Jobs read the params file's path from the environment (set here, for local and cluster jobs alike),
# not from their params or their shell text: the rerun trigger is the values a job reads, not the path.
os.environ.update(SPOT_PARAMS=PARAMS)
LOCK = lock_digest(Path(workflow.basedir) / "requirements.lock")  # every job's rerun trigger
GPU = 1 if config["device"].startswith("cuda") else 0


wildcard_constraints:
    backbone=r"[A-Za-z0-9_-]+",
    src=r"[A-Za-z0-9_-]+",
    dst=r"[A-Za-z0-9_-]+",
    prior=r"[a-z_]+",
    budget=r"\d+",
    part=r"\d+",
    geometry=r"[A-Za-z0-9.-]+",


# MLflow: a parent run per invocation that runs jobs (it creates the store and the experiment before
# the fan-out); its id goes to the jobs in SPOT_MLFLOW_PARENT_RUN, so their runs nest under it.
onstart:
    from spot.workflow.tracking import start_pipeline

    start_pipeline(config, PARAMS)


onerror:
    from spot.workflow.tracking import check, end_pipeline

    end_pipeline(config, "FAILED")
    print(check(config, PARAMS))  # the jobs whose results did not reach MLflow, if any


# After a run, `dvc commit` records the outputs of its jobs in dvc.lock when dvc.yaml was generated
# for this params file, so `dvc status` agrees with Snakemake (SPOT_DVC_COMMIT=0 turns it off).
onsuccess:
    from spot.workflow.tracking import check, end_pipeline
    from spot.workflow.dvc import commit_after_snakemake

    end_pipeline(config, "FINISHED")  # (Snakemake keeps one onsuccess: MLflow's parent run ends here)
    print(check(config, PARAMS))  # the runs table, or the jobs whose results did not reach MLflow
    print(commit_after_snakemake(PARAMS, [(job.rule.name, job.wildcards_dict) for job in workflow.dag.jobs]))


def stage_inputs(stage, wildcards):
    """The run.json files of a job's input folders."""
    folders = stage.job_inputs(config, LAYOUT, stage.typed(wildcards))
    return [f"{f}/run.json" for v in folders.values() for f in as_list(v)]


def stage_params(stage, wildcards):
    """The config values a job reads (its rerun triggers)."""
    return stage.param_values(config, stage.typed(wildcards))


def stage_flags(stage, wildcards):
    """The job's options after `--params` (its command line is DVC's, `Stage.command`)."""
    return stage.flags(stage.typed(wildcards))


REPORT_ITEMS = yaml.safe_load((Path(workflow.basedir) / "workflow" / "report" / "items.yaml").read_text())


def report_output(stage, name, item):
    """File `name` of a stage's folder flagged for the report (captions are relative to workflow/rules/)."""
    return report(
        f"{LAYOUT.pattern(stage.output)}/{name}",
        caption=f"../report/{item['caption']}",
        category=item["category"],
        labels={"result": item["label"]},
    )


def shown(item):
    """Whether a report item is written: always, or (`when: <stage>`) when that stage has jobs."""
    return "when" not in item or bool(STAGE[item["when"]].jobs(config))
