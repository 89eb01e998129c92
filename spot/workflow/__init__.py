"""The workflow: stage type and table, layout, job runner, run records, config, preflight, DVC, MLflow tracking."""
