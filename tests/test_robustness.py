"""Kills and hostile input through the real engines: a killed Snakemake's rerun (README:
Troubleshooting) finishes the job, a renamed params file reruns nothing, a deleted folder reruns its job and its consumers, a
params file that is not a mapping stops Snakemake in one line naming it. The jobs are the smoke
config's cheapest (shard, saliency), in a repository copy, or its whole DAG (`smoke_run`)."""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import copy_repo, env, snakemake

pytestmark = pytest.mark.end_to_end
SMOKE = "config/smoke.yaml"
SALIENCY = "out/saliency/run.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A repository copy where Snakemake made the smoke config's shards and saliency maps."""
    cwd = copy_repo(tmp_path_factory.mktemp("robust"))
    snakemake(cwd, SALIENCY, cores=1)
    return cwd


def scheduled(cwd, *args, config=SMOKE) -> dict[str, str]:
    """Output folder -> reason of every job a Snakemake dry run would run."""
    r = snakemake(cwd, "-n", *args, config=config)
    return dict(re.findall(r"output: (\S+)/run\.json[^\n]*\n(?:.*\n)*?\s+reason: ([^\n]*)", r.stdout + r.stderr))


def test_a_renamed_params_file_with_the_same_values_reruns_nothing(sharded):
    (sharded / "config" / "renamed.yaml").write_text((sharded / SMOKE).read_text())
    assert scheduled(sharded, SALIENCY, config="config/renamed.yaml") == {}
    assert scheduled(sharded, SALIENCY) == {}


def test_a_deleted_folder_reruns_its_job_and_its_consumers(smoke_run, tmp_path):
    """After the whole smoke DAG, `rm -rf <root>/oracle/spot-a`: the oracle's gathering job and every
    job that reads its folder rerun (Snakemake alone would not make a missing file that no job it
    runs needs)."""
    cwd = tmp_path / "repo"
    shutil.copytree(smoke_run[0], cwd, symlinks=True)
    assert scheduled(cwd) == {}
    shutil.rmtree(cwd / "out" / "oracle" / "spot-a")
    jobs = scheduled(cwd)
    assert "Missing output files" in jobs.get("out/oracle/spot-a/4", ""), jobs
    assert {"out/transfer/spot-a/grid-b/4", "out/analysis/spot-a/4", "out/report"} <= set(jobs), jobs


def test_after_a_killed_snakemake_the_plain_rerun_finishes_the_job(sharded, tmp_path):
    """kill -9 of Snakemake while its job runs: the job finishes on its own, Snakemake's marker says
    its output is incomplete. After `snakemake --unlock`, the command the README's Troubleshooting
    names (`--rerun-incomplete`) reruns the job instead of stopping."""
    cwd = tmp_path / "repo"
    shutil.copytree(sharded, cwd, symlinks=True)
    incomplete = cwd / ".snakemake" / "incomplete"
    p = subprocess.Popen(["snakemake", "--cores", "1", "--forcerun", "shard", "out/shards/run.json", "--config",
                          f"params={SMOKE}"], cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (incomplete.is_dir() and any(incomplete.iterdir())):
        assert p.poll() is None and time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)                 # (Snakemake removed the job's old output before the marker)
    p.wait()
    while not (cwd / "out/shards/run.json").exists():
        assert time.monotonic() < deadline, "the orphaned job never finished"
        time.sleep(0.5)
    time.sleep(2)                                  # (its process exits after run.json)
    snakemake(cwd, "--unlock")
    r = snakemake(cwd, "out/shards/run.json", "--rerun-incomplete", cores=1)
    assert "1 of 1 steps (100%) done" in r.stdout + r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("text, says", [("a: [1, 2\n", "not valid YAML"), ("", "not a YAML mapping"),
                                        ("- 1\n- 2\n", "not a YAML mapping")])
def test_a_params_file_that_is_not_a_mapping_stops_snakemake_in_one_line_naming_it(sharded, text, says):
    (sharded / "config" / "bad.yaml").write_text(text)
    r = snakemake(sharded, "-n", config="config/bad.yaml", check=False)
    assert r.returncode != 0
    assert r.stderr.splitlines()[-1].startswith(f"snakemake: error: config/bad.yaml: {says}"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
