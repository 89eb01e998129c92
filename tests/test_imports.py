"""The package's layers import in one direction only (every import statement, function-local ones too).

A module of layer L (the folder under spot/, or cli / __init__) may import spot modules of these layers:

    utils     -> (none)                          helpers every layer may use
    core      -> (none)                          torch and timm maths
    methods   -> core                            torch and timm maths
    data      -> core, utils
    training  -> core, methods, data, utils
    report    -> core, methods, data, training, utils
    stages    -> core, methods, data, training, report, utils (a stage never imports another stage;
                 the package's __init__, the Record type, is shared)
    workflow  -> core, methods, data, training, utils (it names stage entry points as strings only)
    cli       -> workflow, report, utils         (report: `spot verdicts` compares two reports)
    __init__  -> core, methods                   the public API

and its own layer. core and methods import the standard library, torch and timm only: no files,
no config, no workflow.
"""
import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ALLOWED = {
    "utils": set(),
    "core": set(),
    "methods": {"core"},
    "data": {"core", "utils"},
    "training": {"core", "methods", "data", "utils"},
    "report": {"core", "methods", "data", "training", "utils"},
    "stages": {"core", "methods", "data", "training", "report", "utils"},
    "workflow": {"core", "methods", "data", "training", "utils"},
    "cli": {"workflow", "report", "utils"},
    "__init__": {"core", "methods"},
}
MATHS_PACKAGES = {"torch", "timm"}
MODULES = sorted((REPO / "spot").rglob("*.py"))


def name_of(path: Path, root: Path = REPO) -> list[str]:
    """spot/stages/oracle.py -> ["spot", "stages", "oracle"]; a package's __init__.py is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: Path, root: Path = REPO) -> list[str]:
    """Every module that `path` imports, as dotted names (relative imports resolved)."""
    package = name_of(path, root) if path.name == "__init__.py" else name_of(path, root)[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
            found += [base.strip(".")] + [f"{base.strip('.')}.{a.name}" for a in node.names]
    return found


def layer(path: Path) -> str:
    """The folder under spot/ that holds `path`, else its name (cli, __init__)."""
    return path.relative_to(REPO / "spot").parts[0].removesuffix(".py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_a_module_imports_only_the_layers_below_it(path):
    me, own = name_of(path), layer(path)
    for module in imports(path):
        parts = module.split(".")
        if parts[0] != "spot" or len(parts) == 1:
            continue
        other = parts[1]
        assert other == own or other in ALLOWED[own], f"{path.relative_to(REPO)}: {own} imports {module}"
        stage_module = len(parts) > 2 and (REPO / "spot" / "stages" / f"{parts[2]}.py").exists()
        if own == other == "stages" and len(me) > 2 and stage_module:
            assert parts[2] == me[2], f"{path.relative_to(REPO)}: a stage imports another stage, {module}"


@pytest.mark.parametrize("path", [p for p in MODULES if layer(p) in ("core", "methods")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_core_and_methods_need_torch_and_timm_only(path):
    for module in imports(path):
        top = module.split(".")[0]
        assert top in sys.stdlib_module_names | MATHS_PACKAGES | {"spot"}, f"{path.relative_to(REPO)} imports {module}"


def test_the_walk_sees_function_local_and_relative_imports(tmp_path):
    """An import inside a function counts, and `from ..x import y` in spot/core/m.py is spot.x.y."""
    module = tmp_path / "spot" / "core" / "m.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..workflow import layout\n    import spot.data.shards\n")
    assert set(imports(module, tmp_path)) == {"spot.workflow", "spot.workflow.layout", "spot.data.shards"}


def test_the_public_api_comes_from_this_tree():
    """spot.SPoTViT, spot.oracle_search, ...: each name is there, from a module of this repository."""
    import spot
    for name in spot.__all__:
        assert getattr(spot, name) is not None
        source = Path(sys.modules[f"spot.{spot._EXPORTS[name]}"].__file__).resolve()
        assert source.is_relative_to(REPO / "spot"), (name, source)


def module_of(name: str) -> str | None:
    """The spot module a dotted import name lands in ('spot.workflow.tracking.connect' -> its module)."""
    parts = name.split(".")
    while parts:
        path = REPO.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def test_no_module_imports_itself_through_others():
    """The graph of spot's imports, function-local ones too (so none dodges a circle), has no cycle."""
    graph = {".".join(name_of(p)): {m for i in imports(p) if i.startswith("spot.") and (m := module_of(i))}
             for p in MODULES}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(" -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            path.append(module)
            for other in sorted(graph.get(module, ())):
                if other != module and not module.startswith(other + "."):   # a module's own package: its __init__
                    visit(other)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)
