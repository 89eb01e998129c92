"""The Snakemake DAG end to end on config/smoke.yaml, in a copy of the repository, checked with the
MLflow client; a killed job; an unreachable tracking server. Real snakemake, real MLflow store."""
import base64
import copy
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, copy_repo, env, snakemake

pytestmark = pytest.mark.end_to_end
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
REPORT_FILES = ["tables.md", "findings.md", "results.csv", "results.parquet", "metrics.json", "run.json",
                "plots/accuracy_vs_budget.png", "plots/accuracy_vs_budget.csv", "pictures/priors.png",
                "pictures/trajectories.png"]


def job_counts(output: str) -> Counter:
    """Rule -> count from the 'Job stats' table Snakemake prints."""
    table = output.split("Job stats:")[1].split("total")[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)})


def expected_jobs(cfg: dict) -> Counter:
    """Jobs per rule: every backbone and replicate (training seed) trains, evaluates, searches and runs
    the reduction baselines; a replicate places tokens at replicates.placement_budgets only, makes no
    analysis, and with replicates.transfers the k-th runs of all backbones transfer among themselves."""
    from spot.workflow.config import validate
    from spot.workflow.stage_table import geometries
    raw = copy.deepcopy(cfg)
    cfg = validate(copy.deepcopy(cfg))
    p, place = len(raw["backbones"]), cfg["placement"]
    b = sum(len(spec.get("seeds", [0])) for spec in raw["backbones"].values())
    few = len(cfg["replicates"]["placement_budgets"] or place["budgets"])
    k = min(len(spec.get("seeds", [0])) for spec in raw["backbones"].values()) if cfg["replicates"]["transfers"] else 1
    return Counter(all=1, shard=1, saliency=1, decode=len(geometries(cfg)), backbone=b, report=1,
                   evaluate=b, oracle=b * cfg["oracle"]["parts"], oracle_gather=b, analyze=p, transfer=p * k,
                   **{m: p * len(place["budgets"]) + (b - p) * few for m in place["methods"]},  # a job per budget
                   **({"placer_transfer": p * (p - 1) * k} if "placer" in place["methods"] and place["transfer"] else {}),
                   **({"reduction": b} if cfg["reduction"]["methods"] else {}),
                   **({"model_saliency": 1} if cfg["saliency"].get("model") else {}))


def mlflow_runs(cwd: Path, name: str):
    c = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = c.get_experiment_by_name(name)
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=5000)


def snakemake_times(cwd: Path, output: Path) -> dict:
    """Start and end (seconds since the epoch) of the job that made `output`, from Snakemake's records."""
    name = base64.b64encode(str(output.relative_to(cwd)).encode()).decode()
    return json.loads((cwd / ".snakemake" / "metadata" / name).read_text())


def test_dry_run_lists_every_job_of_the_default_config(tmp_path):
    cwd = copy_repo(tmp_path)
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    r = snakemake(cwd, "-n", config="params.yaml")
    counts = job_counts(r.stdout)
    assert counts == expected_jobs(default), counts


def test_bad_config_stops_before_any_job(tmp_path):
    cwd = copy_repo(tmp_path)
    bad = dict(SMOKE, eval=dict(SMOKE["eval"], budgets=[4, 0]))
    (cwd / "config" / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = snakemake(cwd, config="config/bad.yaml", check=False)
    assert r.returncode != 0 and "config/bad.yaml: eval.budgets.1" in r.stdout + r.stderr
    assert not (cwd / "out").exists()


@pytest.mark.parametrize("key, value, message", [
    ("eval", dict(SMOKE["eval"], budgets=[4, 0]), "eval.budgets.1: 0 is less than the minimum of 1"),
    ("train", dict(SMOKE["train"], lr=float("nan")), "train.lr: .nan is not a finite number"),
    ("oracle", dict(SMOKE["oracle"], parts=3), "oracle.parts: 3 SPoT-ON jobs per backbone and budget"),
])
def test_a_bad_params_file_is_one_line_under_snakemake(tmp_path, key, value, message):
    """`snakemake -n` with a bad params file (the schema's, validation's or preflight's finding): one
    error line on the console, as `spot validate` prints it, and no traceback."""
    cwd = copy_repo(tmp_path)
    (cwd / "config" / "bad.yaml").write_text(yaml.safe_dump(dict(SMOKE, **{key: value})))
    r = snakemake(cwd, "-n", config="config/bad.yaml", check=False)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "is extended by additional config" not in line]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("snakemake: error: config/bad.yaml: "), lines
    assert message in lines[0]


