"""Evaluate, SPoT-ON, transfer, analysis and report stages on the smoke config, through `spot` in-process."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from spot.cli import main
from spot.data import decoded, loading
from spot.data.loading import decode_image
from spot.data.stream import make_loader
from spot.report.stats import percent_pm
from spot.stages import oracle as oracle_stage
from spot.workflow.stage_table import all_jobs
from tests.conftest import linked_root


def spot(params, *argv):
    assert main([*argv, "--params", str(params)]) == 0, argv


@pytest.fixture(scope="module")
def done(smoke_stages, tmp_path_factory):
    """Every job of the smoke config after the backbones, in-process, in the stage table's order,
    with every image decode (in this process or a forked one) written to a file."""
    params, cfg, root = smoke_stages
    decodes = tmp_path_factory.mktemp("decodes") / "keys.txt"

    def counted(record):
        with open(decodes, "a") as f:
            f.write(record["__key__"] + "\n")
        return decode_image(record)

    with pytest.MonkeyPatch.context() as mp:
        for module in (loading, decoded):
            mp.setattr(module, "decode_image", counted)
        for stage, w in all_jobs(cfg):
            if stage.name not in ("shard", "saliency", "backbone"):
                spot(params, stage.name, *[a for k, v in w.items() for a in (f"--{k}", str(v))])
    return params, cfg, root, decodes.read_text().split()


def metrics(path):
    return json.loads((path / "metrics.json").read_text())


def test_evaluate_metrics_match_predictions(done):
    _, cfg, root, _ = done
    run = root / "eval" / "spot-a" / "isotropic" / "4"
    pred, m = pd.read_parquet(run / "predictions.parquet"), metrics(run)
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert len(pred) == m["n_val"] == manifest["splits"]["val"]["count"]
    assert pred["correct"].mean() == pytest.approx(m["top1"])
    assert pred["knn_correct"].mean() == pytest.approx(m["knn"])
    pos = np.stack(pred["positions"].to_numpy()).reshape(len(pred), 4, 2)
    assert pos.min() >= 0 and pos.max() <= 1


def test_grid_prior_reads_patch_cells(done):
    _, _, root, _ = done
    pred = pd.read_parquet(root / "eval" / "grid-b" / "grid" / "4" / "predictions.parquet")
    cells = np.stack(pred["positions"].to_numpy()) * 7 - 0.5          # 28 px / patch 4: 7 x 7 cells
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-5)


def test_evaluate_is_deterministic(done, tmp_path):
    """One budget alone gives the numbers of the job that evaluated every budget in one pass."""
    params, cfg, root, _ = done
    assert len(cfg["eval"]["budgets"]) > 1
    again = linked_root(tmp_path, root, "shards", "saliency", "decoded", "backbones")
    spot(again, "evaluate", "--backbone", "spot-a", "--prior", "salient", "--budget", "4")
    run = tmp_path / "out" / "eval" / "spot-a" / "salient" / "4"
    assert metrics(run) == metrics(root / "eval" / "spot-a" / "salient" / "4")
    a = pd.read_parquet(run / "predictions.parquet")
    b = pd.read_parquet(root / "eval" / "spot-a" / "salient" / "4" / "predictions.parquet")
    assert a["key"].tolist() == b["key"].tolist() and a["pred"].tolist() == b["pred"].tolist()
    np.testing.assert_array_equal(np.stack(a["positions"]), np.stack(b["positions"]))
    assert not (tmp_path / "out" / "eval" / "spot-a" / "salient" / "16").exists()


def test_oracle_starts_from_the_evaluated_prior_and_does_not_lose(done):
    _, _, root, _ = done
    for b in ("spot-a", "grid-b"):
        ev = pd.read_parquet(root / "eval" / b / "isotropic" / "4" / "predictions.parquet").set_index("key")
        run = root / "oracle" / b / "4"
        res, m = pd.read_parquet(run / "results.parquet").set_index("key"), metrics(run)
        assert sorted(res.index) == sorted(ev.index)
        init = np.stack(res.loc[ev.index, "init"].to_numpy())
        np.testing.assert_allclose(init, np.stack(ev["positions"].to_numpy()), atol=1e-6)
        assert m["top1_init"] == pytest.approx(metrics(root / "eval" / b / "isotropic" / "4")["top1"])
        assert m["top1"] >= m["top1_init"]
        assert len(m["accuracy_per_step"]) == m["steps"] + 1
        assert len(list((root / "oracle-parts" / b / "4").glob("*/part.npz"))) == 2


def test_oracle_search_of_an_image_does_not_depend_on_its_batch(done, tmp_path, monkeypatch):
    """oracle.batch_tokens (here 5 images per batch at 4 tokens, not 256): the same part."""
    params, cfg, root, _ = done
    again = linked_root(tmp_path, root, "shards", "saliency", "decoded", "backbones",
                        oracle=dict(cfg["oracle"], batch_tokens=4 * 5 + 3))
    sizes, search = [], oracle_stage.oracle_search
    monkeypatch.setattr(oracle_stage, "oracle_search", lambda m, x, *a, **k: sizes.append(len(x)) or search(m, x, *a, **k))
    spot(again, "oracle", "--backbone", "spot-a", "--part", "0")
    assert max(sizes) == 5
    part = sorted((root / "oracle-parts" / "spot-a" / "4").glob("*/part.npz"))[0]
    a, b = np.load(tmp_path / "out" / part.relative_to(root)), np.load(part)
    assert (a["keys"] == b["keys"]).all() and len(a["keys"]) > 5
    np.testing.assert_array_equal(a["init"], b["init"])
    np.testing.assert_allclose(a["final"], b["final"], atol=1e-5)
    np.testing.assert_allclose(a["features"], b["features"], atol=1e-4)


def test_transfer_to_itself_reproduces_the_oracle(done):
    _, _, root, _ = done
    self_ = metrics(root / "transfer" / "spot-a" / "spot-a" / "4")
    assert self_["top1_transfer"] == pytest.approx(metrics(root / "oracle" / "spot-a" / "4")["top1"])
    cross = metrics(root / "transfer" / "spot-a" / "grid-b" / "4")
    assert cross["top1_prior"] == pytest.approx(metrics(root / "eval" / "grid-b" / "isotropic" / "4")["top1"])
    assert cross["gain"] == pytest.approx(cross["top1_transfer"] - cross["top1_prior"])


def test_report_tables_equal_the_per_run_results(done):
    _, _, root, _ = done
    rep = root / "report"
    for f in ("tables.md", "findings.md", "results.csv", "results.parquet", "metrics.json",
              "plots/accuracy_vs_budget.png", "plots/accuracy_vs_budget.csv", "pictures/priors.png",
              "pictures/trajectories.png", "run.json"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    res = pd.read_csv(rep / "results.csv")
    for run in (root / "eval").glob("*/*/*"):
        b, prior, budget = run.relative_to(root / "eval").parts
        row = res[(res.backbone == b) & (res.prior == prior) & (res.budget == int(budget)) & ~res.oracle]
        assert len(row) == 1 and row.top1.item() == pytest.approx(metrics(run)["top1"]), run
    oracle = res[res.oracle & (res.backbone == "spot-a")]
    assert oracle.top1.item() == pytest.approx(metrics(root / "oracle" / "spot-a" / "4")["top1"])
    table = (rep / "tables.md").read_text()
    grid = res[(res.backbone == "grid-b") & (res.prior == "grid") & (res.budget == 4) & ~res.oracle].iloc[0]
    assert percent_pm(metrics(root / "eval" / "grid-b" / "grid" / "4")["top1"], grid.top1_low, grid.top1_high) in table
    assert (rep / "pictures" / "priors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_and_pictures_name_the_classes_and_the_report_keeps_the_configs_order(done, tmp_path):
    """predictions.parquet names each label and prediction; the prior sheet titles its images with
    their class names; tables, findings, results and plot panels follow the config's backbone order
    (spot-a before grid-b, which the alphabet would swap), and the sheet shows the config's first."""
    from spot.data.sources import FASHION_MNIST_CLASSES
    from spot.report.sheets import prior_sheet
    from spot.utils.replicates import primaries
    from spot.workflow.layout import Layout
    from spot.workflow.stage_table import STAGE
    _, cfg, root, _ = done
    pred = pd.read_parquet(root / "eval" / "grid-b" / "grid" / "16" / "predictions.parquet")
    assert pred.label_name.tolist() == [FASHION_MNIST_CLASSES[i] for i in pred.label]
    assert pred.pred_name.tolist() == [FASHION_MNIST_CLASSES[i] for i in pred.pred]
    order = primaries(cfg)                                          # replicates (spot-a-s1) are not rows
    assert order == ["spot-a", "grid-b"]
    tables, found = ((root / "report" / f).read_text() for f in ("tables.md", "findings.md"))
    assert tables.index("## Backbone: spot-a") < tables.index("## Backbone: grid-b")
    assert found.index("- spot-a, 4 tokens: ") < found.index("- grid-b, 4 tokens: ")
    assert list(pd.read_csv(root / "report" / "results.csv").backbone.unique()) == list(cfg["backbones"])  # seeds follow
    inputs = STAGE["report"].job_inputs(cfg, Layout(root), {})
    assert inputs["backbone"].name == "spot-a"
    fig = prior_sheet(inputs, tmp_path / "priors.png", cfg["eval"]["priors"], 4, 4)
    first = pd.read_parquet(root / "eval" / "spot-a" / "grid" / "4" / "predictions.parquet").head(4)
    assert [ax.get_title() for ax in fig.axes[:4]] == first.label_name.tolist()


