"""Kills and hostile input through the real engines: a killed Snakemake's plain rerun finishes the
job, a renamed params file reruns nothing, a deleted folder reruns its job and its consumers, a
params file that is not a mapping stops Snakemake in one line naming it. The jobs are the smoke
config's cheapest (shard, saliency), in a repository copy."""
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


def test_a_deleted_folder_reruns_its_job_and_its_consumers(sharded, tmp_path):
    cwd = tmp_path / "repo"
    shutil.copytree(sharded, cwd, symlinks=True)
    shutil.rmtree(cwd / "out" / "shards")
    jobs = scheduled(cwd)
    assert "Missing output files" in jobs.get("out/shards", ""), jobs
    assert "out/saliency" in jobs, jobs


@pytest.mark.parametrize("text, says", [("a: [1, 2\n", "not valid YAML"), ("", "not a YAML mapping"),
                                        ("- 1\n- 2\n", "not a YAML mapping")])
def test_a_params_file_that_is_not_a_mapping_stops_snakemake_in_one_line_naming_it(sharded, text, says):
    (sharded / "config" / "bad.yaml").write_text(text)
    r = snakemake(sharded, "-n", config="config/bad.yaml", check=False)
    assert r.returncode != 0
    assert r.stderr.splitlines()[-1].startswith(f"snakemake: error: config/bad.yaml: {says}"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
