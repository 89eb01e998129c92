"""MLflow tracking: one run per job folder, live while the job runs, completed from its run.json; never fatal.

- `store`: the tracking URI, the one-warning error rule, the experiment, the pipeline's parent run and
  the end-of-run line (`check`);
- `record`: run.json as a run's contents (names, tags, params, datasets, metrics, files), `log_record`
  and `sync` for records logged later (`spot mlflow-sync`);
- `job_run`: `JobRun`, the run of a job while it runs (MLflow's fluent API);
- `series`: a job's step series on disk (series.csv); `registry` and `pyfunc`: a backbone's or placer's
  weights as a registered MLflow model.
"""
