"""The report reads like the paper: one bold per column (ties stated), words that fit the numbers,
a colour and a marker of its own for every series. Results tables made here, as `collect` makes them."""
import re

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from spot.report.analyse import gap_closed
from spot.report.findings import findings
from spot.report.plots import plot_budgets
from spot.report.tables import paper_table

COLUMNS = ["backbone", "prior", "oracle", "budget", "top1", "knn", "top1_init", "top1_snapped", "extra_flops"]


def results(rows: list[tuple]) -> pd.DataFrame:
    """A results table from (backbone, prior, oracle, budget, top1[, extra_flops]) rows (kNN = top1 / 2)."""
    out = []
    for backbone, prior, oracle, budget, top1, *flops in rows:
        out.append(dict(backbone=backbone, prior=prior, oracle=oracle, budget=budget, top1=top1, knn=top1 / 2,
                        top1_init=0.1 if oracle else np.nan, top1_snapped=0.2 if oracle else np.nan,
                        extra_flops=flops[0] if flops else np.nan))
    return pd.DataFrame(out, columns=COLUMNS)


def bold_rows(table: pd.DataFrame) -> dict[str, list[str]]:
    """Column header -> the rows ('Model prior') whose cell in it is bold."""
    names = [f"{r.Model} {r.Prior}".strip() for r in table.itertuples()]
    return {c: [n for n, v in zip(names, table[c]) if v.startswith("**")] for c in table.columns}


def test_one_bold_per_column_and_ties_stated():
    """At the full budget isotropic is the grid: equal values, one bold (the first row), and the tie
    stated under the table; a column with one best value has no tie line."""
    df = results([("b", "grid", False, 49, 0.743), ("b", "isotropic", False, 49, 0.743), ("b", "sobol", False, 49, 0.7),
                  ("b", "grid", False, 4, 0.30), ("b", "sobol", False, 4, 0.45), ("b", "isotropic", True, 49, 0.98)])
    table, ties = paper_table(df)
    bold = bold_rows(table)
    assert bold["49 T Acc@1"] == ["ViT grid"] and bold["49 T kNN"] == ["ViT grid"] and bold["4 T Acc@1"] == ["SPoT sobol"]
    assert sum(len(rows) for rows in bold.values()) == 4          # one bold cell per column, none on SPoT-ON
    assert ties == ["49 T Acc@1 74.30: ViT grid, SPoT isotropic", "49 T kNN 37.15: ViT grid, SPoT isotropic"]
    assert paper_table(df[df.budget == 4])[1] == []


def gap_lines(df: pd.DataFrame) -> dict[str, str]:
    """'<method> <backbone> N=<budget>' -> its line in the findings' case study 5."""
    text = findings(df, pd.DataFrame(), pd.DataFrame()).split("## 5.")[1]
    return {m[1]: m[0] for m in re.finditer(r"^- (SPoT-\w+ \w+ N=\d+): .*$", text, re.M)}


def test_gap_wording_fits_the_numbers():
    """Above SPoT-ON: 'beats SPoT-ON'; below the best fixed prior: 'falls ... below'; SPoT-ON itself
    below the best prior: no gap to close (not 'no SPoT-ON at this budget', which is for budgets
    without a search)."""
    df = results([("b", "sobol", False, 4, 0.45), ("b", "isotropic", True, 4, 0.80),
                  ("b", "placer", False, 4, 0.85, 0.06), ("b", "entropy", False, 4, 0.40, 10.0),
                  ("b", "learned", False, 4, 0.60, 0.0),
                  ("b", "sobol", False, 16, 0.70), ("b", "isotropic", True, 16, 0.65),
                  ("b", "learned", False, 16, 0.72, 0.0),
                  ("b", "sobol", False, 49, 0.70), ("b", "learned", False, 49, 0.71, 0.0)])
    lines = gap_lines(df)
    assert "beats SPoT-ON by 5.00 points (114% of the gap)" in lines["SPoT-placer b N=4"]
    assert "falls 5.00 points below the best fixed prior (-14% of the gap)" in lines["SPoT-entropy b N=4"]
    assert lines["SPoT-learned b N=4"].endswith(": 43% of the gap, +0.0% FLOPs.")
    assert "no gap to close (SPoT-ON -5.00 points from the best fixed prior); +2.00 points from that prior" in \
        lines["SPoT-learned b N=16"]
    assert "no SPoT-ON at this budget: no gap to measure" in lines["SPoT-learned b N=49"]
    assert not any("no SPoT-ON" in v for k, v in lines.items() if "N=49" not in k)
    assert len(gap_closed(df)) == 5


def test_every_series_of_the_budget_plot_has_its_own_colour_and_marker(tmp_path):
    """The default run's 12 series (8 priors, 3 label-free placements, SPoT-ON) on two backbones:
    12 colours and 12 markers in a panel, and a series looks the same in every panel."""
    priors = ["grid", "uniform", "gaussian", "sobol", "isotropic", "center", "salient", "model_salient",
              "learned", "placer", "entropy"]
    rows = [(b, p, False, n, 0.5) for b in ("b", "a") for p in priors for n in (4, 16)]
    rows += [(b, "isotropic", True, n, 0.9) for b in ("b", "a") for n in (4, 16)]
    fig = plot_budgets(results(rows), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").is_file()
    styles = []
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if line.get_label() in priors + ["isotropic (SPoT-ON)"]]
        assert len(lines) == 12
        style = {line.get_label(): (to_hex(line.get_color()), line.get_marker()) for line in lines}
        assert len({c for c, _ in style.values()}) == len({m for _, m in style.values()}) == 12, style
        styles.append(style)
    assert styles[0] == styles[1] and [ax.get_title() for ax in fig.axes[:2]] == ["b", "a"]
