"""Benchmarks: run by hand (`python -m benchmarks.bench_core`) or `snakemake bench`."""
