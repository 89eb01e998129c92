"""A rehearsal of config/imagenet.yaml through real Snakemake: its three backbones (their timm models,
checkpoint forms and preprocessing), priors, SPoT-ON parts, transfers and label-free placements,
shrunk (stand-in checkpoints of 1-block ViTs with ImageNet's 1 000-class heads, 64 px, budgets 4 and
16, two steps, CPU) on a generated ImageNet tree whose wnids are spread over the 1 000."""
import json
import time

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo

from spot.data.loading import read_shard
from spot.data.sources import split_key
from spot.data.stream import shard_paths
from tests.conftest import REPO, copy_repo, snakemake
from tests.test_pipeline import expected_jobs, job_counts

pytestmark = pytest.mark.end_to_end
INDICES = (7, 150, 420, 777, 999)                 # ImageNet-1k classes of the tree: labels, not 0..4
SMALL = dict(embed_dim=32, depth=1, num_heads=2, img_size=64)
MAE = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.875, interpolation="bicubic")


def imagenet_tree(root, per_class=(("train", 4), ("val", 2))):
    """<root>/<split>/<wnid>/*.JPEG: photos of one colour per class with noise, at odd sizes."""
    rng = np.random.default_rng(0)
    wnids = ImageNetInfo().label_names()
    for c, index in enumerate(INDICES):
        for split, n in per_class:
            folder = root / split / wnids[index]
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.array([50 * c, 255 - 40 * c, 120], dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 40, (60 + 7 * i, 80, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnids[index]}_{i}.JPEG", quality=90)
    return root


def standins(cfg: dict, folder) -> dict:
    """Backbone -> a stand-in checkpoint of its timm model and `arch`, in the forms of the config's
    weights: a .safetensors, a plain .pth, and MAE's {'model': ...}."""
    forms = {"cls-in21k": "w.safetensors", "cls-in1k": "w.pth", "mae-in1k": "mae.pth"}
    paths = {}
    for name, spec in cfg["backbones"].items():
        torch.manual_seed(len(paths))
        state = timm.create_model(spec["model"], pretrained=False, **spec["arch"]).state_dict()
        path = folder / f"{name}-{forms[name]}"
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save({"model": state} if name == "mae-in1k" else state, path)
        paths[name] = str(path)
    return paths


def rehearsal_config(cwd) -> dict:
    """config/imagenet.yaml, shrunk where it costs time, its structure kept."""
    cfg = yaml.safe_load((REPO / "config" / "imagenet.yaml").read_text())
    assert list(cfg["backbones"]) == ["cls-in21k", "cls-in1k", "mae-in1k"]
    cfg.update(device="cpu", name="spot-imagenet-rehearsal")
    cfg["data"].update(root=str(imagenet_tree(cwd / "imagenet")), max_per_class={"train": 3, "val": None},
                       images_per_shard=5)                                      # 10 val images: 2 shards, 2 parts
    for spec in cfg["backbones"].values():
        spec["arch"] = dict(spec.get("arch", {}), **SMALL)
    for name, path in standins(cfg, cwd).items():
        cfg["backbones"][name]["checkpoint"] = path
    cfg["saliency"]["size"] = 32
    cfg["eval"].update(budgets=[4, 16], batch_size=16, knn=dict(k=3, temperature=0.07))
    cfg["oracle"].update(budgets=[4, 16], steps=2, parts=2, batch_tokens=64)
    cfg["transfer"]["budgets"] = [4]
    p = cfg["placement"]
    p.update(budgets=[4], transfer=[4], batch_size=8)
    p["learned"].update(steps=2)
    p["placer"].update(steps=2, in_size=14, width=4)
    p["entropy"].update(steps=2)
    cfg["report"]["pictures"] = 4
    return cfg


def test_imagenet_config_rehearsal(tmp_path):
    """The DAG finishes; labels are timm's ImageNet-1k index and names everywhere (shards,
    predictions, picture titles); each backbone records its preprocessing (MAE's own, the
    others' timm configs) and decodes its own geometry; the report keeps the config's order."""
    cwd = copy_repo(tmp_path / "repo")
    cfg = rehearsal_config(cwd)
    (cwd / "config" / "rehearsal.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.time()
    r = snakemake(cwd, config="config/rehearsal.yaml", SPOT_DVC_COMMIT="0")
    print(f"rehearsal: {sum(job_counts(r.stdout + r.stderr).values())} jobs in {time.time() - start:.0f} s")
    assert job_counts(r.stdout + r.stderr) == expected_jobs(cfg)
    out = cwd / cfg["root"]
    wnids, names = ImageNetInfo().label_names(), ImageNetInfo().label_descriptions()
    for split in ("train", "val"):
        for shard in shard_paths(out / "shards", split):
            for rec in read_shard(shard):
                index = wnids.index(split_key(rec["__key__"])[1].split("/")[0])
                assert int(rec["cls"]) == index and json.loads(rec["json"])["class_name"] == names[index]
    for b in cfg["backbones"]:
        pred = pd.read_parquet(out / "eval" / b / "isotropic" / "16" / "predictions.parquet")
        assert set(pred.label) == set(INDICES) and len(pred) == 10
        assert pred.label_name.tolist() == [names[i] for i in pred.label]
        assert pred.pred_name.tolist() == [names[i] for i in pred.pred]
    recorded = {b: json.loads((out / "backbones" / b / "backbone.json").read_text()) for b in cfg["backbones"]}
    assert {k: recorded["mae-in1k"]["data_config"][k] for k in MAE} == MAE
    assert recorded["mae-in1k"]["data_config_from"]["params"] == MAE
    for b in ("cls-in21k", "cls-in1k"):
        pre = timm.models.get_pretrained_cfg(cfg["backbones"][b]["model"])
        dc = recorded[b]["data_config"]
        assert (dc["mean"], dc["std"], dc["crop_pct"], dc["interpolation"]) == \
            (list(pre.mean), list(pre.std), pre.crop_pct, pre.interpolation)
        assert recorded[b]["data_config_from"] == {"timm": cfg["backbones"][b]["model"], "params": {}}
    assert sorted(p.name for p in (out / "decoded").iterdir()) == ["64x64-bicubic-crop0.875-center",
                                                                  "64x64-bicubic-crop0.9-center"]
    for b in cfg["backbones"]:                          # the frontier: every method planned on every backbone
        matches = json.loads((out / "reduction" / b / "metrics.json").read_text())["matches"]
        assert {m["method"] for m in matches} == set(cfg["reduction"]["methods"])
    assert "## Accuracy at matched FLOPs" in (out / "report" / "tables.md").read_text()
    assert (out / "report" / "plots" / "frontier.png").is_file()
    tables = (out / "report" / "tables.md").read_text()
    assert [tables.index(f"## Backbone: {b}") for b in cfg["backbones"]] == sorted(
        tables.index(f"## Backbone: {b}") for b in cfg["backbones"])
