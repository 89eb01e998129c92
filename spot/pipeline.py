"""The stage table: every pipeline stage declared once.

A `Stage` names its wildcards, the config keys it reads, its inputs and output (folders of
`spot.layout`) and the function that runs it. From this table come the `spot` subcommands
(`spot.cli`), the Snakemake rules (`workflow/rules/stages.smk`) and `dvc.yaml` (`spot.dvc_yaml`),
so the engines run the same jobs with the same commands and rerun on the same parameters.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spot.layout import Layout
from spot.layout import wildcards as folder_wildcards

PACKAGE = Path(__file__).resolve().parent
INT_WILDCARDS = ("budget", "part")


@dataclass(frozen=True)
class Stage:
    """One stage. `params(cfg, wildcards)` lists the dotted config keys the job reads (its rerun
    triggers); `inputs(cfg, wildcards)` maps input names to `(layout kind, wildcards)` folders or
    lists of them, per output folder; `jobs(cfg)` lists every job's wildcards for a config. A job
    writes one folder of kind `output`, or with `each` one per combination of those wildcards'
    values (`values(cfg)`, e.g. every prior x budget), each folder with its own run.json and MLflow
    run: the function runs once per folder in the job's process (one start-up), or with `one_pass`
    once per group of folders that differ only in that wildcard (evaluate: one pass over the
    images for every budget of a prior)."""
    name: str
    run: str                                         # "module:function" under spot.stages
    help: str
    wildcards: tuple[str, ...]                       # the job's
    params: Callable[[dict, dict], list[str]]
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
    one_pass: str | None = None                      # the function takes the folders of its values at once

    @property
    def rule(self) -> str:
        """The Snakemake rule name."""
        return self.name.replace("-", "_")

    @property
    def module(self) -> str:
        return "spot.stages." + self.run.split(":")[0]

    def function(self) -> Callable:
        """The stage's entry point, imported on demand: `fn(cfg, inputs, out, **wildcards) -> Record` per
        folder (the folder's wildcards), or with `one_pass`: `fn(cfg, inputs, outs, **wildcards) ->
        {value: Record}`, `outs` {value of `one_pass`: folder}, `wildcards` the rest of the folders'."""
        module, fn = self.run.split(":")
        return getattr(importlib.import_module(f"spot.stages.{module}"), fn)

    def typed(self, wildcards) -> dict:
        """The job's wildcards from any mapping of strings (Snakemake's), budgets and parts as ints."""
        return {w: int(wildcards[w]) if w in INT_WILDCARDS else str(wildcards[w]) for w in self.wildcards}

    def job_id(self, wildcards: dict) -> str:
        """'evaluate/spot/grid/4': an output folder's identity (MLflow run name, run.json `job`), the
        stage and its wildcards in the folder's order; with the job's wildcards only, the job's
        ('evaluate/spot')."""
        names = folder_wildcards(self.output) if set(self.each) & set(wildcards) else self.wildcards
        return "/".join([self.name, *(str(wildcards[w]) for w in names)])

    def folders(self, cfg: dict, wildcards: dict) -> list[dict]:
        """The wildcards of a job's output folders: the job's own, or theirs with each of `values(cfg)`."""
        return [wildcards | v for v in self.values(cfg)] if self.each else [wildcards]

    def outputs(self, cfg: dict) -> list[dict]:
        """The wildcards of every output folder of a config's jobs."""
        return [f for w in self.jobs(cfg) for f in self.folders(cfg, w)]

    def input_folders(self, cfg: dict, layout: Layout, wildcards: dict) -> dict[str, Path | list[Path]]:
        """Input name -> folder (or list of folders) for one output folder's wildcards."""
        def folder(ref):
            kind, wc = ref
            return layout(kind, **wc)
        return {k: [folder(r) for r in v] if isinstance(v, list) else folder(v)
                for k, v in self.inputs(cfg, wildcards).items()}

    def job_inputs(self, cfg: dict, layout: Layout, wildcards: dict,
                   folders: list[dict] | None = None) -> dict[str, Path | list[Path]]:
        """Input name -> folder(s) of a whole job (or of some of its `folders`), over its output
        folders: a name that is one folder in each stays one folder if it is the same in all, else
        becomes the list of them."""
        merged: dict[str, list[Path]] = {}
        single = set()
        for f in self.folders(cfg, wildcards) if folders is None else folders:
            for name, v in self.input_folders(cfg, layout, f).items():
                if not isinstance(v, list):
                    single.add(name)
                paths = merged.setdefault(name, [])
                paths += [p for p in (v if isinstance(v, list) else [v]) if p not in paths]
        return {k: v[0] if k in single and len(v) == 1 else v for k, v in merged.items()}

    def param_values(self, cfg: dict, wildcards: dict) -> dict:
        """Dotted key -> value of every config value the job reads, down to the leaves."""
        return flatten({k: lookup(cfg, k) for k in self.params(cfg, wildcards)})

    def command(self, params_file: str, wildcards: dict) -> str:
        """The job's command line, e.g. `spot evaluate --params params.yaml --backbone spot ...`."""
        flags = "".join(f" --{w} {wildcards[w]}" for w in self.wildcards)
        return f"spot {self.name} --params {params_file}{flags}"


def lookup(cfg: dict, key: str):
    """cfg["a"]["b"] for key "a.b" (KeyError naming the key)."""
    value = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"config has no key {key!r}")
        value = value[part]
    return value


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values are leaves."""
    out = {}
    for k, v in tree.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


class Declared(dict):
    """The config a stage declared: reading any other key raises a KeyError naming it."""

    def __init__(self, values: dict, prefix: str = ""):
        super().__init__({k: Declared(v, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in values.items()})
        self.prefix = prefix

    def __missing__(self, key):
        raise KeyError(f"the stage reads config key '{self.prefix}{key}', which it does not declare")


def declared(cfg: dict, keys: list[str]) -> Declared:
    """The part of `cfg` under `keys` (dotted), nested as in `cfg`."""
    out: dict = {}
    for key in keys:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = lookup(cfg, key)
    return Declared(out)


def product(**axes) -> list[dict]:
    """Every combination of the axes' values, as wildcard dicts, in order."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


# --- the stages -----------------------------------------------------------------------------------

def backbone_params(cfg, w):
    spec = cfg["backbones"][w["backbone"]]
    return [f"backbones.{w['backbone']}", "seed", "device"] + (["train"] if spec["make"] == "train" else [])


def backbone_inputs(cfg, w):
    spec = cfg["backbones"][w["backbone"]]
    inputs = {"shards": ("shards", {}), "decoded": decoded(cfg, w["backbone"])} if spec["make"] == "train" else {}
    if spec.get("init"):
        inputs["init"] = ("backbone", {"backbone": spec["init"]})
    return inputs


def decoded(cfg, backbone):
    """The decoded images a backbone reads (its data geometry, planned from the config)."""
    from spot.data.decoded import geometry_name, planned_data_config
    return ("decoded", {"geometry": geometry_name(planned_data_config(cfg, backbone))})


def geometries(cfg) -> list[dict]:
    return [dict(t) for t in dict.fromkeys(tuple(decoded(cfg, b)[1].items()) for b in cfg["backbones"])]


def eval_of(cfg, backbone, budget):
    """The evaluation an oracle job starts from (its prior supplies the start and the kNN bank)."""
    return ("eval", {"backbone": backbone, "prior": cfg["oracle"]["prior"], "budget": budget})


def report_inputs(cfg, w):
    jobs = {name: [(STAGE[name].output, f) for f in STAGE[name].outputs(cfg)]
            for name in ("evaluate", "oracle-gather", "transfer", "analyze", "placer-transfer", *PLACEMENT)}
    first = next(iter(cfg["backbones"]))                  # the config's first: its evaluations make the prior sheet
    return dict(backbone=("backbone", {"backbone": first}), decoded=decoded(cfg, first), eval=jobs["evaluate"],
                oracle=jobs["oracle-gather"], transfer=jobs["transfer"], analysis=jobs["analyze"],
                placer_transfer=jobs["placer-transfer"], **{m: jobs[m] for m in PLACEMENT})


PLACEMENT = ("learned", "placer", "entropy")             # label-free placement stages, `placement.methods`


def placement_jobs(method):
    """The jobs of a label-free placement stage: every backbone (each at `placement.budgets`), if the
    method is on and has budgets."""
    return lambda cfg: (product(backbone=list(cfg["backbones"]))
                        if method in cfg["placement"]["methods"] and cfg["placement"]["budgets"] else [])


def placer_transfers(cfg) -> list[dict]:
    """Every ordered pair of different backbones (each at `placement.transfer`), if placers run."""
    if "placer" not in cfg["placement"]["methods"] or not cfg["placement"]["transfer"]:
        return []
    return [j for j in product(src=list(cfg["backbones"]), dst=list(cfg["backbones"])) if j["src"] != j["dst"]]


def model_inputs(cfg, w):
    """A job's backbone `w["backbone"]` and the decoded images it reads."""
    return {"backbone": ("backbone", {"backbone": w["backbone"]}), "decoded": decoded(cfg, w["backbone"])}


def model_maps(cfg, wanted: bool) -> dict:
    """The model-saliency maps as an input, if `wanted` and the config makes them (`saliency.model`)."""
    model = cfg["saliency"]["model"]
    return {"model_saliency": ("model-saliency", {"backbone": model})} if wanted and model else {}


def covering(**axes: str) -> dict:
    """`each` and `values` of a stage whose jobs cover every combination of the wildcards `axes`,
    each with its values at a dotted config key (a dict: its keys), e.g. budget="oracle.budgets"."""
    return dict(each=tuple(axes), values=lambda cfg: product(**{w: list(lookup(cfg, k)) for w, k in axes.items()}))


PER_BUDGET = covering(budget="placement.budgets")                # label-free placement jobs
ORACLE_BUDGETS = covering(budget="oracle.budgets")
ORACLE = ["oracle.prior", "oracle.steps", "oracle.lr", "oracle.optimizer", "oracle.batch_size", "oracle.batch_tokens",
          "oracle.parts", "oracle.save_every", "oracle.compile", "seed", "device"]

STAGES = [
    Stage("shard", "shard:run", "write the dataset into WebDataset shards", (),
          params=lambda cfg, w: ["data", "seed"], inputs=lambda cfg, w: {}, jobs=lambda cfg: [{}],
          output="shards", threads=32,
          options={"workers": dict(type=int, help="writer processes (default: the CPUs it may use, at most "
                                                  "OMP_NUM_THREADS, which Snakemake sets to the job's threads)")}),
    Stage("saliency", "saliency:run", "precompute a saliency map per image", (),
          params=lambda cfg, w: ["saliency.method", "saliency.size", "report.pictures", "device"],
          inputs=lambda cfg, w: {"shards": ("shards", {})}, jobs=lambda cfg: [{}], output="saliency", threads=32,
          gpu=True, options={"workers": dict(type=int, help="decoding processes (default: the CPUs it may use, at "
                                                           "most OMP_NUM_THREADS); the maps are computed on `device`")}),
    Stage("decode", "decode:run", "decode every image (and saliency map) once for a data geometry", ("geometry",),
          params=lambda cfg, w: [], inputs=lambda cfg, w: {"shards": ("shards", {}), "saliency": ("saliency", {})},
          jobs=geometries, output="decoded", threads=32,
          options={"workers": dict(type=int, help="decoding processes (default: the CPUs it may use, at most "
                                                  "OMP_NUM_THREADS)")}),
    Stage("backbone", "backbone:run", "fetch (timm) or train one backbone of the config", ("backbone",),
          params=backbone_params, inputs=backbone_inputs, jobs=lambda cfg: product(backbone=list(cfg["backbones"])),
          output="backbone", state="checkpoint", threads=2, gpu=True,
          options={"resume": dict(action=argparse.BooleanOptionalAction, default=None,
                                  help="--resume: continue the checkpoint, stop if another config made it; "
                                       "--no-resume: start over (default: continue it if this config made it)")}),
    Stage("model-saliency", "model_saliency:run", "saliency maps from a trained backbone (input gradients)",
          ("backbone",),
          params=lambda cfg, w: ["saliency.size", "eval.knn.bank_size", "eval.batch_size", "report.pictures", "device"],
          inputs=model_inputs, jobs=lambda cfg: [{"backbone": cfg["saliency"]["model"]}] if cfg["saliency"]["model"]
          else [], output="model-saliency", gpu=True),
    Stage("evaluate", "evaluate:run", "top-1 and kNN of one backbone, every prior x budget (a pass per prior)",
          ("backbone",),
          params=lambda cfg, w: ["eval.batch_size", "eval.knn", "eval.compile", "seed", "device"],
          inputs=lambda cfg, w: model_inputs(cfg, w) | model_maps(cfg, w["prior"] == "model_salient"),
          jobs=lambda cfg: product(backbone=list(cfg["backbones"])), output="eval", gpu=True,
          **covering(prior="eval.priors", budget="eval.budgets"), one_pass="budget"),
    Stage("oracle", "oracle:search", "SPoT-ON search on one part of the val shards at every budget",
          ("backbone", "part"), params=lambda cfg, w: ORACLE,
          inputs=lambda cfg, w: {"backbone": ("backbone", {"backbone": w["backbone"]}),
                                 "decoded": decoded(cfg, w["backbone"])},
          jobs=lambda cfg: product(backbone=list(cfg["backbones"]), part=list(range(cfg["oracle"]["parts"]))),
          output="oracle-part", gpu=True, **ORACLE_BUDGETS),
    Stage("oracle-gather", "oracle_gather:run", "join the oracle parts, kNN of the found features", ("backbone",),
          params=lambda cfg, w: ["oracle.prior", "eval.knn"],
          inputs=lambda cfg, w: {"parts": [("oracle-part", dict(w, part=p)) for p in range(cfg["oracle"]["parts"])],
                                 "eval": eval_of(cfg, w["backbone"], w["budget"])},
          jobs=lambda cfg: product(backbone=list(cfg["backbones"])),
          output="oracle", **ORACLE_BUDGETS),
    Stage("transfer", "transfer:run", "every backbone's oracle placements evaluated on --dst", ("dst",),
          params=lambda cfg, w: ["oracle.prior", "eval.batch_size", "device"],
          inputs=lambda cfg, w: {"oracle": ("oracle", {"backbone": w["src"], "budget": w["budget"]}),
                                 "eval": eval_of(cfg, w["dst"], w["budget"]),
                                 "backbone": ("backbone", {"backbone": w["dst"]}), "decoded": decoded(cfg, w["dst"])},
          jobs=lambda cfg: product(dst=list(cfg["backbones"])), output="transfer", gpu=True,
          **covering(src="backbones", budget="transfer.budgets")),
    Stage("analyze", "analyze:run", "saliency under the oracle positions, trajectory pictures", ("backbone",),
          params=lambda cfg, w: ["report.pictures"],
          inputs=lambda cfg, w: {"oracle": ("oracle", w)} | model_inputs(cfg, w) | model_maps(cfg, True),
          jobs=lambda cfg: product(backbone=list(cfg["backbones"])),
          output="analysis", **ORACLE_BUDGETS),
    Stage("learned", "learned:run", "fit N positions shared by all images (label-free at inference)",
          ("backbone",),
          params=lambda cfg, w: ["placement.batch_size", "placement.learned", "eval.batch_size", "eval.knn", "seed",
                                 "device"],
          inputs=model_inputs, jobs=placement_jobs("learned"), output="learned", gpu=True, **PER_BUDGET),
    Stage("placer", "placer:run", "train a network that places N tokens per image, evaluate it", ("backbone",),
          params=lambda cfg, w: ["placement.batch_size", "placement.placer", "eval.batch_size", "eval.knn", "seed",
                                 "device"],
          inputs=lambda cfg, w: model_inputs(cfg, w) | ({"learned": ("learned", w)}
                                                        if cfg["placement"]["placer"]["init"] == "learned" else {}),
          jobs=placement_jobs("placer"), output="placer", gpu=True, **PER_BUDGET),
    Stage("placer-transfer", "placer_transfer:run", "the placer of --src placing the tokens of --dst",
          ("src", "dst"),
          params=lambda cfg, w: ["eval.batch_size", "eval.knn", "device"],
          inputs=lambda cfg, w: {"placer": ("placer", {"backbone": w["src"], "budget": w["budget"]}),
                                 "own": ("placer", {"backbone": w["dst"], "budget": w["budget"]}),
                                 **model_inputs(cfg, {"backbone": w["dst"]})},
          jobs=placer_transfers, output="placer-transfer", gpu=True, **covering(budget="placement.transfer")),
    Stage("entropy", "entropy:run", "label-free test-time search: lower the prediction's entropy", ("backbone",),
          params=lambda cfg, w: ["placement.entropy", "oracle.prior", "eval.batch_size", "eval.knn", "seed", "device"],
          inputs=model_inputs, jobs=placement_jobs("entropy"), output="entropy", gpu=True, **PER_BUDGET),
    Stage("report", "report:run", "the paper's tables, plots, pictures and findings", (),
          params=lambda cfg, w: ["report", "eval.priors", "backbones"], inputs=report_inputs, jobs=lambda cfg: [{}],
          output="report", metrics=("metrics",), plots=("plots/accuracy_vs_budget.png", "plots/oracle_steps.png"),
          files=("tables.md", "tables.html", "findings.md", "findings.html", "results.csv", "results.parquet",
                 "metrics.json", "plots/accuracy_vs_budget.csv", "pictures", "run.json")),
]
STAGE = {s.name: s for s in STAGES}


def all_jobs(cfg: dict) -> list[tuple[Stage, dict]]:
    """Every (stage, wildcards) job of a config, upstream stages first."""
    return [(s, w) for s in STAGES for w in s.jobs(cfg)]


def code_deps(stage: Stage) -> list[str]:
    """The `spot` source files a stage runs: its module and every `spot` module it imports, found by
    reading the imports (at any depth, function-local ones too), as paths relative to the repository.
    Package `__init__.py` files hold no code a stage runs and are left out."""
    seen, todo = set(), [stage.module]
    while todo:
        name = todo.pop()
        path = module_path(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return sorted(str(p.relative_to(PACKAGE.parent)) for p in seen)


def module_path(name: str) -> Path | None:
    """The source file of module `spot...` (None for other packages, packages' __init__ and names
    that are not modules)."""
    if name != "spot" and not name.startswith("spot."):
        return None
    path = PACKAGE.parent / (name.replace(".", "/") + ".py")
    return path if path.is_file() else None