def test_a_failed_job_shows_its_error_line_on_the_console(tmp_path):
    """A job that fails (here: its output folder held by another writer) puts its one-line error,
    the last line of its log, on Snakemake's console with the log's path, not only 'check log file(s)'."""
    import fcntl
    cwd = copy_repo(tmp_path)
    (cwd / "out" / "shards").mkdir(parents=True)
    fd = os.open(cwd / "out" / "shards" / ".lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = snakemake(cwd, "out/shards/run.json", check=False)
    finally:
        os.close(fd)
    assert r.returncode != 0
    line = "out/logs/shard.log: spot shard: error: another spot process is writing out/shards (lock out/shards/.lock)"
    assert line in (r.stdout + r.stderr).splitlines(), r.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke(smoke_run):
    return smoke_run


def test_smoke_run_makes_every_job_and_report_file(smoke):
    cwd, r = smoke
    manifest = json.loads((cwd / "out" / "shards" / "manifest.json").read_text())
    shards = len(manifest["splits"]["val"]["shards"])
    assert shards >= SMOKE["oracle"]["parts"] >= 2                      # every oracle part has a shard
    ran = Counter(re.findall(r"\(Rule: (\w+)\)", r.stdout + r.stderr))
    assert ran == expected_jobs(SMOKE), ran
    parts = [np.load(p)["keys"] for p in sorted((cwd / "out" / "oracle-parts" / "spot-a" / "4").glob("*/part.npz"))]
    assert len(parts) == 2 and len(set(np.concatenate(parts))) == manifest["splits"]["val"]["count"]
    for f in REPORT_FILES:
        assert (cwd / "out" / "report" / f).stat().st_size > 0, f


def test_smoke_report_has_intervals_and_replicate_spread(smoke):
    """results.csv: every accuracy's 95% interval is about as wide as the binomial one for its n (60
    val images: a 6-point tolerance on the full width); the replicate of spot-a (seed 1) has its own
    folders and rows; replicates.csv has the spread over the two training seeds and the prior draws."""
    import pandas as pd
    cwd, _ = smoke
    results = pd.read_csv(cwd / "out" / "report" / "results.csv")
    n = len(pd.read_parquet(cwd / "out" / "eval" / "spot-a" / "grid" / "4" / "predictions.parquet"))
    for c in ("top1", "knn"):
        binomial = 2 * 1.96 * np.sqrt(results[c] * (1 - results[c]) / n)
        assert ((results[f"{c}_high"] - results[f"{c}_low"]) - binomial).abs().max() < 0.06, c
        assert (results[f"{c}_low"] <= results[c]).all() and (results[c] <= results[f"{c}_high"]).all()
    assert set(results[results.replicate_of == "spot-a"].backbone) == {"spot-a-s1"}
    assert (cwd / "out" / "backbones" / "spot-a-s1" / "run.json").is_file()
    reps = pd.read_csv(cwd / "out" / "report" / "replicates.csv")
    assert set(reps.kind) == {"training seeds", "prior seeds"} and (reps.r == 2).all()
    found = (cwd / "out" / "report" / "findings.md").read_text()
    assert re.search(r"spot-a, 4 tokens: best off-grid prior vs grid: .*over 2 runs x n = \d+", found)
    claims = pd.read_csv(cwd / "out" / "report" / "findings.csv")
    assert set(claims[claims.subject.str.startswith("spot-a,")].level) == {"2 training runs"}


def test_mlflow_holds_one_run_per_job_with_its_metrics(smoke):
    """One run per job, nested under the invocation's parent run, spanning its job; stage-prefixed
    metrics equal to run.json's; curves of the training and the oracle; the report's table."""
    import mlflow
    import torch

    from spot.training.backbones import load_backbone
    from spot.workflow.tracking import MAX_NOTE, connect, metric_name, ms
    cwd, _ = smoke
    c = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    every = mlflow_runs(cwd, SMOKE["name"])
    (parent,) = [r for r in every if "spot.pipeline" in r.data.tags]
    runs = [r for r in every if r is not parent]
    records = {json.loads(p.read_text())["job"]: p.parent for p in (cwd / "out").rglob("run.json")}
    assert sorted(r.data.tags["spot.job"] for r in runs) == sorted(records)
    stages = Counter(r.data.tags["spot.stage"] for r in runs)
    b = sum(len(spec.get("seeds", [0])) for spec in SMOKE["backbones"].values())    # a backbone per training seed
    assert stages["evaluate"] == b * len(SMOKE["eval"]["priors"]) * len(SMOKE["eval"]["budgets"])
    assert parent.info.status == "FINISHED" and set(parent.data.params) == {"params_file", "code_version"}
    for r in runs:
        job = r.data.tags["spot.job"]
        record = json.loads((records[job] / "run.json").read_text())
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id, job
        assert r.info.status == "FINISHED" and r.info.start_time == ms(record["started"])
        assert parent.info.start_time <= r.info.start_time <= r.info.end_time <= parent.info.end_time
        # inside the job as Snakemake saw it: the run starts when the job's process opens it (a job's later
        # folders: when their turn comes) and ends after its record is written and before Snakemake sees the
        # job end (then only Python's teardown, seconds to tens of seconds on busy cores, which no bound
        # here depends on)
        times = snakemake_times(cwd, records[job] / "run.json")
        assert times["starttime"] - 2 < r.info.start_time / 1000 < times["endtime"], job
        assert ms(record["ended"]) <= r.info.end_time <= times["endtime"] * 1000 + 1000, job
        for k, v in record["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and metric_name(record["stage"], k):
                assert r.data.metrics[metric_name(record["stage"], k)] == pytest.approx(v), (job, k)
        if r.data.tags["spot.stage"] == "evaluate":
            assert {"backbone", "prior", "budget", "seed", "code_version"} <= set(r.data.params)
    by_job = {r.data.tags["spot.job"]: r for r in runs}
    train = by_job["backbone/spot-a"].info.run_id
    assert len({m.step for m in c.get_metric_history(train, "train/loss")}) > 1
    (version,) = c.search_model_versions("name = 'spot-spot-a'")          # its weights: a registered MLflow model
    assert version.run_id == train and len(c.get_run(train).outputs.model_outputs) == 1
    made = r"trained from \S+ with .* seed \d+ \(epochs \d+, lr \S+, batch_size \d+\); data \w+ `.+`; val top-1 0\.\d{4}"
    assert re.search(made, version.description), version.description     # what it is: recipe, seed, data, score
    connect(c.tracking_uri)                             # sets MLflow's store without exporting it
    logged, own = mlflow.pyfunc.load_model(version.source), load_backbone(records["backbone/spot-a"])
    images = torch.randn(3, *own.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    positions = torch.rand(3, 7, 2, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = own(images, positions).numpy()
    assert np.allclose(logged.predict({"images": images.numpy(), "positions": positions.numpy()}), expected, atol=1e-5)
    for job in (j for j in records if j.startswith("placer/")):         # every placer: spot-placer-<backbone>-<N>
        (placer,) = c.search_model_versions("name = 'spot-placer-{}-{}'".format(*job.split("/")[1:]))
        assert placer.run_id == by_job[job].info.run_id, job
    oracle = c.get_metric_history(by_job["oracle-gather/spot-a/4"].info.run_id, "oracle/accuracy")
    assert sorted(m.step for m in oracle) == list(range(SMOKE["oracle"]["steps"] + 1))
    for part in (0, 1):                                 # each part's own curve, on its images, sits on its run
        curve = c.get_metric_history(by_job[f"oracle/spot-a/4/{part}"].info.run_id, "oracle-part/top1")
        assert sorted(m.step for m in curve) == list(range(SMOKE["oracle"]["steps"] + 1))
    # the runs table's columns: the values each stage reads, prefixed (`eval.knn.k`), not the config's every key
    columns = {k for r in every for k in r.data.params}
    assert "eval.knn.k" in columns and not {"name", "root", "mlflow.tracking_uri"} & columns, columns
    report = by_job["report"]
    arts = c.list_artifacts(report.info.run_id)
    assert {"tables.md", "pictures", "plots", "results.json"} <= {a.path for a in arts}
    note, table = report.data.tags["mlflow.note.content"], (cwd / "out" / "report" / "tables.md").read_text()
    kept = note.split("\n\n(cut: the whole table is the artifact tables.md)")[0]   # a tag holds MAX_NOTE characters
    assert len(note) <= MAX_NOTE and table.startswith(kept) and len(kept) >= min(len(table), MAX_NOTE - 100), note[-200:]
    assert set(report.data.metrics) == {"report/rows", "report/transfers"}   # cells: results.json, not a column each


def test_every_result_names_the_environment_that_made_it(smoke):
    """run.json, the MLflow run's tags and the report's header: versions, device, CPU, kernels, lock."""
    from importlib.metadata import version

    from spot.utils.environment import cpu_model, lock_digest
    cwd, _ = smoke
    runs = {r.data.tags["spot.job"]: r for r in mlflow_runs(cwd, SMOKE["name"]) if "spot.job" in r.data.tags}
    for path in (cwd / "out").rglob("run.json"):
        record = json.loads(path.read_text())
        e = record["environment"]
        assert e["torch"] == version("torch") and e["mlflow"] == version("mlflow") and e["python"]
        assert e["cpu"] == cpu_model() and e["cpu_capability"] and e["threads"] >= 1 and e["device"] == "cpu"
        assert e["lock"] == lock_digest(cwd / "requirements.lock") and "cuda" in e and "cudnn" in e
        tags = runs[record["job"]].data.tags
        assert {k: tags.get(f"spot.env.{k}") for k, v in e.items() if v is not None} == \
            {k: str(v) for k, v in e.items() if v is not None}, record["job"]
    head = (cwd / "out" / "report" / "tables.md").read_text().split("\n\n")[1]
    assert f"CPU {cpu_model()}" in head and f"torch {version('torch')}" in head
    assert f"lock file {lock_digest(cwd / 'requirements.lock')}" in head


def test_rerun_executes_nothing_and_adds_no_run(smoke):
    cwd, _ = smoke
    before = len(mlflow_runs(cwd, SMOKE["name"]))
    r = snakemake(cwd)
    assert "Nothing to be done" in r.stdout + r.stderr
    assert len(mlflow_runs(cwd, SMOKE["name"])) == before                 # nor a parent run


@pytest.fixture(scope="module")
def slow_training(tmp_path_factory):
    """A repo copy whose config trains long enough to be killed mid-way."""
    cwd = copy_repo(tmp_path_factory.mktemp("kill"))
    cfg = dict(SMOKE, name="spot-kill", train=dict(SMOKE["train"], epochs=20, checkpoint_every=3))
    (cwd / "config" / "kill.yaml").write_text(yaml.safe_dump(cfg))
    return cwd


def test_killed_job_is_not_complete_and_the_rerun_finishes(slow_training):
    cwd = slow_training
    target = "out/backbones/spot-a/run.json"
    proc = subprocess.Popen(["snakemake", "--cores", "2", target, "--config", "params=config/kill.yaml"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    ckpt = cwd / "out" / "checkpoints" / "spot-a" / "checkpoint.pt"     # every 3 steps
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "snakemake ended before its first training checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)                                   # snakemake and its job
    proc.wait()
    assert not (cwd / target).exists()
    snakemake(cwd, "--unlock", config="config/kill.yaml")
    dry = snakemake(cwd, "-n", target, config="config/kill.yaml")
    assert job_counts(dry.stdout)["backbone"] == 1
    snakemake(cwd, target, config="config/kill.yaml")
    assert (cwd / target).exists()
    assert json.loads((cwd / "out" / "backbones" / "spot-a" / "metrics.json").read_text())["step"] == 80


def test_unreachable_tracking_server_then_mlflow_sync(slow_training):
    """The server is down: each job still succeeds, with one warning line in its log; `spot
    mlflow-sync` then logs every record, with the jobs' times and step series."""
    from spot.workflow.tracking import ms
    cwd = slow_training
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    target = "out/eval/spot-a/isotropic/4/run.json"
    snakemake(cwd, target, config="config/kill.yaml", MLFLOW_TRACKING_URI=closed)
    assert (cwd / target).exists()
    log = (cwd / "out" / "logs" / "evaluate" / "spot-a.log").read_text()   # the job of every prior and budget
    assert log.count("spot: warning:") == 1 and "mlflow-sync" in log, log[-2000:]
    logged = {r.data.tags.get("spot.job") for r in mlflow_runs(cwd, "spot-kill")}
    assert not {"evaluate/spot-a/isotropic/4", "evaluate/spot-a/isotropic/16"} & logged
    r = subprocess.run(["spot", "mlflow-sync", "--params", "config/kill.yaml"], cwd=cwd, env=env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    records = {json.loads(p.read_text())["job"]: json.loads(p.read_text()) for p in (cwd / "out").rglob("run.json")}
    runs = [r for r in mlflow_runs(cwd, "spot-kill") if "spot.job" in r.data.tags]
    assert sorted(r.data.tags["spot.job"] for r in runs) == sorted(records)
    ev = next(r for r in runs if r.data.tags["spot.job"] == "evaluate/spot-a/isotropic/4")
    rec = records["evaluate/spot-a/isotropic/4"]
    assert (ev.info.start_time, ev.info.end_time) == (ms(rec["started"]), ms(rec["ended"]))
    assert "mlflow.parentRunId" not in ev.data.tags                     # synced by hand: top-level
    train = next(r for r in runs if r.data.tags["spot.job"] == "backbone/spot-a")
    c = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    assert sorted(m.step for m in c.get_metric_history(train.info.run_id, "train/loss")) == list(range(1, 81))
