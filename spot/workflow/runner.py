"""The job runner: one job of a stage, from its input checks to its run.json and MLflow run.

`run_job` checks that the job's inputs are complete, takes every output folder's lock for the whole
job (`spot.utils.io.writing`) and runs the stage with the params it declares, by name. It writes run.json
last and logs it to MLflow; logging is never fatal (`spot mlflow-sync` logs it later).
"""
from __future__ import annotations

import contextlib
import os
import sys

from spot.utils.records import as_list
from spot.workflow.declaration import Stage
from spot.workflow.layout import Layout


def run_job(stage: Stage, cfg: dict, params_file: str, job: dict, chosen: dict | None = None, **options) -> None:
    """Run the job `job` (its wildcards) of `stage` for the config read from `params_file`. With
    `each`, `chosen` may name some values of each such wildcard (default: all the config's). A GPU job
    of a machine with several holds one of them meanwhile (`spot.workflow.gpus`)."""
    from spot.utils.io import writing
    from spot.workflow.gpus import gpu_slot
    from spot.workflow.outputs import require_complete
    layout = Layout(cfg["root"])
    check_job(stage, cfg, job, params_file)
    for name, folders in stage.job_inputs(cfg, layout, job).items():
        for f in as_list(folders):
            require_complete(f, f"input {name}")
    if stage.state:
        options["state"] = layout(stage.state, **job)
    run, p = stage.entry_point(), stage.arguments(cfg, job)
    params = stage.param_values(cfg, job)              # flattened once: every folder's run.json and MLflow params
    folders = chosen_folders(stage, cfg, job, chosen or {}, params_file)
    if int(os.environ.get("RANK", "0")) > 0:           # a torchrun rank other than 0 only trains along
        run(p, stage.input_folders(cfg, layout, job), layout(stage.output, **job), **job, **options)
        return
    with contextlib.ExitStack() as held:               # every folder's lock for the whole job: a second
        for f in folders:                              # writer stops before this job writes any of them
            held.enter_context(writing(layout(stage.output, **f)))
        held.enter_context(gpu_slot(stage, cfg))       # its own GPU, before torch starts CUDA
        if stage.one_pass:                             # a group of folders at once, one pass over the data
            for group in passes(stage, folders):
                run_pass(stage, cfg, layout, job, group, run, p, params, options)
            return
        for f in folders:                              # one folder after another, in this process
            out, inputs = layout(stage.output, **f), stage.input_folders(cfg, layout, f)
            with job_run(stage, cfg, f, params, out, inputs) as mlflow_run:
                finish(stage, mlflow_run, run(p, inputs, out, **f, **options), inputs)


def run_pass(stage: Stage, cfg: dict, layout: Layout, job: dict, group: list[dict], run, p, params: dict,
             options: dict) -> None:
    """One call of a `one_pass` stage for the folders `group`, each with its own MLflow run.
    The runs nest in the order they open, so they finish last-opened first."""
    key = stage.one_pass
    outs = {f[key]: layout(stage.output, **f) for f in group}
    inputs = stage.job_inputs(cfg, layout, job, group)
    with contextlib.ExitStack() as stack:
        runs = {f[key]: stack.enter_context(job_run(stage, cfg, f, params, outs[f[key]], inputs)) for f in group}
        shared = {k: v for k, v in group[0].items() if k != key}
        records = run(p, inputs, outs, **shared, **options)
        for value in reversed(list(runs)):
            finish(stage, runs[value], records[value], inputs)


@contextlib.contextmanager
def job_run(stage: Stage, cfg: dict, folder: dict, values: dict, out, inputs: dict):
    """Write folder `out` (wildcards `folder`, the job's config `values`): locked, markers removed
    (`spot.utils.io.writing`), inside its MLflow run (`spot.workflow.tracking.JobRun`), which the block yields."""
    from spot.utils.io import writing
    from spot.workflow.tracking import JobRun, tracking_uri
    with writing(out), JobRun(out, experiment=cfg["name"], uri=tracking_uri(cfg), stage=stage.name,
                              job=stage.job_id(folder), params=folder | values, inputs=inputs) as run:
        yield run


def finish(stage: Stage, run, record, inputs: dict) -> None:
    """The folder's run.json (last), then its MLflow run."""
    from spot.workflow.outputs import write_run_record
    write_run_record(run.out, stage=stage.name, job=run.job, params=run.params, metrics=record.metrics,
                     artifacts=record.artifacts, inputs=inputs, **run.record_fields())
    run.finish()


def chosen_folders(stage: Stage, cfg: dict, job: dict, chosen: dict, params_file: str) -> list[dict]:
    """The job's output folders, or with `each` those of the values `chosen` names ({wildcard: values})."""
    folders = stage.output_wildcards(cfg, job)
    for w in stage.each:
        if values := chosen.get(w):
            known = list(dict.fromkeys(f[w] for f in folders))
            if bad := [v for v in values if v not in known]:
                raise ValueError(f"--{w} {bad[0]!r} is not one of {params_file}'s {', '.join(map(str, known))}")
            folders = [f for f in folders if f[w] in values]
    return folders


def passes(stage: Stage, folders: list[dict]) -> list[list[dict]]:
    """`folders` in groups that differ only in the `one_pass` wildcard, in order."""
    groups: dict[tuple, list[dict]] = {}
    for f in folders:
        groups.setdefault(tuple(v for k, v in f.items() if k != stage.one_pass), []).append(f)
    return list(groups.values())


def job_threads(stage: Stage) -> None:
    """A job computes with the threads its stage declares (at most the CPUs), as Snakemake gives it
    through OMP_NUM_THREADS: a job that DVC or a person runs gets the same count, so the same numbers."""
    if "OMP_NUM_THREADS" not in os.environ and "torch" not in sys.modules:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(min(stage.threads, cpus))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads


def check_job(stage: Stage, cfg: dict, job: dict, params_file: str) -> None:
    """One-line ValueError naming the option whose value is not in the config's jobs of `stage`."""
    jobs = stage.jobs(cfg)
    if job in jobs:
        return
    for w, v in job.items():
        values = list(dict.fromkeys(j[w] for j in jobs))
        if v not in values:
            raise ValueError(f"--{w} {v!r} is not one of {params_file}'s {', '.join(map(str, values))}")
    raise ValueError(f"{stage.job_id(job)} is not a job of {params_file}")
