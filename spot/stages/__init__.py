"""Pipeline stages, one thin module each: `run(p, inputs, out, **wildcards) -> Record`.

`p` holds the params the stage declares in `spot.workflow.stage_table.STAGES`, by name (`p.steps`), `inputs` its
input folders (complete), `out` its output folder (locked, markers removed). A stage calls the
libraries (`spot.core`, `spot.methods`, `spot.data`, `spot.training`, `spot.report`), never
another stage.
"""
from __future__ import annotations

from typing import NamedTuple


class Record(NamedTuple):
    """What a stage reports about its job: metrics (name -> number, or a list: one value per step)
    and artifacts (files in its folder, relative paths). The runner adds the job's identity and
    params and writes them as run.json, last."""
    metrics: dict
    artifacts: list[str]
