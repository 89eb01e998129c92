"""MLflow as on a cluster: a real PostgreSQL and a real `mlflow server` serving the artifacts, started
on 127.0.0.1 by scripts/mlflow-server.sh (the way docs/mlflow-server.md tells users to), the smoke DAG
logging to them with 4 jobs at a time, and every run, metric step and artifact checked against the
job folders' files.

The server's folder is a fresh one in /tmp, not under pytest's temporary folders: PostgreSQL refuses
root, so when the tests run as root it runs as `postgres`, which cannot enter those. The script runs in
its own session; at the end it is stopped with SIGTERM (it stops the server, then PostgreSQL), and
whatever is left of it is killed, whatever happened."""
import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, copy_repo, env, running, snakemake

SCRIPT = REPO / "scripts" / "mlflow-server.sh"
POSTGRES = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
pytestmark = [pytest.mark.end_to_end,
              pytest.mark.skipif(POSTGRES is None, reason="PostgreSQL is not installed (no initdb): "
                                                          "apt-get install postgresql")]
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
READY_S, STOP_S = 180, 60           # the server answers in 15-45 s on 2 busy cores; it stops in about 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/mlflow-server.sh on 127.0.0.1:<free port>, its PostgreSQL and artifacts in `root`."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc = None

    def start(self):
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([str(SCRIPT), str(self.root), "--host", "127.0.0.1", "--port", str(self.port),
                                          "--workers", "2"], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        end = time.monotonic() + READY_S
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"{SCRIPT.name} exited ({self.proc.returncode}):\n{self.tail()}"
            if self.get("/health")[0] == 200:
                return
            time.sleep(1)
        raise AssertionError(f"waited {READY_S} s for {self.uri}/health:\n{self.tail()}")

    def get(self, path: str, host: str | None = None) -> tuple[int | None, str]:
        """(HTTP status, body) of GET `path` (None: no answer), with another Host header if given."""
        request = urllib.request.Request(self.uri + path, headers={"Host": host} if host else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return None, ""

    def db(self):
        """A connection to the server's PostgreSQL database (its socket is in the data folder)."""
        import psycopg2
        return psycopg2.connect(host=str(self.root / "postgres"), user="mlflow", dbname="mlflow")

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self):
        """SIGTERM to the script (it stops the server, then PostgreSQL); after STOP_S, or if PostgreSQL
        outlived it, kill what is left."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)        # the server's processes, if any are left
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None
        pid = self.root / "postgres" / "postmaster.pid"          # pg_ctl starts PostgreSQL in a session of its own
        if pid.exists():
            try:
                os.kill(int(pid.read_text().split()[0]), signal.SIGQUIT)   # PostgreSQL's immediate shutdown
            except (ProcessLookupError, ValueError):
                pass
            end = time.monotonic() + STOP_S
            while pid.exists() and time.monotonic() < end:
                time.sleep(0.2)


@pytest.fixture(scope="module")
def mlflow_server():
    server = Server(Path(tempfile.mkdtemp(prefix="spot-mlflow-")))
    try:
        with running(server):
            yield server
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


def test_server_answers_this_machines_names_and_no_other(mlflow_server):
    """Jobs on other nodes name the server's machine (http://<host>:<port>): the script allows its
    names and addresses as Host headers; MLflow's protection against DNS rebinding stays on."""
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    for host in [socket.gethostname(), "localhost", "127.0.0.1"]:
        assert mlflow_server.get(path, f"{host}:{mlflow_server.port}")[0] == 200, host
    assert mlflow_server.get(path, f"spot.invalid:{mlflow_server.port}")[0] == 403


def test_concurrent_jobs_logging_the_same_new_datasets_lose_no_run(mlflow_server, tmp_path):
    """8 processes log jobs at once with the same new datasets through the server to PostgreSQL, where MLflow
    get-or-creates a dataset's row in two steps too: every job has one FINISHED run with its metrics and datasets."""
    from spot.workflow import tracking
    from tests.test_tracking import concurrent_jobs
    assert tracking.init("race", mlflow_server.uri)
    concurrent_jobs(mlflow_server.uri, "race", tmp_path)


@dataclass
class Logged:
    """The smoke DAG's run against the server: its repository copy and output, its job folders
    (job -> (folder, run.json)), a client of the server, the experiment and its active runs."""
    cwd: Path
    output: str
    folders: dict
    client: MlflowClient
    experiment: object
    runs: list

    def jobs(self) -> list:
        return [r for r in self.runs if "spot.pipeline" not in r.data.tags]


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory) -> Logged:
    """The smoke DAG in a repository copy, run with `--cores 4` and MLFLOW_TRACKING_URI at the server."""
    cwd = copy_repo(tmp_path_factory.mktemp("repo"))
    start = time.monotonic()
    r = snakemake(cwd, cores=4, MLFLOW_TRACKING_URI=mlflow_server.uri)
    print(f"smoke DAG with --cores 4 logging to {mlflow_server.uri}: {time.monotonic() - start:.0f} s")
    folders = {}
    for p in (cwd / "out").rglob("run.json"):
        record = json.loads(p.read_text())
        assert record["job"] not in folders, (p, folders.get(record["job"]))
        folders[record["job"]] = p.parent, record
    c = MlflowClient(mlflow_server.uri)
    exp = c.get_experiment_by_name(SMOKE["name"])
    return Logged(cwd, r.stdout + r.stderr, folders, c, exp, c.search_runs([exp.experiment_id], max_results=5000))


