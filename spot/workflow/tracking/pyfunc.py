"""A backbone's or placer's weights as an MLflow model (models from code: this file and the job's files, nothing pickled),
registered by `log_model`. float32 arrays: a backbone maps images (B, C, H, W) and positions (B, N, 2), (y, x) in
[0, 1] (N = 0: the full grid), to logits (B, classes); a placer maps images (B, C, H, W), any H, W, to positions."""
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import Schema, TensorSpec

from spot.utils.io import read_json

RECIPE = ("train.epochs", "train.lr", "train.batch_size")       # a trained backbone's, in its description
FILES = {"backbone": ("model.safetensors", "backbone.json"), "placer": ("placer.safetensors", "placer.json")}


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


def log_model(out: Path, record: dict) -> None:
    """Job folder `out`'s weights as the active run's model, registered and described. Pip requirements are named
    (MLflow would infer them by loading the model in a subprocess: seconds per job)."""
    (weights, about), p = (out / f for f in FILES[record["stage"]]), record["params"]
    if not weights.is_file():
        return
    meta = read_json(about)
    if record["stage"] == "placer":
        n, chans, side = meta["config"]["n"], meta["config"]["in_chans"], meta["config"]["in_size"]
        name, text = f"spot-placer-{meta['backbone']}-{n}", f"Placer of backbone `{meta['backbone']}` for N = {n} tokens"
        example = dict(images=np.zeros((1, chans, side, side), np.float32))
        shapes = {"images": (-1, chans, -1, -1)}, {"positions": (-1, n, 2)}
    else:
        pre, size = f"backbones.{meta['name']}.", meta["data_config"]["input_size"]
        spec, top1 = {k.removeprefix(pre): v for k, v in p.items() if k.startswith(pre)}, record["metrics"].get("val_top1")
        example = dict(images=np.zeros((1, *size), np.float32),     # a zero image, read at four positions
                       positions=np.array([[[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]], np.float32))
        shapes = {"images": (-1, *size), "positions": (-1, -1, 2)}, {"logits": (-1, meta["num_classes"])}
        name, text = f"spot-{meta['name']}", (
            f"Backbone `{meta['name']}`: timm `{meta['timm_name']}`, {meta['img_size'][0]} px, patch {meta['patch_size']}, "
            f"{meta['num_classes']} classes, {meta['num_params'] / 1e6:.2f} M params; " + (
                f"fetched ({spec.get('checkpoint') or 'timm pretrained'})" if meta["source"] != "train" else
                f"trained from {spec.get('init') or 'scratch'} with {spec.get('tokens', 'grid')} tokens, seed "
                f"{spec.get('seed', p.get('seed'))} ({', '.join(f'{k[6:]} {p[k]}' for k in RECIPE if k in p)}); data "
                + ", ".join(f"{k} `{v}`" for k, v in (record.get("inputs") or {}).items() if k in ("shards", "decoded"))
                + ("" if top1 is None else f"; val top-1 {top1:.4f}")))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=__file__, model_config=dict(stage=record["stage"]), registered_model_name=name,
        artifacts=dict(weights=str(weights), meta=str(about)), input_example=example, pip_requirements=[
            f"{p}=={version(p)}" for p in ("torch", "timm", "safetensors", "numpy")],
        signature=ModelSignature(*(Schema([TensorSpec(np.dtype(np.float32), s, k) for k, s in d.items()]) for d in shapes)))
    mlflow.MlflowClient().update_model_version(
        name, info.registered_model_version, f"{text}; job `{record['job']}`, code {record['code_version']}.")


mlflow.models.set_model(SpotModel())
