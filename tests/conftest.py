import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
IMAGENET_SAMPLE = REPO / "tests" / "data"   # 8 small ImageNet photos: 5 RGB JPEGs, a grey, a CMYK, a PNG named .JPEG
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


KINDS = ("unit", "stage", "end_to_end")      # the test markers of pyproject.toml, fastest first
TRAINING = {"smoke_stages", "trained", "placed"}   # fixtures that train a model (seconds to minutes)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test gets one kind. An explicit mark wins. A test that uses the whole smoke DAG
    (`smoke_run`) is end-to-end, one that uses a fixture that trains (`TRAINING`) is a stage test, any
    other a unit test. `pytest -m unit` is then the fast loop: no fixture trains."""
    for item in items:
        kinds = [k for k in KINDS if item.get_closest_marker(k)]
        if len(kinds) > 1:
            raise pytest.UsageError(f"{item.nodeid}: marked {' and '.join(kinds)}; a test has one kind")
        if not kinds:
            kind = "end_to_end" if "smoke_run" in item.fixturenames else \
                "stage" if TRAINING & set(item.fixturenames) else "unit"
            item.add_marker(kind)


@pytest.fixture
def imagenet_sample() -> Path:
    """The folder of small `<wnid>_<name>.JPEG` test images kept in the repo."""
    return IMAGENET_SAMPLE


def smoke_config(root: Path, **changes) -> Path:
    """config/smoke.yaml with outputs and the MLflow store under `root`, plus top-level `changes`;
    written to root/params.yaml, whose path is returned."""
    import yaml
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg.update(root=str(root / "out"), mlflow={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}, **changes)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def smoke_stages(tmp_path_factory):
    """Shards, saliency maps, decoded images and the trained backbones of the smoke config (its replicates
    too), made through `spot` in-process: (params path, config dict, output root)."""
    from spot.cli import main
    from spot.workflow.config import load_config
    from spot.workflow.stage_table import geometries
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    params = smoke_config(tmp_path_factory.mktemp("smoke"))
    cfg = load_config(params)
    decode = [["decode", "--geometry", g["geometry"]] for g in geometries(cfg)]
    backbones = [["backbone", "--backbone", b] for b in cfg["backbones"]]      # replicates (seeds) included
    for argv in (["shard"], ["saliency"], *decode, *backbones):
        assert main([*argv, "--params", str(params)]) == 0, argv
    return params, cfg, Path(cfg["root"])


def linked_root(dest: Path, root: Path, *folders: str, **changes) -> Path:
    """A smoke config under `dest` whose output root links `folders` (e.g. "shards") of `root`;
    returns the params path."""
    params = smoke_config(dest, **changes)
    for f in folders:
        (dest / "out" / f).parent.mkdir(parents=True, exist_ok=True)
        (dest / "out" / f).symlink_to(root / f)
    return params


def copy_repo(dest: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) copied to `dest`, without
    dvc.lock: the record of this clone's own pipeline runs (the README's first command writes it,
    and DVC wants it committed), where a test repository starts with none."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file() and f != "dvc.lock":
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes((REPO / f).read_bytes())
    return dest


def env(**extra) -> dict:
    """This process's environment without MLFLOW_TRACKING_URI, plus `extra`."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | extra


def snakemake(cwd, *args, config="config/smoke.yaml", check=True, cores=2, **extra_env):
    r = subprocess.run(["snakemake", "--cores", str(cores), *args, "--config", f"params={config}"], cwd=cwd,
                       capture_output=True, text=True, env=env(**extra_env))
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole DAG on config/smoke.yaml through `snakemake`, once, in a repository copy:
    (repository copy, snakemake's completed process)."""
    cwd = copy_repo(tmp_path_factory.mktemp("repo"))
    return cwd, snakemake(cwd)


@contextlib.contextmanager
def running(service):
    """`service` started (`.start()`) for the block and stopped (`.stop()`) after it, also when pytest
    is sent SIGTERM (it runs no teardown then): real daemons never outlive the tests."""
    def terminated(signum, frame):
        service.stop()
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        service.start()
        yield service
    finally:
        service.stop()
        signal.signal(signal.SIGTERM, previous)
