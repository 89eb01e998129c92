rule evaluate:
    input:
        backbone=f"{ROOT}/backbones/{{backbone}}/run.json",
        shards=rules.shard.output.run,
        saliency=rules.saliency.output,
    output:
        f"{ROOT}/eval/{{backbone}}/{{prior}}/{{budget}}/run.json",
    params:
        eval=config["eval"],
        seed=config["seed"],
    threads: 1
    resources:
        gpu=GPU,
    log:
        f"{ROOT}/logs/eval/{{backbone}}/{{prior}}/{{budget}}.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("evaluate", backbone="backbone", prior="prior", budget="budget") + " 2> {log}"


rule oracle:
    input:
        backbone=f"{ROOT}/backbones/{{backbone}}/run.json",
        saliency=rules.saliency.output,
    output:
        f"{ROOT}/oracle-shards/{{backbone}}/{{prior}}/{{budget}}/{{shard}}.npz",
    params:
        oracle=config["oracle"],
        seed=config["seed"],
    threads: 1
    resources:
        gpu=GPU,
    log:
        f"{ROOT}/logs/oracle/{{backbone}}/{{prior}}/{{budget}}/{{shard}}.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("oracle", backbone="backbone", budget="budget", shard="shard") + " 2> {log}"


rule oracle_gather:
    input:
        shards=lambda w: expand(f"{ROOT}/oracle-shards/{w.backbone}/{w.prior}/{w.budget}/{{shard}}.npz",
                                shard=val_shards(w)),
        bank=f"{ROOT}/eval/{{backbone}}/{{prior}}/{{budget}}/run.json",
    output:
        f"{ROOT}/oracle/{{backbone}}/{{prior}}/{{budget}}/run.json",
    params:
        knn=config["eval"]["knn"],
    log:
        f"{ROOT}/logs/oracle_gather/{{backbone}}/{{prior}}/{{budget}}.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("oracle-gather", backbone="backbone", budget="budget") + " 2> {log}"


rule transfer:
    input:
        src=f"{ROOT}/oracle/{{src}}/{ORACLE_PRIOR}/{{budget}}/run.json",
        dst=f"{ROOT}/eval/{{dst}}/{ORACLE_PRIOR}/{{budget}}/run.json",
    output:
        f"{ROOT}/transfer/{{src}}__{{dst}}/{{budget}}/run.json",
    threads: 1
    resources:
        gpu=GPU,
    log:
        f"{ROOT}/logs/transfer/{{src}}__{{dst}}/{{budget}}.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("transfer", src="src", dst="dst", budget="budget") + " 2> {log}"


rule analyze:
    input:
        oracle=f"{ROOT}/oracle/{{backbone}}/{ORACLE_PRIOR}/{{budget}}/run.json",
        saliency=rules.saliency.output,
    output:
        f"{ROOT}/analysis/{{backbone}}/{ORACLE_PRIOR}/{{budget}}/run.json",
    log:
        f"{ROOT}/logs/analysis/{{backbone}}/{{budget}}.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("analyze", backbone="backbone", budget="budget") + " 2> {log}"
