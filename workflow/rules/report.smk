EVAL = expand(f"{ROOT}/eval/{{backbone}}/{{prior}}/{{budget}}/run.json", backbone=BACKBONES,
              prior=config["eval"]["priors"], budget=config["eval"]["budgets"])
ORACLE = expand(f"{ROOT}/oracle/{{backbone}}/{ORACLE_PRIOR}/{{budget}}/run.json", backbone=BACKBONES,
                budget=config["oracle"]["budgets"])
TRANSFER = expand(f"{ROOT}/transfer/{{src}}__{{dst}}/{{budget}}/run.json", src=BACKBONES, dst=BACKBONES,
                  budget=config["transfer"]["budgets"])
ANALYSIS = expand(f"{ROOT}/analysis/{{backbone}}/{ORACLE_PRIOR}/{{budget}}/run.json", backbone=BACKBONES,
                  budget=config["oracle"]["budgets"])


rule report:
    input:
        EVAL + ORACLE + TRANSFER + ANALYSIS,
    output:
        f"{ROOT}/report/run.json",
    params:
        report=config["report"],
    log:
        f"{ROOT}/logs/report.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("report") + " 2> {log}"


rule mlflow_sync:
    input:
        rules.report.output,
    log:
        f"{ROOT}/logs/mlflow_sync.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("mlflow-sync") + " 2> {log}"


rule bench:
    """Benchmarks, by hand only (`snakemake bench`): tables on stdout, JSON in out/bench/."""
    log:
        f"{ROOT}/logs/bench.log",
    conda:
        "../envs/spot.yaml"
    shell:
        "(python -m benchmarks.bench_core && python -m benchmarks.bench_data && python -m benchmarks.bench_experiments) > {log} 2>&1; cat {log}"
