"""MLflow models: a backbone job's weights as a pyfunc model of its run, registered as `spot-<backbone>`.

The backbone reads images AND token positions (`spot.core.model.SPoTViT`), so its MLflow model is a
pyfunc (`Backbone`) over `load_backbone`. Input: float32 tensors `images` (B, C, H, W), normalised as
the backbone's data_config says, and `positions` (B, N, 2), (y, x) in [0, 1]; N = 0 reads the full patch
grid (an MLflow tensor signature has no optional inputs). Output: `logits` (B, num_classes). The model
holds backbone.json and model.safetensors; it loads where the `spot` package is importable (MLflow's
code_paths would re-import `spot` in the logging process); its pip requirements are named, not
inferred (inference loads the model in a subprocess: seconds per job).
"""
from __future__ import annotations

from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import numpy as np

REQUIREMENTS = ("torch", "timm", "safetensors", "numpy")


def model_name(backbone: str) -> str:               # the registered model of backbone `backbone`
    return f"spot-{backbone}"


def backbone_model():
    """The pyfunc class (built on first use: mlflow imports only in the jobs that log a model)."""
    import warnings

    from mlflow.pyfunc import PythonModel
    warnings.filterwarnings("ignore", ".*Add type hints to the `predict` method")    # a dict of tensors has none

    class Backbone(PythonModel):
        """A saved SPoT backbone: {images, positions} -> logits (see the module's docstring)."""

        def load_context(self, context):
            from spot.training.backbones import load_backbone
            self.model = load_backbone(Path(context.artifacts["weights"]).parent)   # beside backbone.json

        def predict(self, context, model_input, params=None):
            import torch
            images, positions = (torch.from_numpy(np.asarray(model_input[k], np.float32)) for k in ("images", "positions"))
            with torch.inference_mode():
                return self.model(images, positions if positions.shape[1] else None).numpy()

    return Backbone()


def signature(meta: dict):
    """Input `images` (-1, C, H, W) and `positions` (-1, -1, 2), output `logits` (-1, num_classes), float32."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    f32 = np.dtype(np.float32)
    return ModelSignature(Schema([TensorSpec(f32, (-1, *meta["data_config"]["input_size"]), "images"),
                                  TensorSpec(f32, (-1, -1, 2), "positions")]),
                          Schema([TensorSpec(f32, (-1, meta["num_classes"]), "logits")]))


def example(meta: dict) -> dict:
    """One image (zeros: a small JSON file) read at four positions."""
    return dict(images=np.zeros((1, *meta["data_config"]["input_size"]), np.float32),
                positions=np.array([[[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]], np.float32))


def log_model(c, run_id: str, run_dir: Path, record: dict) -> None:
    """Log a backbone job's folder `run_dir` as the model of run `run_id` (the active fluent run, or
    resumed for the call), registered as `spot-<backbone>`; other stages log none."""
    if record["stage"] != "backbone" or not (run_dir / "model.safetensors").is_file():
        return
    from spot.utils.io import read_json
    from spot.workflow.tracking import fluent
    meta, mlflow = read_json(run_dir / "backbone.json"), fluent(c.tracking_uri)
    active = mlflow.active_run()
    with nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id, nested=True):
        mlflow.pyfunc.log_model(
            name="model", python_model=backbone_model(), registered_model_name=model_name(meta["name"]),
            artifacts=dict(weights=str(run_dir / "model.safetensors"), meta=str(run_dir / "backbone.json")),
            signature=signature(meta), input_example=example(meta),
            pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS])
