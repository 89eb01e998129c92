# One rule per stage of spot.workflow.stage_table.STAGES: its output is the job folder's run.json (written
# last; a stage with `each` writes one folder per value), its inputs the run.json of its input
# folders, its params the config values it reads and its command line but the params file ($SPOT_PARAMS in
# the shell, set in common.smk: the rerun trigger is the values a job reads, not the file's path).
# Files of its folder listed in workflow/report/items.yaml are outputs too (`report_output`), shown by
# `snakemake --report report.html` with their category, label and caption.
# A failed job's stderr goes to its log; its last line (the `spot ...: error:` line, or a traceback's
# last) is printed on Snakemake's console too, with the log's path, and the job keeps its exit status.


for stage in STAGES:

    rule:
        name:
            stage.rule
        input:
            partial(stage_inputs, stage),
        output:
            *[f"{LAYOUT.pattern(stage.output, **f)}/run.json" for f in stage.output_wildcards(config, {})],
            *[report_output(stage, n, i) for n, i in REPORT_ITEMS.get(stage.name, {}).items() if shown(i)],
        params:
            values=partial(stage_params, stage),
            lock=LOCK,
            cmd=f"spot {stage.name}",
            flags=partial(stage_flags, stage),
        threads: stage.threads
        resources:
            gpu=GPU if stage.gpu else 0,
        log:
            str(LAYOUT.log(stage.name, **{w: f"{{{w}}}" for w in stage.wildcards})),
        conda:
            "../envs/spot.yaml"
        shell:
            '{params.cmd} --params "$SPOT_PARAMS"{params.flags} 2> {log} || (s=$?; echo "{log}: $(tail -n 1 {log})" >&2; exit $s)'
