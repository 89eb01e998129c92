"""The stage type: one declaration per pipeline stage, and the config helpers its planners use.

A `Stage` names its wildcards, its params (each config key it reads, under the name its code reads it by), its
inputs and output (folders of `spot.workflow.layout`). Its code is the module `spot.stages.<rule>`, entry point
`run`. The table of every stage is `spot.workflow.stage_table.STAGES`.
"""
from __future__ import annotations

import copy
import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from spot.utils.records import as_list, flatten
from spot.workflow.layout import Layout
from spot.workflow.layout import wildcards as folder_wildcards

INT_WILDCARDS = ("budget", "part")


@dataclass(frozen=True)
class Stage:
    """One stage. `params(cfg, wildcards)` maps each name the job's code reads to the dotted config
    key it holds (`named`; the keys are its rerun triggers). `inputs(cfg, wildcards)` maps input names
    to `(layout kind, wildcards)` folders, or lists of them, per output folder. `jobs(cfg)` lists every
    job's wildcards for a config.

    A job writes one folder of kind `output`, or with `each` one per combination of those
    wildcards' values (`values(cfg)`, e.g. every prior x budget). Each folder has its own run.json
    and MLflow run. The entry point runs once per folder in the job's process (one start-up), or
    with `one_pass` once per group of folders that differ only in that wildcard (evaluate: one
    pass over the images for every budget of a prior)."""
    name: str
    help: str
    wildcards: tuple[str, ...]                       # the job's
    params: Callable[[dict, dict], dict[str, str]]
    inputs: Callable[[dict, dict], dict]
    jobs: Callable[[dict], list[dict]]
    output: str                                      # layout kind of the job's folder
    state: str | None = None                         # layout kind of a folder kept across reruns (resume)
    metrics: tuple[str, ...] = ()                    # files in the output folder DVC shows as metrics,
    plots: tuple[str, ...] = ()                      # and as plots; with either, `files` lists the rest
    files: tuple[str, ...] = ()
    threads: int = 1
    gpu: bool = False
    options: dict = field(default_factory=dict)      # extra CLI flags: name -> argparse kwargs
    each: tuple[str, ...] = ()                       # wildcards whose every value one job covers:
    values: Callable[[dict], list[dict]] = lambda cfg: []   # one output folder per dict of them
    one_pass: str | None = None                      # the entry point takes the folders of its values at once

    @property
    def rule(self) -> str:
        """The Snakemake rule name."""
        return self.name.replace("-", "_")

    @property
    def module(self) -> str:
        """The module of the stage's code: 'spot.stages.oracle_gather'."""
        return f"spot.stages.{self.rule}"

    def entry_point(self) -> Callable:
        """The stage's `run`, imported on demand: `run(p, inputs, out, **wildcards) -> Record` per
        folder (the folder's wildcards; `p` the job's `Params`), or with `one_pass` `run(p, inputs, outs,
        **wildcards) -> {value: Record}`, `outs` {value of `one_pass`: folder}, `wildcards` the rest of the folders'."""
        return importlib.import_module(self.module).run

    def typed(self, wildcards) -> dict:
        """The job's wildcards from any mapping of strings (Snakemake's), budgets and parts as ints."""
        return {w: int(wildcards[w]) if w in INT_WILDCARDS else str(wildcards[w]) for w in self.wildcards}

    def job_id(self, wildcards: dict) -> str:
        """'evaluate/spot/grid/4': an output folder's identity (MLflow run name, run.json `job`), the
        stage and its wildcards in the folder's order; with the job's wildcards only, the job's
        ('evaluate/spot')."""
        names = folder_wildcards(self.output) if set(self.each) & set(wildcards) else self.wildcards
        return "/".join([self.name, *(str(wildcards[w]) for w in names)])

    def output_wildcards(self, cfg: dict, job: dict) -> list[dict]:
        """The wildcards of a job's output folders: the job's own, or theirs with each of `values(cfg)`."""
        return [job | v for v in self.values(cfg)] if self.each else [job]

    def all_output_wildcards(self, cfg: dict) -> list[dict]:
        """The wildcards of every output folder of a config's jobs."""
        return [f for job in self.jobs(cfg) for f in self.output_wildcards(cfg, job)]

    def input_folders(self, cfg: dict, layout: Layout, wildcards: dict) -> dict[str, Path | list[Path]]:
        """Input name -> folder (or list of folders) for one output folder's wildcards."""
        def folder(ref):
            kind, wc = ref
            return layout(kind, **wc)
        return {k: [folder(r) for r in v] if isinstance(v, list) else folder(v)
                for k, v in self.inputs(cfg, wildcards).items()}

    def job_inputs(self, cfg: dict, layout: Layout, job: dict,
                   folders: list[dict] | None = None) -> dict[str, Path | list[Path]]:
        """Input name -> folder(s) of a whole job (or of some of its output `folders`' wildcards):
        a name that is one folder in each stays one folder if it is the same in all, else becomes
        the list of them."""
        merged: dict[str, list[Path]] = {}
        single = set()
        for f in self.output_wildcards(cfg, job) if folders is None else folders:
            for name, v in self.input_folders(cfg, layout, f).items():
                if not isinstance(v, list):
                    single.add(name)
                paths = merged.setdefault(name, [])
                paths += [p for p in as_list(v) if p not in paths]
        return {k: v[0] if k in single and len(v) == 1 else v for k, v in merged.items()}

    def param_values(self, cfg: dict, wildcards: dict) -> dict:
        """Dotted key -> value of every config value the job reads, down to the leaves, in key order."""
        return dict(sorted(flatten({k: lookup(cfg, k) for k in self.params(cfg, wildcards).values()}).items()))

    def arguments(self, cfg: dict, wildcards: dict) -> Params:
        """The job's params by name, as its `run` reads them (copies: a job cannot change the config)."""
        return Params(**{name: copy.deepcopy(lookup(cfg, k)) for name, k in self.params(cfg, wildcards).items()})

    def command(self, params_file: str, wildcards: dict) -> str:
        """The job's command line, e.g. `spot evaluate --params params.yaml --backbone spot ...`."""
        return f"spot {self.name} --params {params_file}{self.flags(wildcards)}"

    def flags(self, wildcards: dict) -> str:
        """The job's options after `--params`: ' --backbone spot' (empty without wildcards)."""
        return "".join(f" --{w} {wildcards[w]}" for w in self.wildcards)


def lookup(cfg: dict, key: str):
    """cfg["a"]["b"] for key "a.b" (KeyError naming the key)."""
    value = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"config has no key {key!r}")
        value = value[part]
    return value


class Params(SimpleNamespace):
    """A job's params by name, `p.steps`; reading a name its stage does not declare raises, naming it."""

    def __getattr__(self, name: str):
        raise AttributeError(f"the stage reads param {name!r}, which it does not declare")


def named(*keys: str, **renamed: str) -> dict[str, str]:
    """A stage's params: each dotted config key of `keys` under its last part ('oracle.steps': steps), and
    `renamed` as given (name -> key). Two keys under one name raise a ValueError naming the name."""
    names = [k.rsplit(".", 1)[-1] for k in keys] + list(renamed)
    if clash := next((n for n in names if names.count(n) > 1), None):
        raise ValueError(f"two params are named {clash!r}: give one a name of its own")
    return dict(zip(names, [*keys, *renamed.values()]))


def product(**axes) -> list[dict]:
    """Every combination of the axes' values, as wildcard dicts, in order."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]

