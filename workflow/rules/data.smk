rule mlflow_init:
    output:
        f"{ROOT}/mlflow.json",
    log:
        f"{ROOT}/logs/mlflow_init.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("mlflow-init") + " 2> {log}"


checkpoint shard:
    input:
        rules.mlflow_init.output,
    output:
        run=f"{ROOT}/shards/run.json",
        manifest=f"{ROOT}/shards/manifest.json",
    threads: 32  # writer processes; Snakemake lowers it to --cores
    params:
        data=config["data"],
        seed=config["seed"],
    log:
        f"{ROOT}/logs/shard.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("shard") + " 2> {log}"


rule saliency:
    input:
        rules.shard.output.run,
    output:
        f"{ROOT}/saliency/run.json",
    params:
        saliency=config["saliency"],
    log:
        f"{ROOT}/logs/saliency.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("saliency") + " 2> {log}"
