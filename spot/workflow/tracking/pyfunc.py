"""The code of a backbone's or placer's MLflow model (MLflow's models from code: the model is this file
and the job's files, nothing pickled). MLflow runs the file when it logs or loads the model; the job's
kind comes from the model config, `{"stage": "backbone" | "placer"}`. `spot.workflow.tracking.registry` documents
the inputs and outputs."""
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


def tensors(model_input: dict, *names: str) -> list[torch.Tensor]:
    """The named float32 tensors of a pyfunc input."""
    return [torch.from_numpy(np.asarray(model_input[k], np.float32)) for k in names]


class SpotModel(PythonModel):
    """A backbone ({images, positions} -> logits) or a placer ({images} -> positions)."""

    _skip_type_hint_validation = True       # MLflow's switch: the signature checks inputs (no ANSI "Add type hints")

    def load_context(self, context):
        from spot.training.backbones import load_backbone
        from spot.training.placer_files import load_placer
        self.stage = context.model_config["stage"]
        load = load_backbone if self.stage == "backbone" else load_placer
        self.model = load(Path(context.artifacts["weights"]).parent)        # beside its json file

    def predict(self, context, model_input, params=None):
        with torch.inference_mode():
            if self.stage == "placer":
                return self.model(*tensors(model_input, "images")).numpy()
            images, positions = tensors(model_input, "images", "positions")
            return self.model(images, positions if positions.shape[1] else None).numpy()


mlflow.models.set_model(SpotModel())
