"""The report reads like the paper: one bold per column (ties stated), words that fit the numbers,
a colour and a marker of its own for every series. Results tables made here, as `collect` makes them."""
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from spot.report.evidence import Evidence, with_intervals
from spot.report.findings import findings
from spot.report.plots import plot_budgets
from spot.report.stats import crossed_interval, run_prior
from spot.report.summary import gap_closed, metric_rows
from spot.report.tables import paper_table, tables_markdown
from spot.utils.io import write_json
from spot.workflow.config import load_config

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
    assert ties == ["49 T Acc@1 74.3: ViT grid, SPoT isotropic", "49 T kNN 37.1: ViT grid, SPoT isotropic"]
    assert table["49 T Acc@1"].iloc[0] == "**74.3 ±n/a**"          # no per-image data: no interval
    assert paper_table(df[df.budget == 4])[1] == []


def evidence(cells: dict[tuple, float], n: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, Evidence]:
    """Results and per-image evidence from {(backbone, prior, oracle, budget): accuracy}: each row's
    images 0/1 with exactly that accuracy, shuffled independently (so rows share no per-image pattern)."""
    rng, keys = np.random.default_rng(seed), [f"img{i:05d}" for i in range(n)]
    ev, rows = Evidence(), []
    for (b, prior, oracle, budget), acc in cells.items():
        v = rng.permutation(np.arange(n) < round(acc * n)).astype(float)
        ev.rows[b, prior, oracle, budget] = pd.DataFrame(dict(correct=v, knn_correct=v) | (
            dict(correct_init=rng.permutation(v), snapped_correct=v) if oracle else {}), index=keys)
        rows.append((b, prior, oracle, budget, acc, 0.1) if prior in ("placer", "learned") else
                    (b, prior, oracle, budget, acc))
    return results(rows), ev


def test_intervals_of_results_match_the_binomial_standard_error():
    """with_intervals: at n = 4000 every interval's half-width is 1.96 sqrt(p(1-p)/n) within 0.15
    points, for p from 0.1 to 0.9; the DVC metrics carry the point values in percent."""
    df, ev = evidence({("b", p, False, 4): a for p, a in (("grid", 0.1), ("sobol", 0.5), ("center", 0.9))}, n=4000)
    out = with_intervals(df, ev, seed=0, resamples=2000)
    half = (out.top1_high - out.top1_low) / 2
    assert np.allclose(half, 1.96 * np.sqrt(out.top1 * (1 - out.top1) / 4000), atol=0.0015)
    assert out.top1_init_low.isna().all()                      # fixed priors have no start accuracy
    assert metric_rows(out, pd.DataFrame())["b/grid.json"] == {"4": {"top1": 10.0, "knn": 5.0}}      # percent


def test_every_table_is_in_percent_with_intervals_and_names_its_best_prior():
    """tables.md of constructed per-image data: the transfer, label-free and placer-transfer tables give
    accuracies as 'x ±h', gains as '+d [low, high]' points and the gap closed as 'g ±h' %, no fraction; the
    label-free table says how its best fixed prior is chosen and that findings.md chooses differently."""
    cells = {(b, p, False, 4): a for b in ("a", "b") for p, a in (("grid", 0.40), ("sobol", 0.55), ("isotropic", 0.45),
                                                               ("learned", 0.60), ("placer", 0.70))}
    df, ev = evidence(cells | {(b, "isotropic", True, 4): 0.90 for b in ("a", "b")}, n=1000)
    df = with_intervals(df, ev, seed=0, resamples=500)
    keys = ev.rows["b", "grid", False, 4].index
    rng = np.random.default_rng(1)
    ev.transfer["a", "b", 4] = pd.Series(rng.permutation(np.arange(1000) < 800).astype(float), index=keys)
    ev.placer_transfer["a", "b", 4] = pd.Series(rng.permutation(np.arange(1000) < 650).astype(float), index=keys)
    trans = pd.DataFrame([dict(src="a", dst="b", budget=4, gain=0.35, n=1000, top1_prior=0.45, top1_src_oracle=0.9,
                               top1_transfer=0.8)])
    ptrans = pd.DataFrame([dict(src="a", dst="b", budget=4, top1=0.65, top1_own=0.7, gain=-0.05)])
    text = tables_markdown(df.assign(replicate_of=None), trans, gap_closed(df), ptrans, [{}], None, ev, "isotropic",
                           seed=0, resamples=500)
    assert not re.search(r"\b0\.\d{3}", text), "a fraction in tables.md"
    extra = text[text.index("## Transfer of oracle placements"):]
    rows = [line for line in extra.splitlines() if re.match(r"\| [ab] ", line)]
    assert len(rows) == 1 + 4 + 1                                   # transfer, 2 methods x 2 backbones, placer
    accuracy, points = r"\d+\.\d ±\d+\.\d", r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]"
    assert re.search(rf"\| {accuracy} +\| {accuracy} +\| 80\.0 ±\d\.\d +\| \+35\.0 \[\+3\d\.\d, \+3\d\.\d\] +\|$", rows[0])
    placer = next(line for line in rows if "SPoT-placer" in line and line.startswith("| b "))
    assert "sobol" in placer and re.search(r"\| 43 ±\d+ +\|", placer)         # (70 - 55) / (90 - 55)
    assert re.search(r"\| 65\.0 ±\d\.\d +\| 70\.0 ±\d\.\d +\| -5\.0 \[-\d\.\d, [+-]\d\.\d\] +\|$", rows[-1]), rows[-1]
    assert all(re.search(accuracy, line) for line in rows) and len(re.findall(points, extra)) == 2
    assert "Best fixed prior: the fixed prior with the highest top-1 on all val images" in text
    assert "findings.md instead chooses it on 30% of the images" in text


