"""Verdict stability: the claims of two runs' findings.csv (`spot.report.findings.Claim`) side by side.

Two runs of the same params on other CPU kernels, or on another machine, redraw every training the way
another seed does. Their cells differ; a finding about a training recipe should not: a claim moves
when its verdict differs, and flips when it goes from holds to reversed or back."""
from __future__ import annotations

import pandas as pd

from spot.report.stats import VERDICTS

KEY = ["case", "subject"]


def compare(base: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """A row per claim of either run: case, subject, level, verdict_base, verdict_other (NaN where a
    run lacks it), the two differences (`value_*`, fractions) and `change`: 'same', 'moved' (between
    not distinguishable and a verdict), 'flipped' (holds <-> reversed) or 'missing'."""
    both = base.merge(other, on=KEY, how="outer", suffixes=("_base", "_other"))
    nd = VERDICTS[2]

    def change(r) -> str:
        a, b = r.verdict_base, r.verdict_other
        if pd.isna(a) or pd.isna(b):
            return "missing"
        return "same" if a == b else "moved" if nd in (a, b) else "flipped"
    both["level"] = both.level_base.fillna(both.level_other)
    both["change"] = both.apply(change, axis=1)
    return both[[*KEY, "level", "verdict_base", "verdict_other", "value_base", "value_other", "change"]]


def summary(table: pd.DataFrame) -> str:
    """One line: how many claims kept, moved, flipped or lack a partner, and of the claims over
    training runs how many moved."""
    n = table.change.value_counts()
    recipe = table[~table.level.str.startswith(("one", "fixed"))]
    return (f"{len(table)} claims: {n.get('same', 0)} same, {n.get('moved', 0)} moved between not distinguishable and "
            f"a verdict, {n.get('flipped', 0)} flipped (holds <-> reversed), {n.get('missing', 0)} in one run only; "
            f"of the {len(recipe)} claims over training runs {int((recipe.change != 'same').sum())} changed")
