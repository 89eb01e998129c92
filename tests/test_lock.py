"""requirements.lock pins what pyproject.toml asks for, with hashes; scripts/lock.sh refreshes it."""
import tomllib

from packaging.requirements import Requirement

from spot.utils.environment import LOCK_FILE, locked_versions, normalise
from tests.conftest import REPO


def declared() -> list[Requirement]:
    """Every requirement of pyproject.toml, its optional extras included."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] +
            [r for extra in project["optional-dependencies"].values() for r in extra]]


def entries() -> dict[str, list[str]]:
    """Package -> the lines of its entry in the lock file ('name==version \\', hashes, 'via' comments)."""
    out: dict[str, list[str]] = {}
    name = None
    for line in LOCK_FILE.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name = normalise(line.split("==")[0])
            out[name] = []
        elif name:
            out[name].append(line.strip())
    return out


def test_every_requirement_of_pyproject_is_locked_at_a_version_it_allows():
    pins = locked_versions()
    for req in declared():
        name = normalise(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in requirements.lock: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, pyproject.toml asks {req}: run scripts/lock.sh"


def test_the_lock_names_pyproject_as_the_reason_only_for_its_requirements():
    """A requirement removed from pyproject.toml leaves the lock stale: it still says 'via spot'."""
    direct = {name for name, lines in entries().items() if "# via spot (pyproject.toml)" in lines
              or "#   spot (pyproject.toml)" in lines}
    assert direct == {normalise(r.name) for r in declared()}


def test_every_locked_package_has_sha256_hashes_and_torch_is_the_registry_build():
    found = entries()
    assert found and all(any(line.startswith("--hash=sha256:") for line in lines) for lines in found.values())
    assert "+cpu" not in locked_versions()["torch"]           # PyPI's standard (CUDA-capable) build


def test_the_environment_names_locked_packages_installed_at_other_versions(tmp_path):
    from spot.utils.environment import lock_digest, lock_mismatches, package_version
    torch, timm = package_version("torch"), package_version("timm")
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"torch=={torch} \\\n    --hash=sha256:00\ntimm==0.0.1 \\\n    --hash=sha256:00\n"
                    "not-installed-here==1.0 \\\n    --hash=sha256:00\n")
    assert lock_mismatches(lock) == [f"timm {timm}!=0.0.1"]
    assert len(lock_digest(lock)) == 16 and lock_digest(lock) != lock_digest(LOCK_FILE)
    assert lock_digest(tmp_path / "missing.lock") is None
