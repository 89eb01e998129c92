def backbone_inputs(wildcards):
    spec = config["backbones"][wildcards.backbone]
    inputs = [rules.mlflow_init.output[0]]
    if spec["make"] == "train":
        inputs.append(rules.shard.output.run)
        if spec.get("init"):
            inputs.append(f"{ROOT}/backbones/{spec['init']}/run.json")
    return inputs


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
    shell:
        spot("backbone", name="backbone") + " 2> {log}"
