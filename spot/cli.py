"""`spot <command>`: one subcommand per stage of `spot.pipeline.STAGES`, plus tools.

A stage command runs one job: it checks that the job's inputs are complete, takes its output
folder (`spot.outputs.writing`), runs the stage with the config keys it declares, writes run.json
last and logs it to MLflow (never fatal: `spot mlflow-sync` logs it later). An error a user can
cause is one line, `spot <command>: error: ...`, exit 2; `--debug` (or SPOT_DEBUG=1) shows the
traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from spot.config import load_config
from spot.environment import pin_cpu_kernels
from spot.layout import Layout
from spot.pipeline import INT_WILDCARDS, STAGE, STAGES, Stage, declared


def run_stage(stage: Stage, cfg: dict, a: argparse.Namespace) -> None:
    from spot import tracking
    from spot.outputs import require_complete
    layout = Layout(cfg["root"])
    wildcards = {w: getattr(a, w) for w in stage.wildcards}
    check_job(stage, cfg, wildcards, a.params)
    for name, folders in stage.job_inputs(cfg, layout, wildcards).items():
        for f in folders if isinstance(folders, list) else [folders]:
            require_complete(f, f"input {name}")
    options = {o.replace("-", "_"): getattr(a, o.replace("-", "_")) for o in stage.options}
    if stage.state:
        options["state"] = layout(stage.state, **wildcards)
    fn, cfg_job = stage.function(), declared(cfg, stage.params(cfg, wildcards))
    folders = chosen_folders(stage, cfg, wildcards, a)
    if int(os.environ.get("RANK", "0")) > 0:           # a torchrun rank other than 0 only trains along
        fn(cfg_job, stage.input_folders(cfg, layout, wildcards), layout(stage.output, **wildcards), **wildcards,
           **options)
        return
    if stage.one_pass:                                 # a group of folders at once, one pass over the data
        for group in passes(stage, folders):
            outs = {f[stage.one_pass]: layout(stage.output, **f) for f in group}
            inputs = stage.job_inputs(cfg, layout, wildcards, group)
            with contextlib.ExitStack() as stack:
                started = tracking.job_start()
                runs = {f[stage.one_pass]: stack.enter_context(job_run(stage, cfg, f, outs[f[stage.one_pass]], inputs,
                                                                       started)) for f in group}
                shared = {k: v for k, v in group[0].items() if k != stage.one_pass}
                for value, record in fn(cfg_job, inputs, outs, **shared, **options).items():
                    finish(cfg, stage, runs[value], record, inputs)
        return
    for f in folders:                                  # one folder after another, in this process
        out, inputs = layout(stage.output, **f), stage.input_folders(cfg, layout, f)
        with job_run(stage, cfg, f, out, inputs) as run:
            finish(cfg, stage, run, fn(cfg_job, inputs, out, **f, **options), inputs)


@contextlib.contextmanager
def job_run(stage: Stage, cfg: dict, folder: dict, out, inputs: dict, started: str | None = None):
    """Write folder `out` (wildcards `folder`): locked, markers removed (`spot.outputs.writing`),
    inside its live MLflow run (`spot.tracking.JobRun`, started at `started`, default now or, for
    the process's first, at its start), which the block yields."""
    from spot import tracking
    from spot.outputs import writing
    started = started or tracking.job_start()
    params = folder | stage.param_values(cfg, folder)
    with writing(out), tracking.JobRun(out, experiment=cfg["name"], uri=tracking.tracking_uri(cfg), stage=stage.name,
                                       job=stage.job_id(folder), params=params, inputs=inputs, started=started) as run:
        yield run


def finish(cfg: dict, stage: Stage, run, record, inputs: dict) -> None:
    """The folder's run.json (last), then its MLflow run."""
    from spot.utils import write_run_record
    write_run_record(run.out, stage=stage.name, job=run.job, params=run.params, metrics=record.metrics,
                     artifacts=record.artifacts, inputs=inputs, **run.record_fields())
    track(cfg, run.out, run)


def chosen_folders(stage: Stage, cfg: dict, wildcards: dict, a: argparse.Namespace) -> list[dict]:
    """The job's output folders, or with `each` those of the values named on the command line."""
    folders = stage.folders(cfg, wildcards)
    for w in stage.each:
        if chosen := getattr(a, w):
            values = list(dict.fromkeys(f[w] for f in folders))
            if bad := [v for v in chosen if v not in values]:
                raise ValueError(f"--{w} {bad[0]!r} is not one of {a.params}'s {', '.join(map(str, values))}")
            folders = [f for f in folders if f[w] in chosen]
    return folders


def passes(stage: Stage, folders: list[dict]) -> list[list[dict]]:
    """`folders` in groups that differ only in the `one_pass` wildcard, in order."""
    groups: dict[tuple, list[dict]] = {}
    for f in folders:
        groups.setdefault(tuple(v for k, v in f.items() if k != stage.one_pass), []).append(f)
    return list(groups.values())


def check_job(stage: Stage, cfg: dict, wildcards: dict, params: str) -> None:
    """One-line ValueError naming the option whose value is not in the config's jobs of `stage`."""
    jobs = stage.jobs(cfg)
    if wildcards in jobs:
        return
    for w, v in wildcards.items():
        values = list(dict.fromkeys(j[w] for j in jobs))
        if v not in values:
            raise ValueError(f"--{w} {v!r} is not one of {params}'s {', '.join(map(str, values))}")
    raise ValueError(f"{stage.job_id(wildcards)} is not a job of {params}")


def track(cfg: dict, run_dir, live=None) -> None:
    """Log the job's run.json to MLflow: into its live run (`spot.tracking.JobRun`), else as a new
    run; never fatal (one warning line; `spot mlflow-sync` logs it later)."""
    from spot import tracking
    if live is not None:
        live.finish()
    else:
        tracking.safe_log(run_dir, cfg["name"], tracking.tracking_uri(cfg))


def cmd_validate(cfg, a):
    from spot.preflight import check
    check(cfg, a.params)
    print(f"{a.params}: ok ({len(cfg['backbones'])} backbones, {len(cfg['eval']['priors'])} priors, "
          f"budgets {cfg['eval']['budgets']})")


def cmd_dvc_yaml(cfg, a):
    from spot.dvc_yaml import dvc_yaml
    text = dvc_yaml(cfg, a.params)
    if a.output == "-":
        sys.stdout.write(text)
        return
    from spot.utils import atomic_path
    with atomic_path(a.output) as tmp:
        tmp.write_text(text)
    print(f"wrote {a.output} for {a.params}")


def cmd_mlflow_init(cfg, a):
    from spot import tracking
    uri = tracking.tracking_uri(cfg)
    exp = tracking.init(cfg["name"], uri)
    if exp is None:
        print(f"MLflow experiment {cfg['name']!r} at {uri}: unreachable (results kept for mlflow-sync)")
        return
    ui = f"{uri}/" if uri.startswith(("http://", "https://")) else f"`mlflow ui --backend-store-uri {uri}`: "
    print(f"MLflow experiment {cfg['name']!r} at {uri}: ready; its runs table in the UI "
          f"{ui}#/experiments/{exp}?workflowType=machine_learning")


def cmd_mlflow_sync(cfg, a):
    from spot import tracking
    uri = tracking.tracking_uri(cfg)
    ids = tracking.sync(a.root or cfg["root"], cfg["name"], uri)
    print(f"logged {len(ids)} run records to {uri}")


TOOLS = {
    "validate": (cmd_validate, "check a params file: schema, devices, architectures, budgets, files", {}),
    "dvc-yaml": (cmd_dvc_yaml, "write dvc.yaml for a params file (the stages of spot.pipeline)",
                 {"output": dict(default="dvc.yaml", help="file to write, - for stdout (default dvc.yaml)")}),
    "mlflow-init": (cmd_mlflow_init, "create the MLflow store and experiment", {}),
    "mlflow-sync": (cmd_mlflow_sync, "log every run.json under the root to MLflow",
                    {"root": dict(help="folder to search (default: the config's root)")}),
}


def stage_options(stage: Stage) -> dict:
    """A stage command's flags: its wildcards (required), `each` (optional: some of its values), options."""
    def kind(w):
        return int if w in INT_WILDCARDS else str
    each = {w: dict(nargs="+", type=kind(w), help="only these (default: all the config's)") for w in stage.each}
    return {w: dict(required=True, type=kind(w)) for w in stage.wildcards} | each | stage.options


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spot", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    commands = [(s.name, (lambda cfg, a, s=s: run_stage(s, cfg, a)), s.help, stage_options(s)) for s in STAGES] + \
        [(name, fn, h, opts) for name, (fn, h, opts) in TOOLS.items()]
    for name, fn, helptext, options in commands:
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--params", default="params.yaml", help="configuration file (default params.yaml)")
        sp.add_argument("--debug", action="store_true", default=bool(os.environ.get("SPOT_DEBUG")),
                        help="show tracebacks (also SPOT_DEBUG=1)")
        for opt, kw in options.items():
            sp.add_argument(f"--{opt}", **kw)
        sp.set_defaults(fn=fn)
    return ap


def job_threads(stage: Stage) -> None:
    """A job computes with the threads its stage declares (at most the CPUs), as Snakemake gives it
    through OMP_NUM_THREADS: a job that DVC or a person runs gets the same count, so the same numbers."""
    if "OMP_NUM_THREADS" not in os.environ and "torch" not in sys.modules:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(min(stage.threads, cpus))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads


def main(argv: list[str] | None = None) -> int:
    pin_cpu_kernels()                                  # before torch loads: the same CPU kernels on any x86-64
    a = parser().parse_args(argv)
    if a.command in STAGE:
        job_threads(STAGE[a.command])
    try:
        a.fn(load_config(a.params), a)
    except Exception as e:  # noqa: BLE001 - every error a user can cause ends here as one line
        if a.debug or not isinstance(e, (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError)):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        close_progress_bars()
        print(f"spot {a.command}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    return 0


def close_progress_bars() -> None:
    """Close the tqdm bars an error left open (the traceback holds them until the process ends, when
    they would draw once more): the error line is then the last line of the job's log."""
    from tqdm import tqdm
    for bar in list(tqdm._instances):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
