"""MLflow logging against a real SQLite store: live job runs with step series, idempotent per job,
never fatal, synced later with the same series and times; parent runs; the report's table."""
import contextlib
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from spot.utils import live
from spot.utils.io import write_json
from spot.workflow import tracking
from spot.workflow.outputs import lineage, read_series, write_run_record
from spot.workflow.tracking import PARAMS_TAG, JobRun, log_record, metric_name, ms, run_name, sync


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module (creating one costs seconds of migrations); tests use their own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'm.db'}"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No parent run, no store chosen or found failing by an earlier test, artifacts (MLflow's default root
    is ./mlruns) under the test's folder, and no retries of a closed port (2 s each)."""
    tracking.DOWN.clear()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def record(d, job="evaluate/b/uniform/4", top1=0.5, stage="evaluate", metrics=None, **fields):
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "metrics.json", {"top1": top1})
    write_run_record(d, stage=stage, job=job, params=dict(backbone="b", prior="uniform", budget=4),
                     metrics=metrics or dict(top1=top1), artifacts=["metrics.json"], **fields)
    return d


def runs(uri, name):
    c = MlflowClient(uri)
    return c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=100)


def history(uri, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def same_series(got, expected) -> bool:
    """(step, value) series equal: the same steps, values within float rounding (pytest 9's `approx`
    compares flat sequences only)."""
    return [s for s, _ in got] == [s for s, _ in expected] and [v for _, v in got] == pytest.approx(
        [v for _, v in expected])


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def job(out, uri, name, stage="backbone", job_id="backbone/b", steps=range(1, 4), inputs=None, fail=False,
        resume=None, pause=0.0, params=None):
    """A job as `spot.workflow.runner.run_job` runs it, whose stage logs a loss per step; returns (its
    run id, its record)."""
    params = params or {"backbone": "b"}
    with JobRun(out, experiment=name, uri=uri, stage=stage, job=job_id, params=params, inputs=inputs) as run:
        if resume is not None:
            live.start_series(resume)
        for s in steps:
            live.log_metrics({"train/loss": 1.0 / s, "train/lr": 0.1}, step=s)
        time.sleep(pause)
        if fail:
            raise fail if isinstance(fail, Exception) else RuntimeError("stage failed")
        rec = write_run_record(out, stage=stage, job=job_id, params=params, metrics={"val_top1": 0.25},
                               artifacts=[], inputs=inputs, **run.record_fields())
        run_id = run.finish()
    return run_id, rec


def test_log_is_idempotent_and_a_changed_record_replaces_the_run(tmp_path, uri):
    d = record(tmp_path / "r")
    first = log_record(d, "idem", uri)
    assert log_record(d, "idem", uri) == first
    (r,) = runs(uri, "idem")
    assert r.data.metrics["evaluate/top1"] == 0.5 and r.data.params["prior"] == "uniform"
    assert r.data.tags["spot.job"] == "evaluate/b/uniform/4" and "code_version" in r.data.params
    assert sorted(a.path for a in MlflowClient(uri).list_artifacts(first)) == ["metrics.json", "run.json"]
    record(d, top1=0.75)
    second = log_record(d, "idem", uri)
    (r,) = runs(uri, "idem")
    assert second != first and r.info.run_id == second and r.data.metrics["evaluate/top1"] == 0.75


def test_live_run_spans_the_job_and_shows_its_series_while_it_runs(tmp_path, uri):
    """The run starts with the job, holds the steps logged so far while the job runs, and ends with
    it: start and end are run.json's; tags, params and the input dataset are there from the start."""
    shards = tmp_path / "shards"
    write_json(shards / "manifest.json", {"splits": {"train": {"count": 8, "shards": [{"sha256": "ab" * 32}]},
                                                     "val": {"count": 2, "shards": [{"sha256": "cd" * 32}]}}})
    out, seen = tmp_path / "out", {}
    with JobRun(out, experiment="live", uri=uri, stage="backbone", job="backbone/b", params={"seed": 0},
                         inputs={"shards": shards}) as run:
        for s in (1, 2, 3):
            live.log_metrics({"train/loss": 1.0 / s}, step=s)
        run.flush()                                                # MLflow's async queue, drained
        (r,) = runs(uri, "live")                                   # while the job runs
        seen = dict(status=r.info.status, loss=history(uri, r.info.run_id, "train/loss"), params=r.data.params)
        time.sleep(1.0)
        live.log_metrics({"train_loss": 0.4, "val_top1": 0.5, "step": 3, "epoch": 0}, step=3)
        rec = write_run_record(out, stage="backbone", job="backbone/b", params={"seed": 0},
                               metrics={"train_loss": 0.4, "val_top1": 0.5, "step": 3}, artifacts=[],
                               inputs={"shards": shards}, **run.record_fields())
        assert run.finish() == r.info.run_id
    assert seen == dict(status="RUNNING", loss=[(1, 1.0), (2, 0.5), (3, 1 / 3)], params={"seed": "0", **{
        "code_version": rec["code_version"]}})
    (r,) = runs(uri, "live")
    assert r.info.status == "FINISHED" and rec["series"] == "series.csv" and r.info.run_name == "b backbone"
    assert r.info.start_time == ms(rec["started"])                   # ends when its logging is done
    assert ms(rec["ended"]) <= r.info.end_time < ms(rec["ended"]) + 3000
    assert 1000 <= r.info.end_time - r.info.start_time < 4000
    assert r.data.metrics["val/top1"] == 0.5 and r.data.metrics["train/epoch_loss"] == 0.4
    assert "step" not in r.data.metrics and "train/steps" not in r.data.metrics
    assert len(history(uri, r.info.run_id, "val/top1")) == 1                  # the record adds no second point
    tags = r.data.tags
    assert tags["spot.stage"] == "backbone" and tags["mlflow.source.name"] == "spot/stages/backbone.py"
    assert "mlflow.user" in tags and tags["spot.code_version"] == rec["code_version"]
    if rec["code_version"][:7].isalnum():                       # a git checkout: the full commit
        assert len(tags["mlflow.source.git.commit"]) == 40
        assert tags["mlflow.source.git.commit"].startswith(rec["code_version"].removesuffix("-dirty"))
    (ds,) = r.inputs.dataset_inputs
    assert ds.dataset.name == "shards" and len(ds.dataset.digest) == 16
    assert json.loads(ds.dataset.profile) == {"train": 8, "val": 2}
    assert [(t.key, t.value) for t in ds.tags] == [("mlflow.data.context", "train")]
    assert {a.path for a in MlflowClient(uri).list_artifacts(r.info.run_id)} == {"run.json", "series.csv"}
    exp = MlflowClient(uri).get_experiment_by_name("live")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"    # kind: machine learning


def test_list_metrics_are_step_series_and_names_say_their_stage(tmp_path, uri):
    d = record(tmp_path / "o", job="oracle-gather/b/4", stage="oracle-gather",
               metrics=dict(top1=0.7, top1_init=0.5, accuracy_per_step=[0.5, 0.6, 0.7], steps=2))
    rid = log_record(d, "lists", uri)
    assert history(uri, rid, "oracle/accuracy") == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert MlflowClient(uri).get_run(rid).data.metrics == {"oracle/top1": 0.7, "oracle/top1_init": 0.5,
                                                           "oracle/accuracy": 0.7, "oracle/steps": 2}
    assert metric_name("transfer", "top1_transfer") == "transfer/top1_transfer"
    assert metric_name("evaluate", "top1") == "evaluate/top1"
    assert metric_name("backbone", "train_loss") == "train/epoch_loss"


def test_run_names_put_what_tells_runs_apart_first():
    """MLflow's runs table cuts long names: the backbone, prior and budget come before the stage."""
    assert run_name("evaluate", "evaluate/spot-s1/uniform/16") == "spot-s1 uniform N=16 evaluate"
    assert run_name("oracle", "oracle/spot-s1/4/0") == "spot-s1 N=4 part 0 oracle"
    assert run_name("report", "report") == "report"


def test_failed_job_ends_its_run_failed_and_the_rerun_replaces_it(tmp_path, uri):
    with pytest.raises(RuntimeError, match="stage failed"):
        job(tmp_path / "b", uri, "fail", fail=True)
    (r,) = runs(uri, "fail")
    assert r.info.status == "FAILED" and "stage failed" in r.data.tags["spot.error"]
    run_id, _ = job(tmp_path / "b", uri, "fail")
    (r,) = runs(uri, "fail")
    assert r.info.run_id == run_id and r.info.status == "FINISHED"


def test_a_rerun_with_other_params_keeps_the_old_run_visible_and_superseded(tmp_path, uri):
    first, _ = job(tmp_path / "b", uri, "history", params={"backbone": "b", "train.lr": 0.1})
    again, _ = job(tmp_path / "b", uri, "history", params={"backbone": "b", "train.lr": 0.1})
    assert [r.info.run_id for r in runs(uri, "history")] == [again]          # the same params: replaced
    other, _ = job(tmp_path / "b", uri, "history", params={"backbone": "b", "train.lr": 0.01})
    by_id = {r.info.run_id: r for r in runs(uri, "history")}
    assert set(by_id) == {again, other}
    assert by_id[again].data.tags["spot.superseded_by"] == other and "spot.superseded_by" not in by_id[other].data.tags
    assert by_id[again].data.params["train.lr"] == "0.1" and by_id[other].data.params["train.lr"] == "0.01"


def test_a_finished_rerun_with_other_params_ends_a_killed_attempt(tmp_path, uri):
    """A job killed before its record leaves its run RUNNING; the job's rerun with other params keeps it,
    superseded, and ends it KILLED."""
    attempt = {"spot.job": "backbone/b", PARAMS_TAG: lineage({"backbone": "b", "train.lr": 0.1}, None)}
    c = MlflowClient(uri)
    killed = c.create_run(tracking.connect(uri, "killed"), tags=attempt).info.run_id
    run_id, _ = job(tmp_path / "b", uri, "killed", params={"backbone": "b", "train.lr": 0.01})
    r = c.get_run(killed)
    assert r.info.status == "KILLED" and r.data.tags["spot.superseded_by"] == run_id


def test_a_failed_rerun_keeps_the_last_good_run_and_its_error_names_the_file(tmp_path, uri):
    from spot.utils.io import read_json
    good, _ = job(tmp_path / "b", uri, "keep")
    bad = tmp_path / "upstream" / "run.json"
    bad.parent.mkdir()
    bad.write_text('{"job": "x\ty"}')
    with pytest.raises(ValueError) as e:
        job(tmp_path / "b", uri, "keep", fail=_error(read_json, bad))
    by_status = {r.info.status: r for r in runs(uri, "keep")}
    assert set(by_status) == {"FINISHED", "FAILED"} and by_status["FINISHED"].info.run_id == good
    assert str(bad) in by_status["FAILED"].data.tags["spot.error"] and str(bad) in str(e.value)
    assert "spot.superseded_by" not in by_status["FINISHED"].data.tags


def _error(fn, *args) -> Exception:
    """The exception fn(*args) raises."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError(f"{fn.__name__} raised nothing")


def test_resumed_job_keeps_its_series_up_to_the_checkpoint(tmp_path, uri):
    """A killed training resumed from step 3: steps 1-3 of the first attempt, 4-6 of the second, once each."""
    with pytest.raises(RuntimeError):
        job(tmp_path / "b", uri, "resume", steps=range(1, 6), fail=True)
    run_id, _ = job(tmp_path / "b", uri, "resume", steps=range(4, 7), resume=3)
    expected = [(s, 1.0 / s) for s in range(1, 7)]
    assert same_series(history(uri, run_id, "train/loss"), expected)
    rows = read_series(tmp_path / "b" / "series.csv")
    assert same_series(sorted((s, v) for k, s, v, _ in rows if k == "train/loss"), expected)
    job(tmp_path / "b", uri, "resume", steps=range(1, 3))                     # a fresh start drops them all
    assert [s for k, s, *_ in read_series(tmp_path / "b" / "series.csv") if k == "train/loss"] == [1, 2]


def test_unreachable_server_one_warning_then_sync_replays_series_and_times(tmp_path, uri, capsys):
    down = closed_port()
    _, rec = job(tmp_path / "out" / "b", down, "sync", pause=0.5)
    err = capsys.readouterr().err
    assert err.count("spot: warning:") == 1 and "mlflow-sync" in err, err
    for i in range(2):
        record(tmp_path / "out" / f"r{i}", job=f"evaluate/b/uniform/{i}")
    ids = sync(tmp_path / "out", "sync", uri)
    assert len(set(ids)) == 3 and len(runs(uri, "sync")) == 3
    r = next(r for r in runs(uri, "sync") if r.data.tags["spot.job"] == "backbone/b")
    assert same_series(history(uri, r.info.run_id, "train/loss"), [(1, 1.0), (2, 0.5), (3, 1 / 3)])
    assert r.info.start_time == ms(rec["started"]) and r.info.end_time == ms(rec["ended"])
    assert r.info.end_time - r.info.start_time >= 500
    assert sync(tmp_path / "out", "sync", uri) == ids       # a second sync adds nothing


def test_runs_of_one_job_warn_once_when_the_server_is_down(tmp_path, capsys):
    """A job writing several folders (evaluate: one per budget) has one run each: with the server
    down the job warns once, and no run logs anything (their records stay for mlflow-sync)."""
    down = closed_port()
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(JobRun(tmp_path / str(n), experiment="x", uri=down, stage="evaluate",
                                                    job=f"evaluate/b/uniform/{n}", params={})) for n in (4, 16)]
    for r in runs:
        write_run_record(r.out, stage="evaluate", job=r.job, params={}, metrics={"top1": 0.5}, artifacts=[],
                         **r.record_fields())
        assert r.finish() is None
    assert capsys.readouterr().err.count("spot: warning:") == 1


def test_parent_run_nests_the_jobs_and_an_empty_one_is_deleted(tmp_path, uri):
    cfg = {"name": "nest", "mlflow": {"tracking_uri": uri}, "seed": 0}
    parent = tracking.start_pipeline(cfg, "params.yaml")
    run_id, _ = job(tmp_path / "b", uri, "nest")
    tracking.end_pipeline(cfg)
    c = MlflowClient(uri)
    assert c.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    p = c.get_run(parent)
    assert p.info.status == "FINISHED" and p.data.tags["spot.pipeline"] == "snakemake"
    assert set(p.data.params) == {"params_file", "code_version"}       # the jobs log the values they read
    assert "spot.job" not in p.data.tags
    empty = tracking.start_pipeline(cfg, "params.yaml")
    tracking.end_pipeline(cfg)
    assert c.get_run(empty).info.lifecycle_stage == "deleted"


def test_report_run_shows_the_results_table(tmp_path, uri):
    d = tmp_path / "report"
    d.mkdir()
    (d / "results.csv").write_text("backbone,prior,oracle,budget,top1\nb,grid,False,4,0.5\nb,uniform,False,4,0.625\n")
    (d / "tables.md").write_text("# Results\n\n| prior | 4 |\n|---|---|\n| grid | 50.00 |\n")
    write_json(d / "metrics.json", {"b/grid/4/top1": 0.5, "b/uniform/4/top1": 0.625})
    write_run_record(d, stage="report", job="report", params={}, metrics={"rows": 2},
                     artifacts=["results.csv", "tables.md", "metrics.json"])
    rid = log_record(d, "report", uri)
    r = MlflowClient(uri).get_run(rid)
    assert r.data.metrics == {"report/rows": 2}           # its cells are in the table, not a column each
    assert r.data.tags["mlflow.note.content"] == (d / "tables.md").read_text()
    table = json.loads(Path(MlflowClient(uri).download_artifacts(rid, "results.json", str(tmp_path))).read_text())
    assert table["columns"][:2] == ["backbone", "prior"] and len(table["data"]) == 2


def test_tracking_uri_environment_overrides_params(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}) == "http://elsewhere:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "sqlite:///x.db"}}) == "sqlite:///x.db"


def test_stages_depend_on_the_logging_interface_not_on_mlflow_code():
    """Changing how results are logged reruns no stage (DVC's deps are the modules a stage imports)."""
    from spot.workflow.dvc import code_deps
    from spot.workflow.stage_table import STAGES
    deps = {s.name: code_deps(s) for s in STAGES}
    assert "spot/utils/live.py" in deps["backbone"]
    assert not any(p.startswith("spot/workflow/") or p == "spot/cli.py" for d in deps.values() for p in d)


def registered(uri, name: str, run_id: str):
    """Model `name` loaded through MLflow's registry: it is the one model of run `run_id`, saved as code
    and files (no pickle: loading it runs no unpickler)."""
    import mlflow
    (version,) = MlflowClient(uri).search_model_versions(f"name = '{name}'")
    (output,) = MlflowClient(uri).get_run(run_id).outputs.model_outputs
    assert version.run_id == run_id and version.source.endswith(output.model_id)
    tracking.connect(uri)                               # sets MLflow's store without exporting it
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
    assert not [p.name for p in files.rglob("*") if p.suffix in (".pkl", ".pickle")], list(files.rglob("*"))
    return mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")


def test_a_backbone_is_a_registered_mlflow_model_giving_its_logits(tmp_path, uri):
    """A backbone job's run holds its model (signature, input example), registered as spot-<backbone>;
    loaded through MLflow it gives the backbone's own logits, at given positions and on the full grid."""
    import torch

    from spot.training.backbones import fetch, load_backbone
    out = tmp_path / "backbones" / "tiny"
    fetch("tiny", out, model="vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=32,
          depth=1, num_heads=2, num_classes=10)
    run_id, _ = job(out, uri, "models", job_id="backbone/tiny", params={"backbone": "tiny"})
    model = registered(uri, "spot-tiny", run_id)
    (version,) = MlflowClient(uri).search_model_versions("name = 'spot-tiny'")
    assert version.description.startswith("Backbone `tiny`: timm `vit_tiny_patch16_224`, 28 px, patch 4, 10 classes")
    assert "fetched (timm pretrained)" in version.description and "job `backbone/tiny`" in version.description
    assert model.metadata.signature.inputs.input_names() == ["images", "positions"]
    assert model.metadata.load_input_example()["positions"].shape == (1, 4, 2)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    positions = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(1))
    own = load_backbone(out)
    with torch.inference_mode():
        for pos, expected in ((positions, own(images, positions)), (positions[:, :0], own(images))):
            got = model.predict({"images": images.numpy(), "positions": pos.numpy()})
            assert got.shape == (2, 10) and np.allclose(got, expected.numpy(), atol=1e-5)


def test_a_placer_is_a_registered_mlflow_model_giving_its_positions(tmp_path, uri, capfd, recwarn):
    """A placer job's run holds its model, registered as spot-placer-<backbone>-<N>: its positions. Logging
    and loading it write no carriage return (MLflow's progress bars) or ANSI colour (its warnings) to a job's log."""
    import torch

    from spot.methods.placer import Placer
    from spot.training.placer_files import load_placer, save_placer
    out = tmp_path / "placer" / "tiny" / "4"
    save_placer(Placer(4, in_size=8, width=2, seed=3), out, meta=dict(backbone="tiny", budget=4))
    run_id, _ = job(out, uri, "models", stage="placer", job_id="placer/tiny/4", params={"backbone": "tiny", "budget": 4})
    model = registered(uri, "spot-placer-tiny-4", run_id)
    (version,) = MlflowClient(uri).search_model_versions("name = 'spot-placer-tiny-4'")
    assert version.description.startswith("Placer of backbone `tiny` for N = 4 tokens; job `placer/tiny/4`")
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    got = model.predict({"images": images.numpy()})
    with torch.inference_mode():
        assert got.shape == (2, 4, 2) and np.allclose(got, load_placer(out)(images).numpy(), atol=1e-6)
    err = capfd.readouterr().err
    assert "\r" not in err and "\x1b[" not in err, err[-2000:]
    assert not [str(w.message) for w in recwarn if "\x1b[" in str(w.message)]


def data_folders(folder: Path, tag: int) -> dict:
    """Two data folders (shards, decoded) whose datasets are new to the store: their digests come from `tag`."""
    inputs = {}
    for i, name in enumerate(("shards", "decoded")):
        write_json(folder / name / "manifest.json", {"splits": {"train": {"count": 8, "shards": [
            {"sha256": f"{tag:062x}{i:02x}"}]}}})
        inputs[name] = folder / name
    return inputs


def _log_jobs(uri: str, name: str, folder: Path, worker: int, rounds: int, barrier) -> None:
    """One of `concurrent_jobs`' processes: a job per round, started with every other process's."""
    for r in range(rounds):
        barrier.wait(timeout=300)
        job(folder / f"w{worker}-{r}", uri, name, job_id=f"backbone/w{worker}-{r}", inputs=data_folders(folder / str(r), r),
            steps=range(1, 3))


def concurrent_jobs(uri: str, name: str, folder: Path, workers: int = 8, rounds: int = 3) -> None:
    """`workers` processes each log `rounds` jobs as `job` does; in each round they start at once and read the
    same two data folders, whose datasets the store has not seen: every process get-or-creates the same rows.
    Then every job has one FINISHED run with its metrics, series and both datasets."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_log_jobs, args=(uri, name, folder, w, rounds, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * workers
    by_job = {}
    for r in runs(uri, name):
        assert r.data.tags["spot.job"] not in by_job, r.data.tags["spot.job"]
        by_job[r.data.tags["spot.job"]] = r
    assert sorted(by_job) == sorted(f"backbone/w{w}-{r}" for w in range(workers) for r in range(rounds))
    for job_id, r in by_job.items():
        assert r.info.status == "FINISHED" and r.data.metrics["val/top1"] == 0.25, (job_id, r.info.status)
        assert history(uri, r.info.run_id, "train/loss") == [(1, 1.0), (2, 0.5)], job_id
        assert sorted(d.dataset.name for d in r.inputs.dataset_inputs) == ["decoded", "shards"], job_id


@pytest.mark.stage                     # 8 processes that import torch: a minute or two on 2 cores
def test_concurrent_jobs_logging_the_same_new_datasets_lose_no_run(tmp_path):
    """8 processes log jobs at once with the same new datasets to a fresh SQLite store, whose SQLAlchemy store
    get-or-creates a dataset's row in two steps: the process that loses the race finds the row and goes on."""
    uri = f"sqlite:///{tmp_path / 'race.db'}"
    assert tracking.init("race", uri)
    concurrent_jobs(uri, "race", tmp_path)


KILLED_JOB = """
import os, signal, sys
from spot.utils import live
from spot.workflow.outputs import write_run_record
from spot.workflow.tracking import JobRun
out, uri, params = sys.argv[1], sys.argv[2], {"backbone": "b", "prior": "uniform", "budget": 4}
with JobRun(out, experiment="orphan", uri=uri, stage="evaluate", job="evaluate/b/uniform/4",
                     params=params) as run:
    live.log_metrics({"evaluate/loss": 0.5}, step=1)
    write_run_record(out, stage="evaluate", job=run.job, params=params, metrics={"top1": 0.5}, artifacts=[],
                     **run.record_fields())
    run.flush()
    os.kill(os.getpid(), signal.SIGKILL)            # killed after its record, before its run ended
"""


@pytest.mark.stage                     # a job killed in its own process
def test_sync_replaces_the_orphan_of_a_killed_job_under_its_parent_and_the_end_line_names_it(tmp_path, uri,
                                                                                              monkeypatch):
    """A job killed after writing run.json leaves its run RUNNING: the end-of-run line names the job, and
    `spot mlflow-sync` replaces that run by a FINISHED one under the same parent run (one run per job)."""
    import subprocess
    import sys
    cfg = {"name": "orphan", "root": str(tmp_path / "out"), "mlflow": {"tracking_uri": uri}}
    parent = tracking.start_pipeline(cfg, "params.yaml")
    out = tmp_path / "out" / "eval"
    r = subprocess.run([sys.executable, "-c", KILLED_JOB, str(out), uri], capture_output=True, text=True)
    assert r.returncode == -9 and (out / "run.json").is_file(), r.stderr[-2000:]
    (orphan,) = [r for r in runs(uri, "orphan") if "spot.job" in r.data.tags]
    assert orphan.info.status == "RUNNING" and orphan.data.tags["mlflow.parentRunId"] == parent
    line = tracking.check(cfg, "config/x.yaml")
    assert line.startswith("spot: warning: 1 jobs did not reach MLflow") and "(evaluate/b/uniform/4)" in line, line
    assert line.endswith("`spot mlflow-sync --params config/x.yaml`"), line
    tracking.end_pipeline(cfg)
    monkeypatch.delenv(tracking.PARENT_ENV)                   # the sync runs later, from a shell
    (run_id,) = sync(tmp_path / "out", "orphan", uri)
    (r,) = [r for r in runs(uri, "orphan") if "spot.job" in r.data.tags]
    assert r.info.run_id == run_id != orphan.info.run_id and r.info.status == "FINISHED"
    assert r.data.tags["mlflow.parentRunId"] == parent and r.info.start_time == orphan.info.start_time
    assert r.data.metrics["evaluate/top1"] == 0.5 and history(uri, run_id, "evaluate/loss") == [(1, 0.5)]
    assert MlflowClient(uri).get_run(orphan.info.run_id).info.lifecycle_stage == "deleted"
    assert tracking.check(cfg, "params.yaml").startswith("MLflow runs: `mlflow ui --backend-store-uri sqlite:")


def test_a_run_whose_logging_fails_ends_failed_and_the_end_line_names_its_job(tmp_path, uri, capsys):
    """The store refuses a metric name: the job goes on with one warning, its run ends FAILED (not RUNNING),
    tagged with the error, and the end-of-run line names the job."""
    with JobRun(tmp_path / "out" / "b", experiment="refused", uri=uri, stage="backbone", job="backbone/b",
                         params={}) as run:
        live.log_metrics({"train/bad#name": 1.0}, step=1)
        write_run_record(run.out, stage="backbone", job=run.job, params={}, metrics={}, artifacts=[],
                         **run.record_fields())
        assert run.finish() is None
    assert capsys.readouterr().err.count("spot: warning: MLflow") == 1
    (r,) = runs(uri, "refused")
    assert r.info.status == "FAILED" and r.data.tags["spot.error"].startswith("logging failed: "), r.data.tags
    assert "bad#name" in r.data.tags["spot.error"]
    cfg = {"name": "refused", "root": str(tmp_path / "out"), "mlflow": {"tracking_uri": uri}}
    assert "1 jobs did not reach MLflow" in tracking.check(cfg, "params.yaml")


@pytest.mark.stage                     # one Snakemake job in a repository copy: about 30 s
def test_the_end_of_a_snakemake_run_names_the_jobs_that_did_not_reach_mlflow(tmp_path):
    """A run whose tracking store is down succeeds, and is not reported as all well: its end names the jobs
    that MLflow lacks and the command that logs them."""
    from tests.conftest import copy_repo, snakemake
    r = snakemake(copy_repo(tmp_path), "shard", MLFLOW_TRACKING_URI=closed_port())
    (line,) = [s for s in (r.stdout + r.stderr).splitlines() if "did not reach MLflow" in s]
    assert line.startswith("spot: warning: 1 jobs did not reach MLflow at http://127.0.0.1:") and "(shard)" in line
    assert line.endswith("log them with `spot mlflow-sync --params config/smoke.yaml`"), line
    assert "MLflow runs:" not in r.stdout + r.stderr
