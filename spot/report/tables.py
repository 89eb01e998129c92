"""Tables: the paper's table per backbone (pandas pivot), the transfer and gap tables (pandas
`to_markdown`), and the line naming the environments, as tables.md (`templates/tables.md.j2`).
Every accuracy is in percent with half its 95% bootstrap interval over the val images (`49.0 ±3.1`),
every difference in percent points with its paired interval (`+12.3 [+8.1, +16.4]`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from spot.methods import LABEL_FREE
from spot.report.evidence import Evidence
from spot.report.render import render
from spot.report.stats import (
    accuracy_interval,
    align,
    gap_closed_interval,
    paired_difference,
    percent_pm,
    percent_points,
    percent_sd,
)
from spot.report.summary import PAPER_ORDER, model_name

TRANSFER = ("SPoT-ON's positions found with backbone `src`, fed to backbone `dst` for the same images, against `dst` "
            "on the prior SPoT-ON starts from ({start}); top-1 in %, gain in percent points with its paired 95% "
            "interval over the val images.")
GAPS = ("Best fixed prior: the fixed prior with the highest top-1 on all val images of the backbone and budget (the "
        "paper's choice; its row in the backbone's table). findings.md instead chooses it on 30% of the images and "
        "compares on the rest, once per backbone over its training runs, so it may name another prior and a "
        "different gap. Gap closed: (method - prior) / (SPoT-ON - prior) in %, ± half its 95% bootstrap interval "
        "over the val images for this choice (±n/a: the gap holds 0 in some resample, unbounded; 'no gap': SPoT-ON "
        "does not beat the prior); extra FLOPs: the placement's cost over the backbone's at that budget.")
PLACER_TRANSFER = ("The placer trained for backbone `src` placing the tokens of backbone `dst`, against `dst`'s own "
                   "placer; top-1 in %, gain in percent points with its paired 95% interval over the val images.")
INTRO = ("Top-1 and kNN accuracy (%) per token budget, ± half the width of the 95% bootstrap interval over the val "
         "images. SPoT-ON rows use labels (an oracle upper bound); bold: the best non-oracle value per column (ties: "
         "the first, and named under the table); a bold value need not beat the next one beyond noise (findings.md).")


def paper_table(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One backbone's rows of `results` in the paper's layout: rows model . prior . oracle, Acc@1 and
    kNN per budget in percent, as strings. The best non-oracle value of each column is in bold, once:
    where values tie (as shown, to 0.01), the first row in the table's order. Returns the table and
    a line per tie ('4 T Acc@1 20.0: SPoT isotropic, SPoT-placer'). Each value is `49.0 ±3.1`, the ±
    half its interval (`<column>_low`, `_high`; '±n/a' without them)."""
    rank = {p: i for i, p in enumerate(PAPER_ORDER)}
    df = df.assign(**{f"{c}_{b}": df.get(f"{c}_{b}", float("nan")) for c in ("top1", "knn") for b in ("low", "high")})
    values = df.pivot(index=["prior", "oracle"], columns="budget",
                      values=["top1", "knn", "top1_low", "top1_high", "knn_low", "knn_high"])
    rows = sorted(values.index, key=lambda r: (r[1], r[0] in LABEL_FREE, rank.get(r[0], len(rank)), r[0]))
    columns = [(c, n) for n in sorted(df.budget.unique()) for c in ("top1", "knn")]
    shown = pd.DataFrame({col: ["" if pd.isna(values.at[r, col]) else percent_pm(
        values.at[r, col], values.at[r, (f"{col[0]}_low", col[1])], values.at[r, (f"{col[0]}_high", col[1])])
        for r in rows] for col in columns}, index=pd.MultiIndex.from_tuples(rows))
    names = [f"{n} T {'Acc@1' if c == 'top1' else 'kNN'}" for c, n in columns]
    ties = []
    for name, col in zip(names, columns):
        printed = {r: float(shown.at[r, col].split()[0]) for r in rows if not r[1] and shown.at[r, col]}  # non-oracle
        if not printed:
            continue
        top = max(printed.values())
        best = [r for r, v in printed.items() if v == top]
        shown.at[best[0], col] = f"**{shown.at[best[0], col]}**"
        if len(best) > 1:
            ties.append(f"{name} {top:.1f}: " + ", ".join(row_name(*r) for r in best))
    shown.columns = names
    labels = pd.DataFrame([(model_name(p, o), "" if p in LABEL_FREE else p, "✓" if o else "") for p, o in rows],
                          columns=["Model", "Prior", "Oracle"], index=shown.index)
    return pd.concat([labels, shown], axis=1), ties