def verdicts(text: str) -> dict[str, str]:
    """findings.md's lines as {subject: verdict and level}."""
    return {m[1]: m[2] for m in re.finditer(r"^- (.*?): (?:\w+ vs \w+ )?[+-][\d.]+ \[.*?\] points(?: \(.*?\))?: "
                                             r"(.*?)[.;]?$", text, re.M)}


def test_findings_classify_each_claim_and_a_close_winner_is_not_distinguishable():
    """Constructed per-image data on one training run: at 4 tokens sobol beats grid by 15 points
    (holds); at 16 tokens the 'winner' center is 1 point above grid on independent images (not
    distinguishable); the placer falls 10 points below the best fixed prior (reversed). Each claim on
    a single run says so; fetched weights are one fixed network."""
    cells = {("b", "grid", False, 4): 0.40, ("b", "sobol", False, 4): 0.55,
             ("b", "isotropic", False, 4): 0.45, ("b", "grid", False, 16): 0.70,
             ("b", "center", False, 16): 0.71, ("b", "sobol", False, 16): 0.60,
             ("b", "isotropic", False, 16): 0.61, ("b", "isotropic", True, 4): 0.90,
             ("b", "placer", False, 4): 0.45, ("b", "learned", False, 4): 0.70}
    df, ev = evidence(cells)
    text, claims = findings(df, ev, seed=0, resamples=1000)
    lines = verdicts(text)
    assert lines["b, 4 tokens: best off-grid prior vs grid"] == ("holds at n = 1000 (one training run); "
                                                                 "candidates that beat every opponent: sobol")
    assert lines["b, 16 tokens: best off-grid prior vs grid"].startswith("not distinguishable at n = 1000 (one")
    assert lines["SPoT-placer b N=4 vs the best fixed prior"].startswith("reversed at n = 1000 (one training run)")
    assert lines["what seeing the image adds, b N=4: placer vs learned prior"].startswith("reversed")
    assert "chosen on 30% of the images" in text and "gap closed" in text
    assert set(claims.level) == {"one training run"} and len(claims) == 8
    assert all(t in text and "(one training run)" in t for t in claims.text)
    fetched, _ = findings(df, ev, fixed={"b"}, seed=0, resamples=1000)
    assert "(fixed weights)" in fetched and not re.search(r"^- .*\(one training run\)", fetched, re.M)


def replicated(effects: dict[str, list[float]], n: int = 1000) -> tuple[pd.DataFrame, Evidence, dict]:
    """Backbone 'b' with replicates 'b-s1', 'b-s2' at 16 tokens: grid at 50 %, and each other prior at
    50 % + its effect in run 0, 1, 2; images drawn independently."""
    cells = {}
    for s, b in enumerate(("b", "b-s1", "b-s2")):
        cells[b, "grid", False, 16] = 0.5
        for prior, eff in effects.items():
            cells[b, prior, False, 16] = 0.5 + eff[s]
    df, ev = evidence(cells, n=n)
    return df, ev, {"b": ["b", "b-s1", "b-s2"]}


def test_a_seed_effect_makes_a_recipe_claim_not_distinguishable():
    """Every run alone shows sobol above the grid (7 to 21 points, each holding on its images), but
    the runs disagree: over runs and images it is not distinguishable, and the claim is a recipe's."""
    df, ev, replicas = replicated({"sobol": [0.07, 0.14, 0.21]})
    one = {b: verdicts(findings(df[df.backbone == b], ev, seed=0, resamples=1000)[0]) for b in replicas["b"]}
    assert all(v["b, 16 tokens: best off-grid prior vs grid".replace("b,", f"{b},")].startswith("holds") for b, v in
               one.items())
    text, claims = findings(df, ev, replicas, seed=0, resamples=1000)
    assert verdicts(text)["b, 16 tokens: best off-grid prior vs grid"] == "not distinguishable over 3 runs x n = 1000"
    assert claims.level.tolist() == ["3 training runs"]


