"""Where every pipeline output lives: the one owner of paths under the config's `root`.

Each kind of output is a folder named by a pattern of wildcards; a folder is complete when it holds
`run.json` (see `spot.workflow.outputs`). Snakemake uses the patterns as they are, the CLI and DVC fill them.
"""
from __future__ import annotations

import re
from pathlib import Path

FOLDERS = {
    "shards": "shards",
    "saliency": "saliency",
    "decoded": "decoded/{geometry}",
    "backbone": "backbones/{backbone}",
    "checkpoint": "checkpoints/{backbone}",
    "eval": "eval/{backbone}/{prior}/{budget}",
    "oracle-part": "oracle-parts/{backbone}/{budget}/{part}",
    "oracle": "oracle/{backbone}/{budget}",
    "transfer": "transfer/{src}/{dst}/{budget}",
    "analysis": "analysis/{backbone}/{budget}",
    "model-saliency": "model-saliency/{backbone}",
    "learned": "learned/{backbone}/{budget}",
    "placer": "placer/{backbone}/{budget}",
    "entropy": "entropy/{backbone}/{budget}",
    "placer-transfer": "placer-transfer/{src}/{dst}/{budget}",
    "reduction": "reduction/{backbone}",
    "report": "report",
    "logs": "logs",
}


def wildcards(kind: str) -> list[str]:
    """The wildcards of folder kind `kind`, in the folder's order."""
    return re.findall(r"{(\w+)}", FOLDERS[kind])


class Layout:
    """Paths under `root`: `layout("eval", backbone="spot", prior="grid", budget=4)` is
    `<root>/eval/spot/grid/4`; `layout.pattern("eval")` keeps the `{wildcards}`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __call__(self, kind: str, **wildcards) -> Path:
        return self.root / FOLDERS[kind].format(**wildcards)

    def pattern(self, kind: str, **fixed) -> str:
        """The folder pattern of `kind`, the wildcards in `fixed` filled in."""
        return str(self.root / FOLDERS[kind].format(**{w: fixed.get(w, f"{{{w}}}") for w in wildcards(kind)}))

    def log(self, stage: str, **wildcards) -> Path:
        """`<root>/logs/<stage>/<w1>/<w2>....log`, or `<root>/logs/<stage>.log` without wildcards."""
        return self.root / "logs" / ("/".join([stage, *map(str, wildcards.values())]) + ".log")
