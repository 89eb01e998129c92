"""`spot <command>`: one subcommand per pipeline stage, configured by params.yaml.

Paths follow docs/contracts.md under the config's `root` (default `out/`). After a stage writes its
`run.json`, the record is logged to MLflow (never fatal: `spot mlflow-sync` logs it later).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spot.config import load_config


def paths(cfg: dict) -> dict[str, Path]:
    root = Path(cfg["root"])
    return {k: root / k for k in ("shards", "saliency", "backbones", "checkpoints", "eval", "oracle",
                                  "oracle-shards", "transfer", "analysis", "report")} | {"root": root}


def track(cfg: dict, run_dir: Path) -> None:
    from spot import tracking
    tracking.safe_log(run_dir, cfg["name"], tracking.tracking_uri(cfg))


def cmd_validate(cfg, a):
    print(f"{a.params}: ok ({len(cfg['backbones'])} backbones, {len(cfg['eval']['priors'])} priors, "
          f"budgets {cfg['eval']['budgets']})")


def cmd_shard(cfg, a):
    from spot.data.shards import write_shards
    d = cfg["data"]
    out = paths(cfg)["shards"]
    write_shards(d["source"], d["root"], out, splits=d["splits"], shard_count=d["shard_count"],
                 shard_bytes=d["shard_bytes"], max_per_class=d.get("max_per_class"),
                 max_images=d.get("max_images"), seed=cfg["seed"], synset_words=d.get("synset_words"),
                 workers=a.workers)
    track(cfg, out)


def cmd_saliency(cfg, a):
    from spot.saliency import write_saliency
    p = paths(cfg)
    write_saliency(p["shards"], p["saliency"], cfg["saliency"]["method"], cfg["saliency"]["size"],
                   preview=cfg["report"]["pictures"])
    track(cfg, p["saliency"])


def cmd_backbone(cfg, a):
    if a.name not in cfg["backbones"]:
        raise ValueError(f"backbone {a.name!r} is not in params.yaml backbones ({', '.join(cfg['backbones'])})")
    spec, p = cfg["backbones"][a.name], paths(cfg)
    if a.action and a.action != spec["make"]:
        raise ValueError(f"backbones.{a.name}.make is {spec['make']!r}, not {a.action!r}")
    out = p["backbones"] / a.name
    if spec["make"] == "fetch":
        from spot.backbones import fetch
        fetch(a.name, out, model=spec["model"], checkpoint=spec.get("checkpoint"), **spec.get("arch", {}))
    else:
        from spot.train import train
        t = cfg["train"]
        init = spec.get("init")
        train(a.name, p["shards"], out, arch=spec.get("arch"), timm_name=spec.get("model", "vit_tiny_patch16_224"),
              init=p["backbones"] / init if init else None, tokens=spec.get("tokens", "spot"),
              priors=t["priors"], token_range=t["token_range"], epochs=t["epochs"], batch_size=t["batch_size"],
              lr=t["lr"], weight_decay=t["weight_decay"], warmup_epochs=t["warmup_epochs"],
              label_smoothing=t["label_smoothing"], grad_clip=t["grad_clip"],
              checkpoint_every=t["checkpoint_every"], data_config=t.get("data_config"),
              seed=spec.get("seed", cfg["seed"]), device=cfg["device"], num_workers=cfg["data"].get("workers", 0),
              checkpoint_dir=p["checkpoints"] / a.name, resume=a.resume)
    track(cfg, out)


def cmd_evaluate(cfg, a):
    from spot.evaluate import evaluate
    p = paths(cfg)
    out = p["eval"] / a.backbone / a.prior / str(a.budget)
    evaluate(p["backbones"] / a.backbone, p["shards"], out, a.prior, a.budget, k_nn=cfg["eval"]["knn"]["k"],
             temperature=cfg["eval"]["knn"]["temperature"], batch_size=cfg["eval"]["batch_size"],
             seed=cfg["seed"], saliency_dir=p["saliency"], device=cfg["device"],
             num_workers=cfg["data"].get("workers", 0), bank_size=cfg["eval"]["knn"].get("bank_size"))
    track(cfg, out)


def cmd_oracle(cfg, a):
    from spot.search import run_oracle
    p, o = paths(cfg), cfg["oracle"]
    shards = [a.shard] if a.shard else [s.stem for s in sorted(p["shards"].glob("val-*.tar"))]
    for shard in shards:
        run_oracle(p["backbones"] / a.backbone, p["shards"], shard,
                   p["oracle-shards"] / a.backbone / o["prior"] / str(a.budget) / f"{shard}.npz", o["prior"],
                   a.budget, steps=o["steps"], lr=o["lr"], optimizer=o["optimizer"], batch_size=o["batch_size"],
                   seed=cfg["seed"], saliency_dir=p["saliency"], device=cfg["device"])
    if not a.shard:
        cmd_oracle_gather(cfg, a)


def cmd_oracle_gather(cfg, a):
    from spot.search import gather_oracle
    p, o = paths(cfg), cfg["oracle"]
    parts = sorted((p["oracle-shards"] / a.backbone / o["prior"] / str(a.budget)).glob("val-*.npz"))
    if not parts:
        raise FileNotFoundError(f"no oracle shard results for {a.backbone}/{o['prior']}/{a.budget}")
    out = p["oracle"] / a.backbone / o["prior"] / str(a.budget)
    gather_oracle(parts, p["eval"] / a.backbone / o["prior"] / str(a.budget) / "bank.npz", out, a.backbone,
                  o["prior"], a.budget, dict(steps=o["steps"], lr=o["lr"], optimizer=o["optimizer"], seed=cfg["seed"]),
                  k_nn=cfg["eval"]["knn"]["k"], temperature=cfg["eval"]["knn"]["temperature"])
    track(cfg, out)


def cmd_transfer(cfg, a):
    from spot.transfer import transfer
    p, prior = paths(cfg), cfg["oracle"]["prior"]
    out = p["transfer"] / f"{a.src}__{a.dst}" / str(a.budget)
    transfer(p["oracle"] / a.src / prior / str(a.budget), p["backbones"] / a.dst,
             p["eval"] / a.dst / prior / str(a.budget), p["shards"], out,
             batch_size=cfg["eval"]["batch_size"], device=cfg["device"])
    track(cfg, out)


def cmd_analyze(cfg, a):
    from spot.analysis import analyze
    p, prior = paths(cfg), cfg["oracle"]["prior"]
    out = p["analysis"] / a.backbone / prior / str(a.budget)
    analyze(p["oracle"] / a.backbone / prior / str(a.budget), p["backbones"] / a.backbone, p["shards"],
            p["saliency"], out, pictures=cfg["report"]["pictures"])
    track(cfg, out)


def cmd_report(cfg, a):
    from spot.report import report
    p = paths(cfg)
    report(p["root"], p["report"], pictures=cfg["report"]["pictures"], priors=cfg["eval"]["priors"])
    track(cfg, p["report"])


def cmd_mlflow_init(cfg, a):
    from spot import tracking
    from spot.utils import write_json
    uri = tracking.tracking_uri(cfg)
    exp = tracking.init(cfg["name"], uri)
    write_json(paths(cfg)["root"] / "mlflow.json", dict(experiment=cfg["name"], experiment_id=exp))
    print(f"MLflow experiment {cfg['name']!r} at {uri}: {'ready' if exp else 'unreachable (results kept for mlflow-sync)'}")


def cmd_mlflow_sync(cfg, a):
    from spot import tracking
    uri = tracking.tracking_uri(cfg)
    ids = tracking.sync(a.root or cfg["root"], cfg["name"], uri)
    print(f"logged {len(ids)} run records to {uri}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spot", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    specs = {
        "validate": (cmd_validate, "check params.yaml against the schema", []),
        "shard": (cmd_shard, "write the dataset into WebDataset shards", []),
        "saliency": (cmd_saliency, "precompute a saliency map per image", []),
        "backbone": (cmd_backbone, "fetch (timm) or train one backbone of params.yaml", ["name"]),
        "train": (cmd_backbone, "train one backbone of params.yaml (= spot backbone train)", ["name"]),
        "evaluate": (cmd_evaluate, "top-1 and kNN of one backbone x prior x budget", ["backbone", "prior", "budget"]),
        "oracle": (cmd_oracle, "SPoT-ON search on one val shard (all shards + gather without --shard)",
                   ["backbone", "budget", "shard?"]),
        "oracle-gather": (cmd_oracle_gather, "join the per-shard oracle results", ["backbone", "budget"]),
        "transfer": (cmd_transfer, "oracle placements of --src evaluated on --dst", ["src", "dst", "budget"]),
        "analyze": (cmd_analyze, "saliency under oracle positions, trajectory pictures", ["backbone", "budget"]),
        "report": (cmd_report, "tables, plots, pictures, findings", []),
        "mlflow-init": (cmd_mlflow_init, "create the MLflow store and experiment", []),
        "mlflow-sync": (cmd_mlflow_sync, "log every run.json under the root to MLflow", ["root?"]),
    }
    for name, (fn, helptext, args) in specs.items():
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--params", default="params.yaml", help="configuration file (default params.yaml)")
        for arg in args:
            opt = arg.rstrip("?")
            sp.add_argument(f"--{opt}", required=not arg.endswith("?"), type=int if opt == "budget" else str)
        if fn is cmd_shard:
            sp.add_argument("--workers", type=int, help="writer processes (default: the CPUs it may use, "
                            "at most OMP_NUM_THREADS, which Snakemake sets to the job's threads)")
        if fn is cmd_backbone:
            if name == "backbone":
                sp.add_argument("action", nargs="?", choices=["fetch", "train"],
                                help="check that backbones.NAME.make is this (default: do what it says)")
            else:
                sp.set_defaults(action="train")
            sp.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                            help="continue training from the last checkpoint (default)")
        sp.set_defaults(fn=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        cfg = load_config(a.params)
        a.fn(cfg, a)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"spot {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
