# SPoT pipeline: shard -> saliency -> backbone -> evaluate -> oracle -> transfer -> analyze -> report.
# Run: snakemake --cores all        (another configuration: --config params=config/imagenet.yaml)
# The rules come from the stage table in spot/workflow/stage_table.py (workflow/rules/stages.smk).
import sys

from snakemake.utils import min_version

from spot.workflow.config import read as read_params

min_version("8.0")

PARAMS = config.get("params", "params.yaml")
try:  # (Snakemake's own reading would say "Config file is not valid JSON or YAML" without its name)
    read_params(PARAMS)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"snakemake: error: {e}")


configfile: PARAMS


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/tools.smk"


rule all:
    default_target: True
    input:  # every job's run.json, not the report's alone: a deleted folder reruns its job and consumers
        [f"{LAYOUT(stage.output, **f)}/run.json" for stage in STAGES for f in stage.all_output_wildcards(config)],
