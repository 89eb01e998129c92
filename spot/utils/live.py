"""Live metrics of the job running in this process: the interface a stage logs through.

A stage calls `log_metrics({...}, step)` as it goes (the training: loss, accuracy and learning rate
per step, val accuracy per epoch) and `start_series(step)` when it resumes; the job's MLflow run
(`spot.workflow.tracking.JobRun`, attached by `spot.workflow.runner`) sends them to MLflow and to the job's
series.csv. Outside a job (a stage function called directly, a DDP rank other than 0) they do
nothing. Standard library only: a stage's code dependencies (`spot.workflow.dvc.code_deps`, DVC's deps)
hold this file, not the MLflow code, so changing how results are logged reruns no stage.
"""
from __future__ import annotations

_SINK = None                     # the attached JobRun: .log(metrics, step), .start_series(step)


def log_metrics(metrics: dict, step: int) -> None:
    """Log `metrics` (name -> number) at `step`. Names with a '/' are MLflow's ('train/loss');
    others are named like the job's record metrics (`spot.workflow.tracking.metric_name`: 'val_top1' of a
    training is 'val/top1')."""
    if _SINK is not None:
        _SINK.log(metrics, step)


def start_series(step: int = 0) -> None:
    """The job's series continue from `step` (a training resumed from its checkpoint at `step`):
    points an earlier, killed attempt logged after it are dropped, those up to it kept. Without a
    call, the first `log_metrics` starts the series afresh."""
    if _SINK is not None:
        _SINK.start_series(step)


def attach(sink):
    """Make `sink` (or None) receive the calls above; returns the one it replaces."""
    global _SINK
    previous, _SINK = _SINK, sink
    return previous
