rule mlflow_sync:
    """Log every run.json to MLflow (after a run with the tracking server down)."""
    input:
        f"{LAYOUT.pattern('report')}/run.json",
    log:
        str(LAYOUT.log("mlflow-sync")),
    conda:
        "../envs/spot.yaml"
    shell:
        f"spot mlflow-sync --params {PARAMS} 2> {{log}}"


rule bench:
    """Benchmarks, by hand only (`snakemake bench`): tables on stdout, JSON in out/bench/."""
    log:
        str(LAYOUT.log("bench")),
    conda:
        "../envs/spot.yaml"
    shell:
        "(python -m benchmarks.bench_core && python -m benchmarks.bench_data && python -m benchmarks.bench_experiments && python -m benchmarks.bench_pipeline && python -m benchmarks.bench_placement && python -m benchmarks.bench_launches) > {log} 2>&1; cat {log}"
