"""Label-free placement stages (learned, placer, entropy) and their report rows, through `spot`
in-process, on a tiny backbone trained inside the test on 2,500 Fashion-MNIST images."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from spot.cli import main
from spot.data.decoded import Decoded
from spot.training.backbones import load_backbone
from spot.training.placer_files import load_placer
from spot.workflow.config import load_config
from spot.workflow.stage_table import all_jobs
from tests.conftest import REPO, smoke_config

N = 4
PLACEMENT = dict(methods=["learned", "placer", "entropy"], budgets=[N], transfer=[N], batch_size=100,
                 learned=dict(steps=60, lr=0.05, init="isotropic"),
                 placer=dict(steps=40, lr=3e-3, in_size=14, width=4, init="learned"),
                 entropy=dict(steps=3, lr=0.03))


def spot(params, *argv):
    assert main([*argv, "--params", str(params)]) == 0, argv


def metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def positions(folder) -> np.ndarray:
    """(n, N, 2) val positions of an evaluation-like folder, in key order."""
    pred = pd.read_parquet(folder / "predictions.parquet").sort_values("key")
    return np.stack(pred["positions"].to_numpy()).reshape(len(pred), -1, 2)


def positions_by_key(folder, keys) -> np.ndarray:
    """(len(keys), N, 2) val positions of an evaluation-like folder for `keys`."""
    pred = pd.read_parquet(folder / "predictions.parquet").set_index("key").positions.loc[keys]
    return np.stack(pred.to_numpy()).reshape(len(keys), -1, 2).astype(np.float32)


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    """Every job of a one-backbone config (2,500 train / 400 val images; the backbone trained for 3
    epochs on 4..8 sobol/uniform tokens) in the stage table's order: (params, cfg, root)."""
    tmp = tmp_path_factory.mktemp("placement")
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    params = smoke_config(
        tmp, data=dict(smoke["data"], max_per_class={"train": 250, "val": 40}, images_per_shard=1000),
        backbones={"tiny": dict({k: v for k, v in smoke["backbones"]["spot-a"].items() if k != "seeds"}, seed=0)},
        train=dict(smoke["train"], epochs=3, lr=3e-3, batch_size=100, token_range=[4, 8], priors=["uniform", "sobol"]),
        saliency=dict(smoke["saliency"], model="tiny"),
        eval=dict(smoke["eval"], priors=["isotropic", "uniform", "salient", "model_salient"], budgets=[N]),
        oracle=dict(smoke["oracle"], budgets=[N], parts=1), transfer={"budgets": [N]}, placement=PLACEMENT)
    cfg = load_config(params)
    for stage, w in all_jobs(cfg):
        spot(params, stage.name, *[a for k, v in w.items() for a in (f"--{k}", str(v))])
    return params, cfg, tmp / "out"


def test_learned_prior_beats_its_initial_positions_on_held_out_images(placed):
    _, cfg, root = placed
    learned, start = root / "learned" / "tiny" / str(N), root / "eval" / "tiny" / "isotropic" / str(N)
    fit = json.loads((learned / "positions.json").read_text())
    pos = np.asarray(fit["positions"])
    assert pos.shape == (N, 2) and (pos >= 0).all() and (pos <= 1).all()
    assert len(fit["loss"]) == PLACEMENT["learned"]["steps"]
    assert np.mean(fit["loss"][-10:]) < np.mean(fit["loss"][:10])
    assert (positions(learned) == pos.astype(np.float32)).all()          # the same positions for every image
    m, m0 = metrics(learned), metrics(start)
    assert m["n_val"] == m0["n_val"] == 400 and m["extra_flops"] == 0
    print(f"\nheld-out top-1 at {N} tokens: isotropic start {m0['top1']:.3f}, learned {m['top1']:.3f}")
    assert m["top1"] > m0["top1"] + 0.03
    pred = pd.read_parquet(learned / "predictions.parquet")
    assert pred["correct"].mean() == pytest.approx(m["top1"]) and pred["knn_correct"].mean() == pytest.approx(m["knn"])


