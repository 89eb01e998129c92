"""Pipeline stages, one module each: `fn(cfg, inputs, out, **wildcards) -> Record`.

`cfg` holds only the config keys the stage declares in `spot.pipeline.STAGES`, `inputs` its input
folders (complete), `out` its output folder (locked, markers removed). A stage imports the maths
and the layout, never another stage.
"""
