"""Tables: the paper's table per backbone (pandas pivot), the transfer and gap tables (pandas
`to_markdown`), and the line naming the environments, as tables.md (`templates/tables.md.j2`)."""
from __future__ import annotations

import pandas as pd

from spot.methods import LABEL_FREE
from spot.report.render import render
from spot.report.stats import percent_pm, percent_sd
from spot.report.summary import PAPER_ORDER, model_name

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


def tables_markdown(results: pd.DataFrame, trans: pd.DataFrame, gaps: pd.DataFrame, ptrans: pd.DataFrame,
                    envs: list[dict], reps: pd.DataFrame | None = None) -> str:
    """tables.md: the environments, the paper's table of each backbone that replicates none (in the
    order of `results`), the spread over replicates (`reps`), then the transfer, gap and
    placer-transfer tables that have rows."""
    backbones = []
    primary = results[results.replicate_of.isna()] if "replicate_of" in results else results
    for name, rows in primary.groupby("backbone", sort=False):
        table, ties = paper_table(rows)
        backbones.append(dict(name=name, head=list(table.columns), rows=table.to_numpy().tolist(), ties=ties))
    spread = spread_table(reps) if reps is not None and not reps.empty else pd.DataFrame()
    extra = [(title, t.to_markdown(index=False, floatfmt=".4f")) for title, t in (
        ("Spread over replicates (training seeds: the backbone and its replicates; prior seeds: draws of the "
         "prior's positions), in percent", spread), ("Transfer of oracle placements", trans),
        ("Label-free placement: the oracle gap closed and the extra compute",
                                                   gaps), ("Transfer of placers", ptrans)) if not t.empty]
    return render("tables.md.j2", environment=describe_environments(envs), intro=INTRO, backbones=backbones,
                  extra=extra)
