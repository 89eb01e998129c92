"""Plain records (JSON values): normalised, flattened to dotted keys, digested."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def plain(obj):
    """`obj` as JSON would give it back: dicts, lists, str, int, float, bool, None (tuples become lists)."""
    def default(o):
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "item"):                        # numpy / torch scalars
            return o.item()
        raise TypeError(f"{type(o).__name__} {o!r} is not a plain value")
    return json.loads(json.dumps(obj, default=default))


def digest(obj) -> str:
    """The first 16 hex digits of the sha256 of `obj`'s canonical JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists, empty dicts and other values are leaves."""
    out = {}
    for k, v in tree.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def as_list(value) -> list:
    """`value` if it is a list, else `[value]`: an input that is one folder or a list of them."""
    return value if isinstance(value, list) else [value]
