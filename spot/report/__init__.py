"""The report: results collected from the job folders, analysed, rendered as tables, findings, plots and picture sheets."""