def test_a_rerun_removes_the_temporary_files_a_killed_job_left(done, tmp_path):
    """Files a killed decode or report job left half-written (`atomic_path`'s `.tmp-<name>.<random>`,
    in the folder or a subfolder) are gone after the job's next run."""
    import tempfile

    from spot.workflow.stage_table import geometries
    params, cfg, root, _ = done
    again = linked_root(tmp_path, root, *(p.name for p in root.iterdir() if p.name not in ("decoded", "report", "logs")))
    geometry = geometries(cfg)[0]["geometry"]
    left = []
    for folder, name in ((f"decoded/{geometry}", "val-images.npy"), ("report/plots", "accuracy_vs_budget.png"),
                         ("report", "tables.md")):
        (tmp_path / "out" / folder).mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f".tmp-{name}.", dir=tmp_path / "out" / folder)
        os.close(fd)
        left.append(path)
    shutil.copytree(root / "decoded", tmp_path / "out" / "decoded", dirs_exist_ok=True)
    (tmp_path / "out" / "decoded" / geometry / "run.json").unlink()
    spot(again, "decode", "--geometry", geometry)
    spot(again, "report")
    assert not [p for p in (tmp_path / "out").rglob(".tmp-*")], left


def test_an_oracle_part_without_shards_is_one_line(done, tmp_path, capsys):
    """With more SPoT-ON parts than val shards (preflight says so first), the part that gets none
    stops in one line naming the parameter."""
    params, cfg, root, _ = done
    again = linked_root(tmp_path, root, "shards", "saliency", "decoded", "backbones",
                        oracle=dict(cfg["oracle"], parts=3))
    capsys.readouterr()
    assert main(["oracle", "--backbone", "spot-a", "--part", "2", "--params", str(again)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spot ")]
    assert err == ["spot oracle: error: part 2 of oracle.parts 3 gets none of the 2 val shards: set oracle.parts to "
                   "at most 2 (or write more, smaller shards: data.images_per_shard)"]


def test_analysis_measures_saliency_under_tokens(done):
    _, _, root, _ = done
    run = root / "analysis" / "spot-a" / "4"
    sal = json.loads((run / "saliency.json").read_text())
    assert 0 <= sal["saliency_init"] <= 1 and 0 <= sal["saliency_final"] <= 1
    assert sal["saliency_delta"] == pytest.approx(sal["saliency_final"] - sal["saliency_init"])
    assert (run / "trajectories.png").is_file()


def test_every_job_logged_once_to_mlflow(done):
    """One run per job, spanning the job (run.json's start and end), top-level when run by hand;
    a training run's curves (more than one step), weights and dataset; the oracle's accuracy per
    step; stage-prefixed metric names; a rerun replaces its run."""
    params, cfg, root, _ = done
    from mlflow.tracking import MlflowClient

    from spot.workflow.tracking import metric_name, ms
    c = MlflowClient(cfg["mlflow"]["tracking_uri"])
    exp = c.get_experiment_by_name(cfg["name"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"    # kind: machine learning
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    records = {r["job"]: r for r in (json.loads(p.read_text()) for p in root.rglob("run.json"))}
    assert sorted(r.data.tags["spot.job"] for r in runs) == sorted(records)
    for r in runs:
        rec = records[r.data.tags["spot.job"]]
        assert r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags
        assert r.info.start_time == ms(rec["started"])           # and it ends when its logging is done
        assert ms(rec["ended"]) <= r.info.end_time <= ms(rec["ended"]) + 10_000, rec["job"]
        for k, v in rec["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and metric_name(rec["stage"], k):
                assert r.data.metrics[metric_name(rec["stage"], k)] == pytest.approx(v), (rec["job"], k)
    ev = next(r for r in runs if r.data.tags["spot.job"] == "evaluate/spot-a/isotropic/4")
    assert ev.data.metrics["evaluate/top1"] == pytest.approx(metrics(root / "eval" / "spot-a" / "isotropic" / "4")["top1"])
    assert "top1" not in ev.data.metrics
    assert ev.data.params["prior"] == "isotropic" and ev.data.params["budget"] == "4"
    assert "predictions.parquet" in [a.path for a in c.list_artifacts(ev.info.run_id)]
    train = next(r for r in runs if r.data.tags["spot.job"] == "backbone/spot-a")
    steps = {k: [m.step for m in c.get_metric_history(train.info.run_id, k)] for k in ("train/loss", "train/lr")}
    assert steps["train/loss"] == steps["train/lr"] == list(range(1, 1 + len(steps["train/loss"])))
    assert len(steps["train/loss"]) > 1
    assert [m.step for m in c.get_metric_history(train.info.run_id, "val/top1")] == [steps["train/loss"][-1]]
    assert {"series.csv", "metrics.csv"} <= {a.path for a in c.list_artifacts(train.info.run_id)}
    assert len(train.outputs.model_outputs) == 1                    # its weights: the run's MLflow model
    assert [d.dataset.name for d in train.inputs.dataset_inputs] == ["shards", "decoded"]
    version = records["backbone/spot-a"]["code_version"].removesuffix("-dirty")
    if version.isalnum():                                                    # a git checkout
        assert train.data.tags["mlflow.source.git.commit"].startswith(version)
    oracle = next(r for r in runs if r.data.tags["spot.job"] == "oracle-gather/spot-a/4")
    curve = metrics(root / "oracle" / "spot-a" / "4")["accuracy_per_step"]
    got = sorted((m.step, m.value) for m in c.get_metric_history(oracle.info.run_id, "oracle/accuracy"))
    assert len(got) == len(curve) > 1 and got == [(i, pytest.approx(a)) for i, a in enumerate(curve)]
    spot(params, "evaluate", "--backbone", "spot-a", "--prior", "isotropic", "--budget", "4")   # rerun
    again = c.search_runs([exp.experiment_id], max_results=1000)
    assert len(again) == len(runs) and ev.info.run_id not in {r.info.run_id for r in again}


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--backbone", "spot-a", "--prior", "diagonal", "--budget", "4"], "--prior 'diagonal'"),
    (["evaluate", "--backbone", "spot-a", "--prior", "grid", "--budget", "50"], "--budget 50"),
    (["evaluate", "--backbone", "nope", "--prior", "grid", "--budget", "4"], "--backbone 'nope'"),
    (["backbone", "--backbone", "nope"], "nope"),
    (["transfer", "--src", "grid-b", "--dst", "spot-a", "--budget", "16"], "--budget 16"),
    (["oracle", "--backbone", "spot-a", "--budget", "4", "--part", "2"], "--part 2"),
])
def test_bad_requests_fail_with_one_line_naming_it(done, capsys, argv, message):
    params, _, root, _ = done
    before = sorted(p for p in root.rglob("*") if p.is_file())
    assert main([*argv, "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert sorted(p for p in root.rglob("*") if p.is_file()) == before


def test_each_image_is_decoded_once_for_its_geometry(done):
    """After sharding, the decode stage decodes each image once (the smoke backbones share one
    geometry); evaluate, oracle, transfer, analyze and report decode nothing."""
    _, cfg, root, keys = done
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert len(keys) == sum(s["count"] for s in manifest["splits"].values()) == len(set(keys))


def test_decoded_batches_equal_the_shard_loaders(done):
    """The decoded arrays give the tensors of decoding the shards on the fly (same bytes, same order)."""
    _, _, root, _ = done
    from spot.data.decoded import Decoded
    from spot.data.geometry import geometry_name
    from spot.training.backbones import read_meta
    dc = read_meta(root / "backbones" / "spot-a")["data_config"]
    data = Decoded(root / "decoded" / geometry_name(dc), dc)
    slow = list(make_loader(root / "shards", "val", dc, 16, saliency_dir=root / "saliency"))
    for a, b in zip(data.batches("val", 16, saliency=True), slow, strict=True):
        assert a.keys == b.keys and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images) and torch.equal(a.saliency, b.saliency)
    order = np.random.default_rng(0).permutation(sum(len(b.keys) for b in slow))   # rows in a given order
    x, y, keys = (torch.cat([b.images for b in slow]), torch.cat([b.labels for b in slow]),
                  [k for b in slow for k in b.keys])
    got = list(data.batches("val", 7, order=order))
    assert [k for b in got for k in b.keys] == [keys[i] for i in order]
    assert torch.equal(torch.cat([b.images for b in got]), x[order])
    assert torch.equal(torch.cat([b.labels for b in got]), y[order])


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "is not a readable array"),          # truncated
    (lambda p: p.write_bytes(b"not an array"), "is not a readable array"),                   # not .npy
    (lambda p: np.save(p, np.zeros((3, 3, 28, 28), np.uint8)), "holds 3 rows"),             # another array
])
def test_a_damaged_decoded_array_stops_the_job_in_one_line(done, tmp_path, capsys, damage, message):
    """A decoded array that is not as the decode stage wrote it stops a job before any work, in one
    line naming the file; the job's folders are left without run.json (not done)."""
    params, cfg, root, _ = done
    again = linked_root(tmp_path, root, "shards", "saliency", "backbones")
    shutil.copytree(root / "decoded", tmp_path / "out" / "decoded")
    array = next((tmp_path / "out" / "decoded").glob("*/val-images.npy"))
    damage(array)
    capsys.readouterr()
    assert main(["evaluate", "--backbone", "spot-a", "--prior", "grid", "--params", str(again)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("20")]   # not MLflow's
    assert len(err) == 1 and err[0].startswith("spot evaluate: error: ") and message in err[0] and str(array) in err[0], err
    assert not list((tmp_path / "out" / "eval").rglob("run.json"))


def test_a_decoded_folder_of_an_older_spot_asks_for_a_rerun_in_one_line(done, tmp_path, capsys):
    """decoded.json without class_names (written before labels had names): one line, not a KeyError."""
    params, cfg, root, _ = done
    again = linked_root(tmp_path, root, "shards", "saliency", "backbones")
    shutil.copytree(root / "decoded", tmp_path / "out" / "decoded")
    index = next((tmp_path / "out" / "decoded").glob("*/decoded.json"))
    index.write_text(json.dumps({k: v for k, v in json.loads(index.read_text()).items() if k != "class_names"}))
    capsys.readouterr()
    assert main(["evaluate", "--backbone", "spot-a", "--prior", "grid", "--params", str(again)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spot ")]
    assert err == [f"spot evaluate: error: {index} names no classes (an older spot wrote it): run the shard and "
                   "decode stages again"]


def test_compiled_forward_gives_the_same_results(done, tmp_path):
    """eval.compile and oracle.compile run the model's forward through torch.compile (the 'eager'
    backend here: the graph capture without a C++ build); the numbers do not change."""
    params, cfg, root, _ = done
    again = linked_root(tmp_path, root, "shards", "saliency", "decoded", "backbones",
                        eval=dict(cfg["eval"], compile="eager"), oracle=dict(cfg["oracle"], compile="eager"))
    spot(again, "evaluate", "--backbone", "spot-a", "--prior", "uniform", "--budget", "16")
    assert metrics(tmp_path / "out" / "eval" / "spot-a" / "uniform" / "16") == \
        metrics(root / "eval" / "spot-a" / "uniform" / "16")
    spot(again, "oracle", "--backbone", "spot-a", "--budget", "4", "--part", "0")
    a, b = (np.load(r / "oracle-parts" / "spot-a" / "4" / "0" / "part.npz") for r in (tmp_path / "out", root))
    np.testing.assert_allclose(a["final"], b["final"], atol=1e-6)
    np.testing.assert_array_equal(a["correct"], b["correct"])
