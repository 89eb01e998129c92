"""The stage table: every pipeline stage declared once, with the planners of its jobs and inputs.

From this table come the `spot` subcommands (`spot.cli`), the Snakemake rules
(`workflow/rules/stages.smk`) and `dvc.yaml` (`spot.workflow.dvc`). So the engines run the same
jobs with the same commands, and rerun them on the same parameters.
"""
from __future__ import annotations

import argparse

from spot.data.geometry import geometry_name
from spot.methods import LABEL_FREE
from spot.training.backbones import backbone_spec
from spot.utils.replicates import paired_runs, primaries, same_draw
from spot.workflow.backbone_spec import planned_data_config
from spot.workflow.declaration import Stage, lookup, named, product


def backbone_params(cfg, w):
    trained = backbone_spec(cfg, w["backbone"]).trained
    return named("seed", "device", *(["train"] if trained else []), config=f"backbones.{w['backbone']}")


def backbone_inputs(cfg, w):
    spec = backbone_spec(cfg, w["backbone"])
    inputs = {"shards": ("shards", {}), "decoded": decoded(cfg, w["backbone"])} if spec.trained else {}
    if spec.init:
        inputs["init"] = ("backbone", {"backbone": spec.init})
    return inputs


def decoded(cfg, backbone):
    """The decoded images a backbone reads (its data geometry, planned from the config)."""
    return ("decoded", {"geometry": geometry_name(planned_data_config(cfg, backbone))})


def geometries(cfg) -> list[dict]:
    return [dict(t) for t in dict.fromkeys(tuple(decoded(cfg, b)[1].items()) for b in cfg["backbones"])]


def eval_of(cfg, backbone, budget):
    """The evaluation an oracle job starts from (its prior supplies the start and the kNN bank)."""
    return ("eval", {"backbone": backbone, "prior": cfg["oracle"]["prior"], "budget": budget})


def report_inputs(cfg, w):
    jobs = {name: [(STAGE[name].output, f) for f in STAGE[name].all_output_wildcards(cfg)]
            for name in ("evaluate", "oracle-gather", "transfer", "analyze", "placer-transfer", "reduction", *LABEL_FREE)}
    first = next(iter(cfg["backbones"]))                  # the config's first: its evaluations make the prior sheet
    return dict(backbone=("backbone", {"backbone": first}), decoded=decoded(cfg, first), eval=jobs["evaluate"],
                oracle=jobs["oracle-gather"], transfer=jobs["transfer"], analysis=jobs["analyze"],
                placer_transfer=jobs["placer-transfer"], reduction=jobs["reduction"], **{m: jobs[m] for m in LABEL_FREE})



def placement_jobs(method):
    """The jobs of a label-free placement stage, if the method is on and has budgets: every backbone at each of
    `placement.budgets`, a replicate (`spot.workflow.config.expand_seeds`) at
    `replicates.placement_budgets` (null: the same)."""
    def jobs(cfg):
        if method not in cfg["placement"]["methods"] or not cfg["placement"]["budgets"]:
            return []
        return [dict(backbone=b, budget=n) for b in cfg["backbones"]
                for n in lookup(cfg, replicate_key(cfg, b, "placement_budgets", "placement.budgets"))]
    return jobs


def placer_transfers(cfg) -> list[dict]:
    """Every ordered pair of a primary backbone `src` and a backbone `dst` of another recipe that
    transfers reach (`paired_runs`; src's placer of dst's draw: `same_draw`), each at
    `placement.transfer`, if placers run."""
    if "placer" not in cfg["placement"]["methods"] or not cfg["placement"]["transfer"]:
        return []
    return [j for j in product(src=primaries(cfg), dst=paired_runs(cfg))
            if j["src"] != (cfg["backbones"][j["dst"]].get("replicate_of") or j["dst"])]


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


def replicate_key(cfg, backbone: str, key: str, primary: str) -> str:
    """The dotted key a job of `backbone` reads a setting from: a replicate's own `replicates.<key>` unless
    null, else `primary`, the primaries' key."""
    own = cfg["replicates"][key] if cfg["backbones"][backbone].get("replicate_of") else None
    return primary if own is None else f"replicates.{key}"


def reduction_inputs(cfg, w):
    """The backbone, its images, and its grid-prior evaluations (random drop at each budget, and the plain
    model where a budget is the full grid), if eval.priors has the grid."""
    grid = [("eval", dict(backbone=w["backbone"], prior="grid", budget=n)) for n in cfg["eval"]["budgets"]]
    return model_inputs(cfg, w) | ({"grid": grid} if "grid" in cfg["eval"]["priors"] else {})