def row_name(prior: str, oracle: bool) -> str:
    """'SPoT isotropic', 'ViT grid', 'SPoT-placer': a row of `paper_table` in words."""
    return " ".join(filter(None, (model_name(prior, oracle), "" if prior in LABEL_FREE else prior)))


def describe_environments(envs: list[dict]) -> str:
    """One line naming the machines and software of `envs` (run.json `environment`s): each value,
    with its job count where the jobs differ ('threads 1 (30 jobs) / 2 (3 jobs)')."""
    def values(key, fmt=str):
        counts = pd.Series([fmt(e.get(key)) for e in envs]).value_counts(sort=False)
        if len(counts) == 1:
            return counts.index[0]
        return " / ".join(f"{v} ({n} jobs)" for v, n in counts.items())
    software = ", ".join(f"{k} {values(k)}" for k in ("python", "torch", "timm", "numpy", "mlflow", "snakemake", "dvc"))
    lock = values("lock_mismatches", lambda m: "as installed" if not m else "installed: " + ", ".join(m))
    return (f"Computed on {values('device')} (CPU {values('cpu')}, torch kernels {values('cpu_capability')}, "
            f"threads {values('threads')}, kernel settings {values('kernels', lambda k: k or 'default')}; "
            f"CUDA {values('cuda')}, cuDNN {values('cudnn')}) with {software}; lock file {values('lock')} "
            f"({lock}), in {len(envs)} jobs.")


def spread_table(reps: pd.DataFrame) -> pd.DataFrame:
    """The replicates table (`spot.report.evidence.replicates`) in words: mean (sd) in percent."""
    return pd.DataFrame({"backbone": reps.group, "over": reps.r.astype(str) + " " + reps.kind,
                         "prior": [row_name(p, o) for p, o in zip(reps.prior, reps.oracle)], "tokens": reps.budget,
                         "top-1 mean (sd)": [percent_sd(m, s) for m, s in zip(reps.top1_mean, reps.top1_sd)],
                         "kNN mean (sd)": [percent_sd(m, s) for m, s in zip(reps.knn_mean, reps.knn_sd)]})


def accuracy(value: float, correct: pd.Series | None, **options) -> str:
    """`value` in percent ± half the 95% interval of per-image 0/1 `correct` ('±n/a' without it)."""
    if correct is None:
        return percent_pm(value, np.nan, np.nan)
    iv = accuracy_interval(correct.to_numpy(float), **options)
    return percent_pm(value, iv.low, iv.high)


def gain(value: float, a: pd.Series | None, b: pd.Series | None, **options) -> str:
    """`value` = mean(a) - mean(b) in percent points with its paired 95% interval over the images the
    per-image 0/1 `a` and `b` share by key ('[n/a]' without them)."""
    if a is None or b is None:
        return f"{100 * value:+.1f} [n/a]"
    a, b = align(a=a, b=b)
    iv = paired_difference(a.to_numpy(float), b.to_numpy(float), **options)
    return percent_points(value, iv.low, iv.high)


def correct(ev: Evidence, backbone: str, prior: str, budget: int, oracle: bool = False) -> pd.Series | None:
    row = ev.row(backbone, prior, budget, oracle)
    return None if row is None else row.correct


def top1(results: pd.DataFrame, backbone: str, prior: str, budget: int, oracle: bool = False) -> str:
    """The top-1 of a row of `results` as its backbone's table shows it ('49.0 ±3.1'; '' without the row)."""
    row = results[(results.backbone == backbone) & (results.prior == prior) & (results.budget == budget)
                  & (results.oracle == oracle)]
    if row.empty:
        return ""
    r = row.iloc[0]
    return percent_pm(r.top1, r.get("top1_low", np.nan), r.get("top1_high", np.nan))


def transfer_table(trans: pd.DataFrame, results: pd.DataFrame, ev: Evidence, start: str, **options) -> pd.DataFrame:
    """The transfer of oracle placements (`spot.report.collect.collect`) in words: `dst` on its `start`
    prior, `src`'s SPoT-ON (as the backbone tables show them), `src`'s placements on `dst` and the gain
    over the prior."""
    rows = []
    for r in trans.itertuples():
        moved, prior = ev.transfer.get((r.src, r.dst, r.budget)), correct(ev, r.dst, start, r.budget)
        rows.append({"src": r.src, "dst": r.dst, "tokens": r.budget,
                     f"dst, {start} prior": top1(results, r.dst, start, r.budget),
                     "src, SPoT-ON": top1(results, r.src, start, r.budget, True),
                     "dst, src's SPoT-ON positions": accuracy(r.top1_transfer, moved, **options),
                     "gain (points)": gain(r.gain, moved, prior, **options)})
    return pd.DataFrame(rows)


