"""GPU slots (`spot.workflow.gpus`) on CPU, with a stand-in list of GPU ids (SPOT_GPUS): real
processes, real file locks. Concurrent jobs get distinct slots, a SIGKILLed holder's slot is taken
again, and jobs beyond the slots wait instead of sharing one (shown by the order of a shared log, not
by times). SLURM, a set CUDA_VISIBLE_DEVICES and `device: cpu` take no slot. A real job of a GPU
stage records its GPU in run.json and MLflow."""
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from spot.utils.environment import environment
from spot.workflow.gpus import gpu_slot, take

GPU_STAGE = SimpleNamespace(gpu=True)
CONFIG = {"device": "cuda", "gpus": {"ids": "all", "jobs_per_gpu": 1}}
# A job: takes a slot, logs it, holds it until the file `go` exists, logs its release, ends.
JOB = f"""
import os, sys, time
from pathlib import Path
from types import SimpleNamespace
from spot.workflow.gpus import gpu_slot
log, go = Path(sys.argv[1]), Path(sys.argv[2])
def note(what):
    with open(log, "a") as f:
        f.write(f"{{what}} {{os.environ['SPOT_GPU_SLOT']}} {{os.environ['CUDA_VISIBLE_DEVICES']}} {{os.getpid()}}\\n")
with gpu_slot(SimpleNamespace(gpu=True), {CONFIG!r}):
    note("take")
    while not go.exists():
        time.sleep(0.02)
    note("free")
"""


