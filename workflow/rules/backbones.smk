rule backbone:
    input:
        backbone_inputs,
    output:
        f"{ROOT}/backbones/{{backbone}}/run.json",
    params:
        spec=lambda w: config["backbones"][w.backbone],
        train=lambda w: config["train"] if config["backbones"][w.backbone]["make"] == "train" else None,
    threads: 2
    resources:
        gpu=GPU,
    log:
        f"{ROOT}/logs/backbone/{{backbone}}.log",
    conda:
        "../envs/spot.yaml"
    shell:
        spot("backbone", name="backbone") + " 2> {log}"
