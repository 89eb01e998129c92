"""`spot <command>`: one subcommand per stage of `spot.workflow.stage_table.STAGES`, plus tools.

A stage command runs one job (`spot.workflow.runner.run_job`). An error a user can cause is one
line, `spot <command>: error: ...`, exit 2; `--debug` (or SPOT_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from spot.utils.environment import pin_cpu_kernels
from spot.utils.text import one_line
from spot.workflow.config import load_config
from spot.workflow.declaration import INT_WILDCARDS, Stage
from spot.workflow.stage_table import STAGE, STAGES


def run_stage(stage: Stage, cfg: dict, a: argparse.Namespace) -> None:
    from spot.workflow.runner import run_job
    options = {o.replace("-", "_"): getattr(a, o.replace("-", "_")) for o in stage.options}
    run_job(stage, cfg, a.params, {w: getattr(a, w) for w in stage.wildcards},
            chosen={w: getattr(a, w) for w in stage.each}, **options)


def cmd_validate(cfg, a):
    from spot.workflow.preflight import check
    check(cfg, a.params)
    print(f"{a.params}: ok ({len(cfg['backbones'])} backbones, {len(cfg['eval']['priors'])} priors, "
          f"budgets {cfg['eval']['budgets']})")


def cmd_dvc_yaml(cfg, a):
    from spot.workflow.dvc import dvc_yaml, write_dvc_yaml
    if a.output == "-":
        sys.stdout.write(dvc_yaml(cfg, a.params))
        return
    write_dvc_yaml(cfg, a.params, a.output)
    print(f"wrote {a.output} for {a.params}")


def cmd_dvc_done(cfg, a):
    from spot.workflow.dvc import record_in_snakemake
    from spot.workflow.tracking import check
    print(record_in_snakemake(a.params))
    print(check(cfg, a.params))             # the end of a DVC run: what did not reach MLflow


def cmd_mlflow_init(cfg, a):
    from spot.workflow.tracking import init, tracking_uri, ui_link
    uri = tracking_uri(cfg)
    exp = init(cfg["name"], uri)
    if exp is None:
        print(f"MLflow experiment {cfg['name']!r} at {uri}: unreachable (results kept for mlflow-sync)")
        return
    print(f"MLflow experiment {cfg['name']!r} at {uri}: ready; its runs: {ui_link(uri, exp)}")


def cmd_mlflow_sync(cfg, a):
    from spot.workflow.tracking import sync, tracking_uri
    uri = tracking_uri(cfg)
    ids = sync(a.root or cfg["root"], cfg["name"], uri)
    print(f"logged {len(ids)} run records to {uri}")


def cmd_verdicts(cfg, a):
    import pandas as pd

    from spot.report.verdicts import compare, summary
    base = a.base or f"{cfg['root']}/report/findings.csv"
    table = compare(pd.read_csv(base), pd.read_csv(a.other))
    changed = table[table.change != "same"]
    if len(changed):
        print(changed.to_string(index=False, columns=["case", "subject", "level", "verdict_base", "verdict_other"]))
    print(f"{base} vs {a.other}: {summary(table)}")
    if (table.change == "flipped").any():
        raise RuntimeError(f"{int((table.change == 'flipped').sum())} claims flipped between holds and reversed")


TOOLS = {
    "validate": (cmd_validate, "check a params file: schema, devices, architectures, budgets, files", {}),
    "dvc-yaml": (cmd_dvc_yaml, "write dvc.yaml for a params file (the stages of spot.workflow.stage_table)",
                 {"output": dict(default="dvc.yaml", help="file to write, - for stdout (default dvc.yaml)")}),
    "dvc-done": (cmd_dvc_done, "after `dvc repro` / `dvc exp run`: record its jobs in Snakemake's metadata", {}),
    "verdicts": (cmd_verdicts, "compare the verdicts of two runs' findings.csv (scripts/verdict-stability.sh)",
                 {"other": dict(required=True, help="the other run's findings.csv"),
                  "base": dict(help="default: the config's root/report/findings.csv")}),
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


def main(argv: list[str] | None = None) -> int:
    pin_cpu_kernels()                                  # before torch loads: the same CPU kernels on any x86-64
    a = parser().parse_args(argv)
    if a.command in STAGE:
        from spot.workflow.runner import job_threads
        job_threads(STAGE[a.command])
    try:
        a.fn(load_config(a.params), a)
    except Exception as e:  # noqa: BLE001 - every error a user can cause ends here as one line
        if a.debug or not isinstance(e, (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError)):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        close_progress_bars()
        print(f"spot {a.command}: error: {one_line(message)}", file=sys.stderr)
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
