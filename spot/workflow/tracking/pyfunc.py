"""The code of a backbone's or placer's MLflow model (models from code: this file and the job's files, nothing
pickled), its kind in the model config. float32 arrays: a backbone maps images (B, C, H, W), normalised as its
data_config says, and positions (B, N, 2), (y, x) in [0, 1] (N = 0: the full patch grid) to logits (B, classes);
a placer maps images (B, C, H, W), any H and W, to positions (B, N, 2)."""
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class SpotModel(PythonModel):
    _skip_type_hint_validation = True       # the signature checks inputs (no "Add type hints" warning in ANSI colour)

    def load_context(self, context):
        from spot.training.backbones import load_backbone
        from spot.training.placer_files import load_placer
        self.stage = context.model_config["stage"]
        self.model = (load_backbone if self.stage == "backbone" else load_placer)(Path(context.artifacts["weights"]).parent)

    def predict(self, context, model_input, params=None):
        x = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in model_input.items()}
        with torch.inference_mode():
            if self.stage == "placer":
                return self.model(x["images"]).numpy()
            return self.model(x["images"], x["positions"] if x["positions"].shape[1] else None).numpy()


mlflow.models.set_model(SpotModel())
