# SPoT pipeline: shards -> saliency -> backbones -> evaluate -> oracle -> transfer -> analysis -> report.
# Run: snakemake --cores all        (another configuration: --config params=config/imagenet.yaml)
from snakemake.utils import min_version

min_version("8.0")

PARAMS = config.get("params", "params.yaml")


configfile: PARAMS


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/backbones.smk"
include: "workflow/rules/experiments.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        f"{ROOT}/report/run.json",
