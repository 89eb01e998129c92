"""The workflow: stage type and table, backbone specs, layout, job runner, run records, config, preflight,
DVC, MLflow tracking."""