ORACLE_BUDGETS = covering(budget="oracle.budgets")
ORACLE = named("oracle.prior", "oracle.steps", "oracle.lr", "oracle.optimizer", "oracle.batch_size",
               "oracle.batch_tokens", "oracle.parts", "oracle.save_every", "oracle.compile", "seed", "device")
EVALUATION = named("eval.batch_size", "eval.knn", "device")      # what `spot.training.evaluation` runs with

STAGES = [
    Stage("shard", "write the dataset into WebDataset shards", (),
          params=lambda cfg, w: named("data", "seed"), inputs=lambda cfg, w: {}, jobs=lambda cfg: [{}],
          output="shards", threads=32,
          options={"workers": dict(type=int, help="writer processes (default: the CPUs it may use, at most "
                                                  "OMP_NUM_THREADS, which Snakemake sets to the job's threads)")}),
    Stage("saliency", "precompute a saliency map per image", (),
          params=lambda cfg, w: named("saliency.method", "saliency.size", "report.pictures", "device"),
          inputs=lambda cfg, w: {"shards": ("shards", {})}, jobs=lambda cfg: [{}], output="saliency", threads=32,
          gpu=True, options={"workers": dict(type=int, help="decoding processes (default: the CPUs it may use, at "
                                                           "most OMP_NUM_THREADS); the maps are computed on `device`")}),
    Stage("decode", "decode every image (and saliency map) once for a data geometry", ("geometry",),
          params=lambda cfg, w: {}, inputs=lambda cfg, w: {"shards": ("shards", {}), "saliency": ("saliency", {})},
          jobs=geometries, output="decoded", threads=32,
          options={"workers": dict(type=int, help="decoding processes (default: the CPUs it may use, at most "
                                                  "OMP_NUM_THREADS)")}),
    Stage("backbone", "fetch (timm) or train one backbone of the config", ("backbone",),
          params=backbone_params, inputs=backbone_inputs, jobs=lambda cfg: product(backbone=list(cfg["backbones"])),
          output="backbone", state="checkpoint", threads=1, gpu=True,   # on CPU, two 1-thread trainings side by
          # side do 1.7x the steps of one at 2 threads; a GPU or cluster run sets more (`--set-threads backbone=8`)
          options={"resume": dict(action=argparse.BooleanOptionalAction, default=None,
                                  help="--resume: continue the checkpoint, stop if another config made it; "
                                       "--no-resume: start over (default: continue it if this config made it)")}),
    Stage("model-saliency", "saliency maps from a trained backbone (input gradients)",
          ("backbone",),
          params=lambda cfg, w: named("saliency.size", "eval.knn.bank_size", "eval.batch_size", "report.pictures",
                                      "device"),
          inputs=model_inputs, jobs=lambda cfg: [{"backbone": cfg["saliency"]["model"]}] if cfg["saliency"]["model"]
          else [], output="model-saliency", gpu=True),
    Stage("evaluate", "top-1 and kNN of one backbone, every prior x budget (a pass per prior)",
          ("backbone",),
          params=lambda cfg, w: named("eval.compile", "seed", **EVALUATION,
                                      prior_seeds=replicate_key(cfg, w["backbone"], "prior_seeds", "eval.prior_seeds")),
          inputs=lambda cfg, w: model_inputs(cfg, w) | model_maps(cfg, w["prior"] == "model_salient"),
          jobs=lambda cfg: product(backbone=list(cfg["backbones"])), output="eval", gpu=True,
          **covering(prior="eval.priors", budget="eval.budgets"), one_pass="budget"),
    Stage("oracle", "SPoT-ON search on one part of the val shards at every budget",
          ("backbone", "part"), params=lambda cfg, w: ORACLE,
          inputs=lambda cfg, w: {"backbone": ("backbone", {"backbone": w["backbone"]}),
                                 "decoded": decoded(cfg, w["backbone"])},
          jobs=lambda cfg: product(backbone=list(cfg["backbones"]), part=list(range(cfg["oracle"]["parts"]))),
          output="oracle-part", gpu=True, **ORACLE_BUDGETS),
    Stage("oracle-gather", "join the oracle parts, kNN of the found features", ("backbone",),
          params=lambda cfg, w: named("oracle.prior", "eval.knn"),
          inputs=lambda cfg, w: {"parts": [("oracle-part", dict(w, part=p)) for p in range(cfg["oracle"]["parts"])],
                                 "eval": eval_of(cfg, w["backbone"], w["budget"])},
          jobs=lambda cfg: product(backbone=list(cfg["backbones"])),
          output="oracle", **ORACLE_BUDGETS),
    Stage("transfer", "every recipe's oracle placements (its run of --dst's draw) evaluated on --dst", ("dst",),
          params=lambda cfg, w: named("oracle.prior", "eval.batch_size", "device"),
          inputs=lambda cfg, w: {"oracle": ("oracle", {"backbone": same_draw(cfg, w["src"], w["dst"]),
                                                       "budget": w["budget"]}),
                                 "eval": eval_of(cfg, w["dst"], w["budget"]),
                                 "backbone": ("backbone", {"backbone": w["dst"]}), "decoded": decoded(cfg, w["dst"])},
          jobs=lambda cfg: product(dst=paired_runs(cfg)), output="transfer", gpu=True, each=("src", "budget"),
          values=lambda cfg: product(src=primaries(cfg), budget=cfg["transfer"]["budgets"])),
    Stage("analyze", "saliency under the oracle positions, trajectory pictures", ("backbone",),
          params=lambda cfg, w: named("report.pictures"),
          inputs=lambda cfg, w: {"oracle": ("oracle", w)} | model_inputs(cfg, w) | model_maps(cfg, True),
          jobs=lambda cfg: product(backbone=primaries(cfg)),
          output="analysis", **ORACLE_BUDGETS),
    Stage("learned", "fit N positions shared by all images (label-free at inference)",
          ("backbone", "budget"),
          params=lambda cfg, w: named("placement.learned", "seed", **EVALUATION, fit_batch_size="placement.batch_size"),
          inputs=model_inputs, jobs=placement_jobs("learned"), output="learned", gpu=True),
    Stage("placer", "train a network that places N tokens per image, evaluate it", ("backbone", "budget"),
          params=lambda cfg, w: named("placement.placer", "seed", **EVALUATION, fit_batch_size="placement.batch_size"),
          inputs=lambda cfg, w: model_inputs(cfg, w) | ({"learned": ("learned", w)}
                                                        if cfg["placement"]["placer"]["init"] == "learned" else {}),
          jobs=placement_jobs("placer"), output="placer", gpu=True),
    Stage("placer-transfer", "the placer of --src (its run of --dst's draw) placing the tokens of --dst",
          ("src", "dst"),
          params=lambda cfg, w: EVALUATION,
          inputs=lambda cfg, w: {"placer": ("placer", {"backbone": same_draw(cfg, w["src"], w["dst"]),
                                                       "budget": w["budget"]}),
                                 "own": ("placer", {"backbone": w["dst"], "budget": w["budget"]}),
                                 **model_inputs(cfg, {"backbone": w["dst"]})},
          jobs=placer_transfers, output="placer-transfer", gpu=True, **covering(budget="placement.transfer")),
    Stage("entropy", "label-free test-time search: lower the prediction's entropy", ("backbone", "budget"),
          params=lambda cfg, w: named("placement.entropy", "oracle.prior", "seed", **EVALUATION),
          inputs=model_inputs, jobs=placement_jobs("entropy"), output="entropy", gpu=True),
    Stage("reduction", "token reduction (ToMe, EViT, low resolution, random drop) at SPoT's FLOPs, one backbone",
          ("backbone",), params=lambda cfg, w: named(
              "reduction.methods", "reduction.tolerance", "reduction.evit_block", "reduction.prop_attn",
              "reduction.plain_attn", "eval.budgets", "eval.priors", "seed", **EVALUATION,
              oracle_budgets="oracle.budgets",
              sweep=replicate_key(cfg, w["backbone"], "reduction_sweep", "reduction.sweep")),
          inputs=reduction_inputs,
          jobs=lambda cfg: product(backbone=list(cfg["backbones"])) if cfg["reduction"]["methods"] else [],
          output="reduction", gpu=True),
    Stage("report", "the paper's tables, plots, pictures and findings", (),
          params=lambda cfg, w: named("report.pictures", "report.seed", "report.resamples", "eval.priors",
                                      "eval.prior_seeds", "oracle.prior", "backbones", "reduction.tolerance"),
          inputs=report_inputs, jobs=lambda cfg: [{}], output="report", metrics=("metrics",),
          plots=("plots/accuracy_vs_budget.png", "plots/oracle_steps.png", "plots/frontier.png"),
          files=("tables.md", "tables.html", "findings.md", "findings.html", "findings.csv", "results.csv",
                 "results.parquet", "replicates.csv", "metrics.json", "plots/accuracy_vs_budget.csv", "pictures",
                 "run.json")),
]
STAGE = {s.name: s for s in STAGES}


def all_jobs(cfg: dict) -> list[tuple[Stage, dict]]:
    """Every (stage, wildcards) job of a config, upstream stages first."""
    return [(s, w) for s in STAGES for w in s.jobs(cfg)]
