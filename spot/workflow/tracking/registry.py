"""A backbone's or placer's weights as the registered MLflow model of its job's run.

A backbone (`spot.core.model.SPoTViT`) reads images AND token positions, so its MLflow model is a pyfunc
over `load_backbone`, registered as `spot-<backbone>`. Input: float32 tensors `images` (B, C, H, W),
normalised as the backbone's data_config says, and `positions` (B, N, 2), (y, x) in [0, 1]; N = 0 reads
the full patch grid (an MLflow tensor signature has no optional inputs). Output: `logits` (B, num_classes).
A placer (`spot.methods.placer.Placer`) is a pyfunc over `load_placer`, registered as
`spot-placer-<backbone>-<N>`: `images` (B, C, H, W) (any H, W: it pools them) -> `positions` (B, N, 2).
A model is the code of `spot.workflow.tracking.pyfunc` (MLflow's models from code: nothing pickled) with the
job's weights and json file; it loads where the `spot` package is importable (MLflow's code_paths would
re-import `spot` in the logging process); its pip requirements are named, not inferred (inference loads
the model in a subprocess: seconds per job). Each version's description says what it is.
"""
from __future__ import annotations

from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from spot.utils.io import read_json
from spot.workflow.tracking.store import fluent

REQUIREMENTS = ("torch", "timm", "safetensors", "numpy")
FILES = {"backbone": ("model.safetensors", "backbone.json"), "placer": ("placer.safetensors", "placer.json")}
F32 = np.dtype(np.float32)
CODE = Path(__file__).with_name("pyfunc.py")


def model_name(stage: str, meta: dict) -> str:
    """The registered model of a backbone (`spot-<backbone>`) or placer (`spot-placer-<backbone>-<N>`)."""
    return f"spot-{meta['name']}" if stage == "backbone" else f"spot-placer-{meta['backbone']}-{meta['config']['n']}"


def description(stage: str, meta: dict, record: dict) -> str:
    """What a model version is: for a backbone its timm architecture, how it was made (recipe, seed, data)
    and its val top-1; for a placer its backbone and N; both with their job and code version."""
    made = f"job `{record['job']}`, code {record['code_version']}"
    if stage == "placer":
        return f"Placer of backbone `{meta['backbone']}` for N = {meta['config']['n']} tokens; {made}."
    p = record["params"]
    spec = {k.removeprefix(f"backbones.{meta['name']}."): v for k, v in p.items()
            if k.startswith(f"backbones.{meta['name']}.")}
    arch = (f"timm `{meta['timm_name']}`, {meta['img_size'][0]} px, patch {meta['patch_size']}, "
            f"{meta['num_classes']} classes, {meta['num_params'] / 1e6:.2f} M params")
    if meta["source"] != "train":
        return f"Backbone `{meta['name']}`: {arch}; fetched ({spec.get('checkpoint') or 'timm pretrained'}); {made}."
    recipe = ", ".join(f"{k.removeprefix('train.')} {p[k]}" for k in ("train.epochs", "train.lr", "train.batch_size")
                       if k in p)
    data = ", ".join(f"{k} `{v}`" for k, v in (record.get("inputs") or {}).items() if k in ("shards", "decoded"))
    start = f"`{spec['init']}`" if spec.get("init") else "scratch"
    top1 = record["metrics"].get("val_top1")
    score = "" if top1 is None else f"; val top-1 {top1:.4f}"
    return (f"Backbone `{meta['name']}`: {arch}; trained from {start} with {spec.get('tokens', 'grid')} tokens, "
            f"seed {spec.get('seed', p.get('seed'))} ({recipe}); data {data}{score}; {made}.")


def signature(stage: str, meta: dict) -> ModelSignature:
    """Float32 tensors in and out (the module's docstring), shapes from the job's json file."""
    if stage == "backbone":
        inputs = [TensorSpec(F32, (-1, *meta["data_config"]["input_size"]), "images"),
                  TensorSpec(F32, (-1, -1, 2), "positions")]
        return ModelSignature(Schema(inputs), Schema([TensorSpec(F32, (-1, meta["num_classes"]), "logits")]))
    return ModelSignature(Schema([TensorSpec(F32, (-1, meta["config"]["in_chans"], -1, -1), "images")]),
                          Schema([TensorSpec(F32, (-1, meta["config"]["n"], 2), "positions")]))


def example(stage: str, meta: dict) -> dict:
    """One image (zeros: a small JSON file); a backbone reads it at four positions."""
    if stage == "placer":
        side = meta["config"]["in_size"]
        return dict(images=np.zeros((1, meta["config"]["in_chans"], side, side), np.float32))
    return dict(images=np.zeros((1, *meta["data_config"]["input_size"]), np.float32),
                positions=np.array([[[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]], np.float32))


def log_model(c, run_id: str, run_dir: Path, record: dict) -> None:
    """Log the weights in a backbone or placer job's folder `run_dir` as the model of run `run_id` (the
    active fluent run, or resumed for the call), registered (`model_name`) with its `description`; other
    stages log none."""
    stage = record["stage"]
    if stage not in FILES or not (run_dir / FILES[stage][0]).is_file():
        return
    weights, about = (run_dir / name for name in FILES[stage])
    meta, mlflow = read_json(about), fluent(c.tracking_uri)
    active = mlflow.active_run()
    with nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(CODE), model_config=dict(stage=stage),
            registered_model_name=model_name(stage, meta),
            artifacts=dict(weights=str(weights), meta=str(about)), signature=signature(stage, meta),
            input_example=example(stage, meta), pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS])
    c.update_model_version(model_name(stage, meta), info.registered_model_version, description(stage, meta, record))
