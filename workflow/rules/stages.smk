# One rule per stage of spot.pipeline.STAGES: its output is the job folder's run.json (written
# last), its inputs the run.json of its input folders, its params the config values it reads.
for stage in STAGES:

    rule:
        name:
            stage.rule
        input:
            partial(stage_inputs, stage),
        output:
            f"{LAYOUT.pattern(stage.output)}/run.json",
        params:
            values=partial(stage_params, stage),
        threads: stage.threads
        resources:
            gpu=GPU if stage.gpu else 0,
        log:
            str(LAYOUT.log(stage.name, **{w: f"{{{w}}}" for w in stage.wildcards})),
        conda:
            "../envs/spot.yaml"
        shell:
            f"{COMMANDS[locals().get('rule', stage.rule)]} 2> {{log}}"