def gap_table(gaps: pd.DataFrame, results: pd.DataFrame, ev: Evidence, **options) -> pd.DataFrame:
    """The label-free placements against the best fixed prior and SPoT-ON (`spot.report.summary.gap_closed`)
    in words: top-1s (as the backbone tables show them), the fraction of the oracle gap closed with its
    interval, the extra FLOPs."""
    rows = []
    for r in gaps.itertuples():
        top = results[(results.backbone == r.backbone) & (results.budget == r.budget) & results.oracle]
        on = top.loc[top.top1.idxmax()] if not top.empty else None
        cells = [correct(ev, r.backbone, r.method, r.budget), correct(ev, r.backbone, r.best_prior, r.budget),
                 None if on is None else correct(ev, r.backbone, on.prior, r.budget, True)]
        if np.isnan(r.gap_closed):
            closed = "no gap"
        elif any(c is None for c in cells):
            closed = percent_pm(r.gap_closed, np.nan, np.nan, 0)
        else:
            iv = gap_closed_interval(*(c.to_numpy(float) for c in align(m=cells[0], p=cells[1], o=cells[2])),
                                     **options)
            closed = percent_pm(r.gap_closed, iv.low, iv.high, 0)
        rows.append({"backbone": r.backbone, "tokens": r.budget, "method": model_name(r.method, False),
                     "top-1": top1(results, r.backbone, r.method, r.budget), "best fixed prior": r.best_prior,
                     "its top-1": top1(results, r.backbone, r.best_prior, r.budget),
                     "SPoT-ON": "" if on is None else top1(results, r.backbone, on.prior, r.budget, True),
                     "gap closed (%)": closed, "extra FLOPs": f"{100 * r.extra_flops:+.1f}%"})
    return pd.DataFrame(rows)


def placer_transfer_table(ptrans: pd.DataFrame, results: pd.DataFrame, ev: Evidence, **options) -> pd.DataFrame:
    """Placer transfers (`spot.report.collect.placer_transfers`) in words: `src`'s placer on `dst`,
    `dst`'s own placer (as its backbone table shows it) and the gain."""
    rows = []
    for r in ptrans.itertuples():
        moved, own = ev.placer_transfer.get((r.src, r.dst, r.budget)), correct(ev, r.dst, "placer", r.budget)
        rows.append({"src": r.src, "dst": r.dst, "tokens": r.budget,
                     "dst, src's placer": accuracy(r.top1, moved, **options),
                     "dst, own placer": top1(results, r.dst, "placer", r.budget),
                     "gain (points)": gain(r.gain, moved, own, **options)})
    return pd.DataFrame(rows)


def tables_markdown(results: pd.DataFrame, trans: pd.DataFrame, gaps: pd.DataFrame, ptrans: pd.DataFrame,
                    envs: list[dict], reps: pd.DataFrame | None = None, ev: Evidence | None = None,
                    start: str = "isotropic", **options) -> str:
    """tables.md: the environments, the paper's table of each backbone that replicates none (in the
    order of `results`), the spread over replicates (`reps`), then the transfer, gap and
    placer-transfer tables that have rows, in percent with intervals from the per-image evidence `ev`
    (`start`: oracle.prior; `options`: the bootstrap's seed, resamples)."""
    ev = ev or Evidence()
    backbones = []
    primary = results[results.replicate_of.isna()] if "replicate_of" in results else results
    for name, rows in primary.groupby("backbone", sort=False):
        table, ties = paper_table(rows)
        backbones.append(dict(name=name, head=list(table.columns), rows=table.to_numpy().tolist(), ties=ties))
    spread = spread_table(reps) if reps is not None and not reps.empty else pd.DataFrame()
    extra = [(title, caption, t.to_markdown(index=False)) for title, caption, t in (
        ("Spread over replicates (training seeds: the backbone and its replicates; prior seeds: draws of the "
         "prior's positions), in percent", "", spread),
        ("Transfer of oracle placements", TRANSFER.format(start=start), transfer_table(trans, results, ev, start,
                                                                                       **options)),
        ("Label-free placement: the oracle gap closed and the extra compute", GAPS, gap_table(gaps, results, ev,
                                                                                              **options)),
        ("Transfer of placers", PLACER_TRANSFER, placer_transfer_table(ptrans, results, ev, **options))) if not t.empty]
    return render("tables.md.j2", environment=describe_environments(envs), intro=INTRO, backbones=backbones,
                  extra=extra)