def test_runs_that_agree_make_a_recipe_claim_hold():
    df, ev, replicas = replicated({"sobol": [0.12, 0.13, 0.12], "center": [0.11, 0.12, 0.12]})
    text, _ = findings(df, ev, replicas, seed=0, resamples=1000)
    line = verdicts(text)["b, 16 tokens: best off-grid prior vs grid"]
    assert line.startswith("holds over 3 runs x n = 1000; candidates that beat every opponent: ") and "sobol" in line \
        and "center" in line


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


def test_claims_over_runs_are_moderated_by_the_spread_of_all_of_them():
    """Five claims over 3 runs: findings.md states the prior fitted to their run spreads, and a claim's
    interval is its crossed interval under that prior, not under its own 3 runs alone."""
    rng = np.random.default_rng(3)
    cells = {}
    for b in ("b", "b-s1", "b-s2"):
        for n in (4, 16, 49):
            cells[b, "grid", False, n] = 0.5
            cells[b, "sobol", False, n] = 0.6 + 0.03 * rng.standard_normal()
            cells[b, "center", False, n] = 0.55 + 0.03 * rng.standard_normal()
    df, ev = evidence(cells)
    text, claims = findings(df, ev, {"b": ["b", "b-s1", "b-s2"]}, seed=0, resamples=1000)
    assert "each claim's spread over runs is moderated by what all of them show together: a run sd of" in text
    per_run = {(p, n): np.stack([ev.row(r, p, n)["correct"] for r in ("b", "b-s1", "b-s2")])
               for p in ("grid", "sobol", "center") for n in (4, 16, 49)}
    own = [crossed_interval(per_run["sobol", n] - per_run["grid", n]) for n in (4, 16, 49)]
    own += [crossed_interval(per_run["center", n] - per_run["sobol", n]) for n in (4, 49)]
    prior = run_prior([iv.run_var for iv in own], [2] * 5)
    line = claims[claims.subject == "b, 16 tokens: best off-grid prior vs grid"].iloc[0]
    moderated = crossed_interval(per_run["sobol", 16] - per_run["grid", 16], confidence=line.confidence, prior=prior)
    assert (line.low, line.high) == pytest.approx((moderated.low, moderated.high))
    assert (line.low, line.high) != pytest.approx((own[1].low, own[1].high), abs=1e-4)


def test_dvc_metrics_show_of_the_default_sweep_fits_160_columns_in_percent(tmp_path):
    """The DVC metrics of every backbone (replicates included), prior, label-free placement, SPoT-ON and
    transfer of params.yaml, through real `dvc metrics show`: lines of at most 160 characters,
    accuracies in percent with one decimal, and each backbone before its replicates."""
    cfg = load_config("params.yaml")
    specs, budgets = cfg["backbones"], cfg["eval"]["budgets"]
    rows = [(b, p, False, n, 0.73003) for b in specs for p in cfg["eval"]["priors"] for n in budgets]
    rows += [(b, m, False, n, 0.1) for b in specs for m in cfg["placement"]["methods"] for n in budgets]
    rows += [(b, cfg["oracle"]["prior"], True, n, 0.9) for b in specs for n in cfg["oracle"]["budgets"]]
    df = results(rows).assign(replicate_of=lambda d: d.backbone.map(lambda b: specs[b].get("replicate_of")),
                              seed=lambda d: d.backbone.map(lambda b: specs[b]["seed"]))
    primary = [b for b in specs if not specs[b].get("replicate_of")]
    trans = pd.DataFrame([dict(src=s, dst=d, budget=n, top1_transfer=0.5) for s in primary for d in primary
                          for n in cfg["transfer"]["budgets"]])
    ptrans = pd.DataFrame([dict(src=s, dst=d, budget=n, top1=0.5) for s in primary for d in primary if s != d
                           for n in cfg["placement"]["transfer"]])
    for name, values in metric_rows(df, trans, ptrans).items():
        write_json(tmp_path / "metrics" / name, values)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
    (tmp_path / "dvc.yaml").write_text("metrics:\n- metrics\n")
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert len(shown) == 1 + len(list((tmp_path / "metrics").rglob("*.json"))) > 100
    assert max(map(len, shown)) <= 160, max(shown, key=len)
    assert shown[0].split() == ["Path", *(f"{n:02d}.{c}" for n in budgets for c in ("knn", "top1"))]
    assert shown[1].split()[1:] == ["36.5", "73.0"] * 3            # 0.73003 (kNN: half): percent, one decimal
    paths = [line.split()[0] for line in shown[1:]]
    first = {folder: min(i for i, p in enumerate(paths) if p.startswith(f"metrics/{folder}/"))
             for folder in ("spot/s0", "spot/s1", "spot/s2", "spot-small/s1", "spot-small/s2")}
    assert first["spot/s0"] < first["spot/s1"] < first["spot/s2"] and first["spot-small/s1"] < first["spot-small/s2"]