@pytest.fixture
def jobs(tmp_path):
    """start(n): n job processes on the stand-in GPUs `ids`; the log's lines; `go` releases them all."""
    procs, log, go = [], tmp_path / "log", tmp_path / "go"
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "WORLD_SIZE")}

    def start(n, ids, per_gpu=1):
        for _ in range(n):
            env = base | dict(SPOT_GPUS=ids, SPOT_JOBS_PER_GPU=str(per_gpu), SPOT_GPU_LOCKS=str(tmp_path / "locks"))
            err = tmp_path / f"stderr-{len(procs)}"
            with open(err, "w") as f:
                procs.append(subprocess.Popen([sys.executable, "-c", JOB, str(log), str(go)], env=env, stderr=f))
            procs[-1].waits = lambda err=err: "waiting" in err.read_text()      # it said it waits for a slot
        return procs[-n:]

    def lines(kind=None):
        rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
        return [r for r in rows if kind in (None, r[0])]

    yield SimpleNamespace(start=start, lines=lines, go=go, procs=procs)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def wait_for(condition, what, seconds=60):
    """Wait until `condition()` holds; fail after `seconds` (a hung test, not a timing assertion)."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.mark.unit
@pytest.mark.parametrize("ids, per_gpu, n", [("0,1,2", 1, 3), ("0,1", 2, 4)])
def test_concurrent_jobs_get_distinct_slots(jobs, ids, per_gpu, n):
    jobs.start(n, ids, per_gpu)
    wait_for(lambda: len(jobs.lines("take")) == n, f"{n} jobs to hold a slot")
    taken = jobs.lines("take")
    assert len({slot for _, slot, _, _ in taken}) == n                          # all held at once, none shared
    for _, slot, gpu, _ in taken:
        assert slot.startswith(f"gpu{gpu}.")                                       # the job sees its slot's GPU
    assert sorted(gpu for _, _, gpu, _ in taken) == sorted(ids.split(",") * per_gpu)
    jobs.go.touch()
    assert [p.wait(60) for p in jobs.procs] == [0] * n


@pytest.mark.unit
def test_a_killed_holder_frees_its_slot(jobs):
    (holder,) = jobs.start(1, "5")
    wait_for(lambda: jobs.lines("take"), "the first job to hold GPU 5")
    (waiter,) = jobs.start(1, "5")
    wait_for(waiter.waits, "the second job to wait")
    assert len(jobs.lines("take")) == 1
    os.kill(holder.pid, signal.SIGKILL)                    # no cleanup runs: the kernel drops its lock
    assert holder.wait(60) == -signal.SIGKILL
    wait_for(lambda: len(jobs.lines("take")) == 2, "the second job to take the freed slot")
    assert [r[1:3] for r in jobs.lines("take")] == [["gpu5.0", "5"]] * 2
    jobs.go.touch()
    assert waiter.wait(60) == 0


@pytest.mark.unit
def test_jobs_beyond_the_slots_wait_rather_than_share(jobs):
    procs = jobs.start(5, "0,1")
    wait_for(lambda: len(jobs.lines("take")) == 2, "two jobs to hold the two slots")
    holders = {int(r[3]) for r in jobs.lines("take")}
    for p in procs:                                        # the other three say they wait, and hold nothing
        if p.pid not in holders:
            wait_for(p.waits, "a job to wait")
    assert len(jobs.lines("take")) == 2
    jobs.go.touch()
    assert [p.wait(60) for p in procs] == [0] * 5
    held, most = {}, 0                                     # replay the log: a slot has one holder at a time
    for what, slot, _, pid in jobs.lines():
        if what == "take":
            assert slot not in held, f"{slot} taken by {pid} while {held.get(slot)} held it"
            held[slot] = pid
        else:
            assert held.pop(slot) == pid
        most = max(most, len(held))
    assert most == 2 and len(jobs.lines("take")) == 5 and not held


@pytest.mark.unit
def test_the_slot_sets_the_device_and_is_recorded(monkeypatch, tmp_path):
    for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "WORLD_SIZE", "SPOT_GPU_SLOT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SPOT_GPU_LOCKS", str(tmp_path))
    monkeypatch.setenv("SPOT_GPUS", "3,7")
    with gpu_slot(GPU_STAGE, CONFIG) as slot:
        assert (slot.gpu, os.environ["CUDA_VISIBLE_DEVICES"]) == ("3", "3")
        env = environment()
        assert (env["gpus"], env["gpu_slot"]) == ("3", "gpu3.0")
        with gpu_slot(GPU_STAGE, CONFIG) as inner:     # (CUDA_VISIBLE_DEVICES set: chosen already)
            assert inner is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "SPOT_GPU_SLOT" not in os.environ
    assert environment()["gpus"] is None
    with gpu_slot(GPU_STAGE, CONFIG | {"gpus": {"ids": [2], "jobs_per_gpu": 1}}) as slot:
        assert slot.gpu == "3"                             # SPOT_GPUS wins over gpus.ids
    monkeypatch.delenv("SPOT_GPUS")
    with gpu_slot(GPU_STAGE, CONFIG | {"gpus": {"ids": [2], "jobs_per_gpu": 1}}) as slot:
        assert slot.name == "gpu2.0"


@pytest.mark.unit
@pytest.mark.parametrize("case", ["slurm", "visible", "cpu", "not a GPU stage", "cuda:1", "auto on one GPU"])
def test_no_slot_where_something_else_chose(monkeypatch, tmp_path, case):
    for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SPOT_GPU_LOCKS", str(tmp_path))
    monkeypatch.setenv("SPOT_GPUS", "0,1")
    cfg, stage = dict(CONFIG), GPU_STAGE
    if case == "slurm":
        monkeypatch.setenv("SLURM_JOB_ID", "42")
    elif case == "visible":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    elif case in ("cpu", "cuda:1"):
        cfg["device"] = case
    elif case == "auto on one GPU":
        cfg["device"] = "auto"
        monkeypatch.setenv("SPOT_GPUS", "0")
    else:
        stage = SimpleNamespace(gpu=False)
    with gpu_slot(stage, cfg) as slot:
        assert slot is None and not any(tmp_path.iterdir())
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == ("1" if case == "visible" else None)


@pytest.mark.unit
def test_bad_settings_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOT_GPUS", "0")
    monkeypatch.setenv("SPOT_JOBS_PER_GPU", "two")
    for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="SPOT_JOBS_PER_GPU='two' is not a count"):
        with gpu_slot(GPU_STAGE, CONFIG):
            pass
    with pytest.raises(ValueError, match="no GPU to take a slot of"):
        take([], locks=tmp_path)


@pytest.mark.stage                  # runs two stages (no training): seconds, not the unit loop
def test_a_gpu_job_records_its_gpu_in_run_json_and_mlflow(tmp_path, monkeypatch):
    """A real job of a GPU stage (saliency, after shard) through `spot`: its run.json environment and
    its MLflow run's tags name the slot's GPU; the shard job (no GPU) names none."""
    import json

    import mlflow

    from spot.cli import main
    from tests.conftest import smoke_config
    for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "WORLD_SIZE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SPOT_GPU_LOCKS", str(tmp_path / "locks"))
    params = smoke_config(tmp_path)
    assert main(["shard", "--params", str(params)]) == 0
    monkeypatch.setenv("SPOT_GPUS", "4,5")                    # (device auto: several GPUs, or none is taken)
    assert main(["saliency", "--params", str(params)]) == 0
    records = {r["stage"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "out").rglob("run.json"))}
    assert (records["saliency"]["environment"]["gpus"], records["saliency"]["environment"]["gpu_slot"]) == ("4", "gpu4.0")
    assert records["shard"]["environment"]["gpus"] is None
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`spot.stage` = 'saliency'")
    assert [(r.data.tags["spot.env.gpus"], r.data.tags["spot.env.gpu_slot"]) for r in runs] == [("4", "gpu4.0")]
