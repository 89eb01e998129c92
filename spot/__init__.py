"""SPoT: Subpixel Placement of Tokens in Vision Transformers.

The core names are imported on first use (`spot.SPoTViT`, ...), so `spot` commands that do not
need torch start fast and each stage runs only the modules it imports.
"""
import importlib

_EXPORTS = {"extract_windows": "core.tokenizer", "sample_positions": "core.priors", "PRIORS": "core.priors",
            "SPoTViT": "core.model", "oracle_search": "methods.oracle", "OracleResult": "methods.oracle",
            "knn_predict": "core.knn"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spot' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spot.{_EXPORTS[name]}"), name)
