"""Stage report: every result in one tidy table, the paper's tables, findings, plots and pictures
(`spot.report`)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from spot.report.collect import collect, environments, in_order, oracle_curves, placer_transfers
from spot.report.evidence import read_evidence, replicates, with_intervals
from spot.report.findings import findings
from spot.report.frontier import add_evidence, frontier_markdown, matched_table, read_frontier, results_table, with_flops
from spot.report.plots import plot_budgets, plot_frontier, plot_oracle_steps
from spot.report.render import html_page
from spot.report.sheets import learned_sheet, prior_sheet, trajectory_sheet
from spot.report.summary import flat_metrics, gap_closed, metric_rows
from spot.report.tables import tables_markdown
from spot.stages import Record
from spot.utils.environment import environment
from spot.utils.io import atomic_path, write_json
from spot.utils.replicates import training_runs


def run(p, inputs: dict, out: Path) -> Record:
    """Gather every result into `out`: results.{parquet,csv} (each accuracy with its bootstrap
    interval `<c>_low`, `<c>_high`; `replicate_of`, `seed`), findings.csv (a row per claim of findings.md:
    `spot.report.findings.Claim`), replicates.csv (mean and sd over training
    seeds and prior draws: `spot.report.evidence.replicates`), tables.{md,html}, findings.{md,html},
    results.csv also has `flops` (inference FLOPs per image) and the token-reduction settings of stage
    reduction as rows (`spot.report.frontier`; `setting`), tables.md their table at matched FLOPs,
    findings.md case study 6, plots/frontier.png accuracy against FLOPs;
    metrics.json (every number, flat; fractions), metrics/<backbone>/<row>.json and, for a backbone with
    replicates, metrics/<backbone>/s<seed>/<row>.json (the DVC metrics, in percent:
    `spot.report.summary.metric_rows`), plots/accuracy_vs_budget.{png,csv}, plots/oracle_steps.png,
    pictures/priors.png (priors in `eval.priors` order, then the label-free placements and SPoT-ON),
    pictures/trajectories.png, pictures/learned.png (the learned global priors, when stage learned ran)."""
    order, specs = list(p.backbones), p.backbones
    results, trans, sal = collect(inputs, order)
    if results.empty:
        raise FileNotFoundError("no evaluation results: the report needs at least one evaluate job")
    ev, options = read_evidence(inputs), dict(seed=p.seed, resamples=p.resamples)
    replicate_of = {b: s["replicate_of"] for b, s in specs.items() if s.get("replicate_of")}
    points, matches, budget_flops, per_image = read_frontier(inputs, order, **options)
    tol = p.tolerance
    results = with_flops(with_intervals(results, ev, **options), budget_flops).assign(
        replicate_of=lambda d: d.backbone.map(replicate_of), seed=lambda d: d.backbone.map(lambda b: specs[b]["seed"]))
    reps = replicates(results, ev, replicate_of)
    with atomic_path(out / "replicates.csv") as tmp:
        reps.to_csv(tmp, index=False)
    table = results_table(results, points)
    with atomic_path(out / "results.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    gaps, ptrans = gap_closed(results), placer_transfers(inputs, order)
    trans, ptrans = (t[~t.dst.isin(list(replicate_of))] if len(t) else t for t in (trans, ptrans))  # tables: first runs
    tables = tables_markdown(results, trans, gaps, ptrans, environments(inputs) + [environment()], reps, ev,
                             p.prior, **options)
    tables += frontier_markdown(matched_table(results, points, matches, budget_flops, tol), tol)
    fixed = {b for b, s in specs.items() if s["make"] == "fetch"}
    add_evidence(ev, per_image)
    found, claims = findings(results, ev, training_runs(specs), fixed=fixed, start=p.prior, matches=matches,
                             budget_flops=budget_flops, tolerance=tol, **options)
    with atomic_path(out / "findings.csv") as tmp:
        claims.to_csv(tmp, index=False)
    for name, text, title in (("tables", tables, "SPoT results"), ("findings", found, "SPoT findings")):
        with atomic_path(out / f"{name}.md") as tmp:
            tmp.write_text(text)
        with atomic_path(out / f"{name}.html") as tmp:
            tmp.write_text(html_page(text, title))
    plot_data = results[["backbone", "prior", "oracle", "budget", "top1", "top1_low", "top1_high", "knn"]].sort_values(
        ["backbone", "prior", "oracle", "budget"], key=in_order(order)).assign(
        series=lambda d: d.backbone + "/" + d.prior + np.where(d.oracle, "/oracle", ""))
    with atomic_path(out / "plots" / "accuracy_vs_budget.csv") as tmp:
        plot_data.to_csv(tmp, index=False)
    plot_budgets(results, out / "plots" / "accuracy_vs_budget.png", reps)
    plot_oracle_steps(oracle_curves(inputs, order), out / "plots" / "oracle_steps.png")
    plot_frontier(points, results, out / "plots" / "frontier.png")
    budgets = sorted(results.budget.unique())
    prior_sheet(inputs, out / "pictures" / "priors.png", p.priors, int(budgets[len(budgets) // 2]), p.pictures)
    trajectory_sheet(inputs, out / "pictures" / "trajectories.png", order)
    learned_sheet(inputs, out / "pictures" / "learned.png", p.pictures, order)
    write_json(out / "metrics.json", flat_metrics(results, trans, gaps, sal))
    shutil.rmtree(out / "metrics", ignore_errors=True)            # exactly the files of this run's rows
    for name, rows in metric_rows(results, trans, ptrans).items():
        write_json(out / "metrics" / name, rows)
    artifacts = [str(f.relative_to(out)) for f in sorted(out.rglob("*")) if f.is_file() and not f.name.startswith(".")]
    return Record(dict(rows=len(results), transfers=len(trans)), artifacts)
