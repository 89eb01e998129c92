"""MLflow logging of run records: idempotent per job, never fatal, synced later."""
import socket

import pytest

from spot import tracking
from spot.utils import write_json, write_run_record


def record(d, job="evaluate/b/uniform/4", top1=0.5):
    write_json(d / "metrics.json", {"top1": top1})
    write_run_record(d, stage="evaluate", job=job, params=dict(backbone="b", prior="uniform", budget=4),
                     metrics=dict(top1=top1), artifacts=["metrics.json"])
    return d


def runs(uri, name="exp"):
    c = tracking.client(uri)
    return c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=100)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_log_is_idempotent_and_a_changed_record_replaces_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    d = record(tmp_path / "r")
    first = tracking.log_record(d, "exp", uri)
    assert tracking.log_record(d, "exp", uri) == first
    (r,) = runs(uri)
    assert r.data.metrics["top1"] == 0.5 and r.data.params["prior"] == "uniform"
    assert r.data.tags["spot.job"] == "evaluate/b/uniform/4" and "code_version" in r.data.params
    assert sorted(a.path for a in tracking.client(uri).list_artifacts(first)) == ["metrics.json", "run.json"]
    record(d, top1=0.75)
    second = tracking.log_record(d, "exp", uri)
    (r,) = runs(uri)
    assert second != first and r.info.run_id == second and r.data.metrics["top1"] == 0.75


def test_unreachable_server_never_fails_and_sync_logs_everything_later(tmp_path):
    dirs = [record(tmp_path / "out" / f"r{i}", job=f"evaluate/b/uniform/{i}") for i in range(3)]
    with pytest.warns(UserWarning, match="mlflow-sync"):
        assert tracking.safe_log(dirs[0], "exp", f"http://127.0.0.1:{closed_port()}") is None
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ids = tracking.sync(tmp_path / "out", "exp", uri)
    assert len(set(ids)) == 3 and len(runs(uri)) == 3
    assert tracking.sync(tmp_path / "out", "exp", uri) == ids       # a second sync adds nothing


def test_tracking_uri_environment_overrides_params(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}) == "http://elsewhere:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri({"mlflow": {"tracking_uri": "sqlite:///x.db"}}) == "sqlite:///x.db"