def test_one_finished_run_per_job_folder_nested_under_the_pipeline_run(logged, mlflow_server):
    """Every job folder's run.json has one finished run (tag spot.job), under the invocation's run, in
    the server's PostgreSQL; neither snakemake nor a job lost the server, and no sqlite store or local
    artifacts appeared."""
    cwd, runs = logged.cwd, logged.runs
    assert not list(cwd.rglob("mlflow.db")) and not (cwd / "mlruns").exists() and not (cwd / "mlartifacts").exists()
    lost = "spot: warning: MLflow"                  # tracking's one line when a job or snakemake loses MLflow
    assert lost not in logged.output, logged.output[-3000:]
    warned = [p for p in (cwd / "out" / "logs").rglob("*.log") if lost in p.read_text()]
    assert not warned, f"{warned[0]}: {warned[0].read_text()[-2000:]}"
    (parent,) = [r for r in runs if "spot.pipeline" in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert Counter(r.data.tags.get("spot.job") for r in logged.jobs()) == Counter(list(logged.folders))
    for r in logged.jobs():
        assert r.info.status == "FINISHED", r.data.tags["spot.job"]
        assert r.data.tags.get("mlflow.parentRunId") == parent.info.run_id, r.data.tags["spot.job"]
    with closing(mlflow_server.db()) as db, db.cursor() as cur:
        cur.execute("SELECT version()")
        assert cur.fetchone()[0].startswith("PostgreSQL ")
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s AND lifecycle_stage = 'active'",
                    (int(logged.experiment.experiment_id),))
        assert cur.fetchone()[0] == len(runs)


def series_points(path: Path) -> dict[str, set[tuple[int, float]]]:
    """A job's series.csv as metric name -> {(step, value)}."""
    points = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            points.setdefault(row["key"], set()).add((int(row["step"]), float(row["value"])))
    return points


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_every_metric_and_every_step_of_every_series_arrived(logged):
    """run.json's numbers are the runs' metrics; each point of series.csv (training curves) and of a
    list (the oracle's accuracy per step) is a step of the run's metric history."""
    from spot.workflow.tracking import metric_name
    for r in logged.jobs():
        job = r.data.tags["spot.job"]
        folder, record = logged.folders[job]
        steps = series_points(folder / record["series"]) if record.get("series") else {}
        for k, v in record["metrics"].items():
            name = metric_name(record["stage"], k)
            if name is None:
                continue
            if isinstance(v, list):
                steps.setdefault(name, set()).update((i, float(x)) for i, x in enumerate(v) if is_number(x))
            elif is_number(v):
                assert r.data.metrics.get(name) == float(v), (job, k, name)
        for name, points in steps.items():
            history = {(m.step, m.value) for m in logged.client.get_metric_history(r.info.run_id, name)}
            assert points <= history, (job, name, sorted(points - history)[:5])


def test_every_listed_file_downloads_through_the_server(logged, tmp_path, monkeypatch):
    """The artifacts live behind the server (mlflow-artifacts: URIs, no node mounts them): every file
    a run.json lists, its series.csv and run.json itself download equal to the job folder's."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    exp = logged.experiment
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    for r in logged.jobs():
        job = r.data.tags["spot.job"]
        folder, record = logged.folders[job]
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), (job, r.info.artifact_uri)
        for a in dict.fromkeys(["run.json", *record["artifacts"], *([record["series"]] if record.get("series") else [])]):
            local = logged.client.download_artifacts(r.info.run_id, a, str(tmp_path / r.info.run_id))
            assert Path(local).read_bytes() == (folder / a).read_bytes(), (job, a)


def test_mlflow_init_links_the_experiment_on_the_server(logged, mlflow_server):
    """`spot mlflow-init` gives the server's own address of the runs table (no `mlflow ui` to start)."""
    r = subprocess.run(["spot", "mlflow-init", "--params", "config/smoke.yaml"], cwd=logged.cwd, capture_output=True,
                       text=True, env=env(MLFLOW_TRACKING_URI=mlflow_server.uri))
    assert r.returncode == 0, r.stderr[-2000:]
    link = f"{mlflow_server.uri}/#/experiments/{logged.experiment.experiment_id}?workflowType=machine_learning"
    assert link in r.stdout, r.stdout
    status, page = mlflow_server.get("/")
    assert status == 200 and "<html" in page.lower()


def test_a_restarted_server_keeps_every_run_and_file(logged, mlflow_server, tmp_path, monkeypatch):
    """The script started again on its folder: the same PostgreSQL database and artifacts (last: it
    restarts the module's server)."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow_server.stop()
    assert mlflow_server.get("/health")[0] is None
    mlflow_server.start()
    again = logged.client.search_runs([logged.experiment.experiment_id], max_results=5000)
    assert sorted((r.info.run_id, r.info.status) for r in again) == sorted((r.info.run_id, r.info.status)
                                                                            for r in logged.runs)
    report = next(r for r in again if r.data.tags.get("spot.job") == "report")
    folder, _ = logged.folders["report"]
    local = logged.client.download_artifacts(report.info.run_id, "run.json", str(tmp_path))
    assert Path(local).read_bytes() == (folder / "run.json").read_bytes()