def test_placer_places_n_tokens_inside_the_image_deterministically_and_differentiably(placed, tmp_path):
    params, cfg, root = placed
    folder = root / "placer" / "tiny" / str(N)
    pos = positions(folder)
    assert pos.shape == (400, N, 2) and (pos > 0).all() and (pos < 1).all()
    assert np.unique(pos.round(4), axis=0).shape[0] > 1                  # image-dependent placements
    m = metrics(folder)
    assert m["extra_flops"] == pytest.approx(m["placer_flops"] / m["backbone_flops"]) and m["extra_flops"] > 0
    # deterministic: the same job in another output root gives the same weights and placements
    again = tmp_path / "again"
    for f in ("shards", "saliency", "decoded", "backbones", "learned"):
        (again / "out" / f).parent.mkdir(parents=True, exist_ok=True)
        (again / "out" / f).symlink_to(root / f)
    cfg2 = yaml.safe_load(params.read_text()) | dict(root=str(again / "out"),
                                                     mlflow={"tracking_uri": f"sqlite:///{again / 'mlflow.db'}"})
    (again / "params.yaml").write_text(yaml.safe_dump(cfg2))
    spot(again / "params.yaml", "placer", "--backbone", "tiny", "--budget", str(N))
    other = again / "out" / "placer" / "tiny" / str(N)
    assert (other / "placer.safetensors").read_bytes() == (folder / "placer.safetensors").read_bytes()
    np.testing.assert_array_equal(positions(other), pos)
    # differentiable end to end: the classification loss of the backbone reaches every placer weight
    placer, model = load_placer(folder), load_backbone(root / "backbones" / "tiny")
    b = next(Decoded(next((root / "decoded").iterdir()), model.data_config).batches("val", 32))
    stored = pd.read_parquet(folder / "predictions.parquet").set_index("key").positions.loc[b.keys]
    torch.testing.assert_close(placer(b.images), torch.from_numpy(np.stack(stored.to_numpy())).view(32, N, 2))
    model.requires_grad_(False)
    F.cross_entropy(model(b.images, placer(b.images)), b.labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in placer.parameters())


def test_placer_transfer_to_its_own_backbone_reproduces_the_placer(placed, tmp_path):
    from spot.workflow.layout import Layout
    from spot.workflow.stage_table import STAGE
    _, cfg, root = placed
    stage, w = STAGE["placer-transfer"], dict(src="tiny", dst="tiny", budget=N)
    record = stage.entry_point()(stage.arguments(cfg, w), stage.input_folders(cfg, Layout(root), w),
                              tmp_path, **w)
    own = root / "placer" / "tiny" / str(N)
    assert record.metrics["top1"] == metrics(own)["top1"] and record.metrics["gain"] == 0
    np.testing.assert_array_equal(positions(tmp_path), positions(own))


def test_entropy_search_gives_the_same_positions_under_shuffled_labels(placed, tmp_path):
    """The stage reads batches that carry labels; with every label shuffled the positions it finds
    are identical (the scores, which use labels, change)."""
    params, cfg, root = placed
    again = tmp_path / "out"
    for f in ("shards", "saliency", "backbones"):
        again.mkdir(exist_ok=True)
        (again / f).symlink_to(root / f)
    shutil.copytree(root / "decoded", again / "decoded")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        path = next((again / "decoded").iterdir()) / f"{split}-labels.npy"
        labels = np.load(path)
        shuffled = rng.permutation(labels)
        assert (shuffled != labels).mean() > 0.5
        np.save(path, shuffled)
    cfg2 = yaml.safe_load(params.read_text()) | dict(root=str(again), mlflow={"tracking_uri": f"sqlite:///{tmp_path}/m.db"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg2))
    spot(tmp_path / "params.yaml", "entropy", "--backbone", "tiny", "--budget", str(N))
    a, b = root / "entropy" / "tiny" / str(N), again / "entropy" / "tiny" / str(N)
    np.testing.assert_array_equal(positions(a), positions(b))
    ta, tb = np.load(a / "trajectories.npz"), np.load(b / "trajectories.npz")
    np.testing.assert_array_equal(ta["trajectory"], tb["trajectory"])
    assert metrics(a)["top1"] != metrics(b)["top1"]
    # the search moved the tokens away from the oracle's start prior and lowered the entropy
    start = positions(root / "eval" / "tiny" / cfg["oracle"]["prior"] / str(N))
    assert ta["trajectory"].shape == (400, PLACEMENT["entropy"]["steps"] + 1, N, 2)
    assert np.abs(positions(a) - start).max() > 1e-3
    m = metrics(a)
    assert m["entropy_per_step"][-1] < m["entropy_per_step"][0] and m["extra_flops"] > PLACEMENT["entropy"]["steps"]


