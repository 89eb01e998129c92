"""Every module, function and file that the docs, the README and the code's own comments name exists.

A backticked dotted name (`spot.data.loading.verify_shards`, `spot.core.model.frozen(model, device)`) is an
object that imports, or a tag of MLflow that the code writes (`spot.stage`, `spot.env.*`). A backticked
path (`spot/workflow/layout.py`) is a file of the repository.
"""
import ast
import functools
import importlib
import re

import pytest

from tests.conftest import REPO

DOTTED = re.compile(r"`(spot(?:\.\w+)+)(\.\*)?(?:\([^`]*\))?`")
PATH = re.compile(r"`(spot/[\w/]+\.py)`")
TEXTS = sorted([*(REPO / "docs").glob("*.md"), REPO / "README.md", *(REPO / "spot").rglob("*.py"), REPO / "Snakefile",
                *(REPO / "workflow").rglob("*.smk")])


@functools.cache
def tags() -> set[str]:
    """The string constants of spot/ that are dotted spot.* names (MLflow tags), with the constant
    head of f-strings ("spot.env." of f"spot.env.{k}")."""
    found = set()
    for path in (REPO / "spot").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                node = node.values[0]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"spot[\w.]*", node.value):
                found.add(node.value)
    return found


def resolves(name: str) -> bool:
    """Whether `name` is a module of spot, or an attribute (at any depth) of one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def missing(text: str, known_tags: set[str]) -> list[str]:
    """The backticked names and paths of `text` that name nothing."""
    bad = [f"`{p}`" for p in PATH.findall(text) if not (REPO / p).is_file()]
    for name, star in DOTTED.findall(text):
        ok = any(t.startswith(f"{name}.") for t in known_tags) if star else name in known_tags or resolves(name) \
            or any(t.endswith(".") and t.count(".") > 1 and name.startswith(t) for t in known_tags)  # f"spot.env.{k}"
        bad += [] if ok else [f"`{name}{star}`"]
    return bad


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_backticked_name_exists(path):
    bad = missing(path.read_text(), tags())
    assert not bad, f"{path.relative_to(REPO)} names {', '.join(bad)}"


def test_a_stale_name_is_found():
    text = "See `spot.data.loading.verify_shards`, `spot.preflight`, `spot.env.*`, `spot/utils/live.py` and `spot/x.py`."
    assert missing(text, tags()) == ["`spot/x.py`", "`spot.preflight`"]
