"""The wheel holds every file of the package (the params schema, the report's templates), so an installed
`spot` works outside a checkout."""
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO, copy_repo, env


@pytest.mark.stage
def test_the_wheel_holds_every_file_of_spot_and_validates_params_outside_a_checkout(tmp_path):
    repo = copy_repo(tmp_path / "repo")            # pip builds in the source tree (build/, spot.egg-info/)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(repo),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("spot-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    files = {p.relative_to(repo).as_posix() for p in (repo / "spot").rglob("*") if p.is_file()}
    assert sorted(files - names) == []
    assert "License-Expression: MIT" in metadata.splitlines()

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    done = subprocess.run([sys.executable, "-m", "spot.cli", "validate", "--params", "params.yaml"], cwd=tmp_path / "run",
                          env=env(PYTHONPATH=str(tmp_path / "site")), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("params.yaml: ok"), done.stderr[-2000:]