def test_report_has_label_free_rows_gap_closed_and_pictures(placed):
    _, cfg, root = placed
    rep = root / "report"
    results = pd.read_csv(rep / "results.csv")
    for method in PLACEMENT["methods"]:
        row = results[(results.prior == method) & (results.budget == N)]
        assert len(row) == 1 and row.top1.iloc[0] == pytest.approx(metrics(root / method / "tiny" / str(N))["top1"])
        rows = json.loads((rep / "metrics" / "tiny" / f"{method}.json").read_text())
        assert rows[str(N)] == {"top1": round(100 * row.top1.iloc[0], 1), "knn": round(100 * row.knn.iloc[0], 1)}  # DVC
        half = (row.top1_high - row.top1_low).iloc[0] / 2         # the interval of 400 images, about binomial
        p = row.top1.iloc[0]
        assert half == pytest.approx(1.96 * np.sqrt(p * (1 - p) / 400), abs=0.006)
    tables, found = (rep / "tables.md").read_text(), (rep / "findings.md").read_text()
    assert all(f"| SPoT-{m} |" in tables for m in PLACEMENT["methods"])
    assert "## 5. How much of the oracle gap can be closed without labels?" in found
    for method in PLACEMENT["methods"]:                          # every fixed prior tested, no selection step
        assert re.search(rf"SPoT-{method} tiny N={N} vs the best fixed prior: {method} vs \w+ [+-][\d.]+ \[[+-][\d.]+, "
                         rf"[+-][\d.]+\] points( \([\d.]+ % interval\))?: (holds|reversed|not distinguishable) "
                         rf"(at n = \d+|over \d+ runs x n = \d+)", found), method
    assert (rep / "pictures" / "learned.png").is_file()
    assert "SPoT-placer" in found and (rep / "pictures" / "priors.png").is_file()


def test_model_saliency_maps_feed_the_model_salient_prior_and_case_study_3(placed):
    """Maps from the backbone's input gradients: one per bank and val image, in [0, 1], unlike the
    spectral residual maps; the model_salient prior puts its tokens where they are high; the analysis
    and the findings report both maps."""
    from spot.data.saliency import SaliencyMaps
    from spot.stages.analyze import saliency_at
    _, cfg, root = placed
    folder = root / "model-saliency" / "tiny"
    maps = np.load(folder / "val-saliency.npy")
    keys = [str(k) for k in np.load(folder / "val-keys.npy")]
    assert maps.shape == (400, cfg["saliency"]["size"], cfg["saliency"]["size"]) and maps.dtype == np.uint8
    assert len(np.load(folder / "train-keys.npy")) == 2500 and maps.max() == 255
    dec = next((root / "decoded").iterdir())
    rows = {str(k): i for i, k in enumerate(np.load(dec / "val-keys.npy"))}
    spectral = torch.from_numpy(np.load(dec / "val-saliency.npy")[[rows[k] for k in keys]]).float() / 255
    val = SaliencyMaps(folder)("val", keys)
    assert (F.interpolate(val[:, None], size=spectral.shape[-2:], mode="area")[:, 0] - spectral).abs().mean() > 0.05
    under = {p: saliency_at(val, torch.from_numpy(positions_by_key(root / "eval" / "tiny" / p / str(N), keys)))
             .mean().item() for p in ("model_salient", "uniform")}
    assert under["model_salient"] > under["uniform"] + 0.05, under
    sal = json.loads((root / "analysis" / "tiny" / str(N) / "saliency.json").read_text())
    assert 0 <= sal["model_saliency_init"] <= 1 and 0 <= sal["model_saliency_final"] <= 1
    found = (root / "report" / "findings.md").read_text()
    assert "input-gradient maps (model_salient)" in found
    assert f"tokens, tiny N={N}, the model's input-gradient maps:" in found


@pytest.mark.parametrize("change, message", [
    (dict(budgets=[5]), "placement.budgets: [5] not in eval.budgets"),
    (dict(methods=["placer"]), "placement.placer.init: 'learned' needs 'learned'"),
    (dict(methods=["teleport"]), "placement.methods.0"),
    (dict(transfer=[16]), "placement.transfer: [16] not in placement.budgets"),
])
def test_bad_placement_config_fails_with_one_line(tmp_path, change, message):
    params = smoke_config(tmp_path, placement=dict(PLACEMENT, **change))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(params)
