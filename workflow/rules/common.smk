import yaml

from spot.config import validate as validate_params

# A full configuration file replaces params.yaml (Snakemake would merge it key by key).
if PARAMS != "params.yaml":
    config.clear()
    config.update(yaml.safe_load(open(PARAMS)))
config.pop("params", None)
validate_params(config, PARAMS)

ROOT = config["root"]
BACKBONES = list(config["backbones"])
ORACLE_PRIOR = config["oracle"]["prior"]
MAP_PRIORS = ("salient", "inv_salient")
GPU = 1 if config["device"].startswith("cuda") else 0


wildcard_constraints:
    backbone=r"[A-Za-z0-9_-]+?",
    src=r"[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*",
    dst=r"[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*",
    prior=r"[a-z_]+",
    budget=r"\d+",
    shard=r"val-\d+",


def spot(command, **args):
    """The `spot` command line of a job; dvc.yaml runs the same ones (tests/test_dvc.py checks)."""
    flags = "".join(f" --{k} {{wildcards.{v}}}" if isinstance(v, str) and v.isidentifier() else f" --{k} {v}"
                    for k, v in args.items())
    return f"spot {command} --params {PARAMS}{flags}"


def val_shards(wildcards):
    """Names of the val shards, known once the shard checkpoint has run."""
    manifest = checkpoints.shard.get().output.manifest
    return [s["name"].removesuffix(".tar") for s in yaml.safe_load(open(manifest))["splits"]["val"]["shards"]]


def backbone_inputs(wildcards):
    """A backbone job waits for the shards (train) and for the backbone it fine-tunes from (init)."""
    spec = config["backbones"][wildcards.backbone]
    inputs = [rules.mlflow_init.output[0]]
    if spec["make"] == "train":
        inputs.append(rules.shard.output.run)
        if spec.get("init"):
            inputs.append(f"{ROOT}/backbones/{spec['init']}/run.json")
    return inputs
