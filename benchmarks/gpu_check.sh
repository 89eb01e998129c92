#!/usr/bin/env bash
# The README's GPU rows measured again on one CUDA machine, from a clone (about 6 min on an H200):
#   bash benchmarks/gpu_check.sh
# Installs from requirements.lock into a new virtual environment .venv-gpu (CPython 3.11), then runs
# the model, tokenizer and oracle tests on the GPU, bench_launches, bench_core (batch 256, bf16) and
# bench_pipeline at the size of one SPoT-ON part of config/imagenet.yaml, with its GPU-hour estimate.
# Then ToMe r = 13 on AugReg ViT-B/16 against the ToMe paper (benchmarks/bench_tome.py; skipped without
# ImageNet val or the weights). Last, the GPU each of 2 jobs per GPU used (benchmarks/gpu_slots.py: the slot and PCI bus from its run.json).
# Writes $OUT (default out/bench): the benchmarks' JSON, environment.json (spot.utils.environment), the log.
# A machine without the registry but with torch installed: SPOT_SYSTEM_TORCH=1 keeps its torch and
# installs the other packages from the wheels in $SPOT_WHEELS (default .whl/), without the lock.
# DEVICE=cpu checks the script itself on a CPU, with a tiny model and few images.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ "${SPOT_SYSTEM_TORCH:-0}" = 1 ]; then
    python3 -m pip install -q --no-index --find-links "${SPOT_WHEELS:-.whl}" mlflow webdataset jsonschema
    python3 -m pip install -q --no-deps --no-build-isolation -e .
else
    python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
    pip install -q -r requirements.lock && pip install -q --no-deps -e .
fi
python3 -c "import json; from spot.utils.environment import environment; print(json.dumps(environment(), indent=1))" \
    | tee "$OUT/environment.json"

if [ "$DEVICE" = cpu ]; then
    model=vit_tiny_patch16_224 batch=32
    size=(--img-size 64 --patch 8 --budgets 16 64 --copies 2 --steps 5)
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
    model=vit_base_patch16_224 batch=256
    size=(--img-size 224 --patch 16 --budgets 25 196 --copies 50 --steps 50 --shard-count 2500
          --oracle-batch-tokens 50176)
fi

export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false
python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_oracle.py tests/test_tokenizer.py
python3 -m benchmarks.bench_launches --device "$DEVICE" --model "$model"
python3 -m benchmarks.bench_core --device "$DEVICE" --model "$model" --batch "$batch"
python3 -m benchmarks.bench_pipeline --device "$DEVICE" --model "$model" --batch "$batch" "${size[@]}" \
    --estimate config/imagenet.yaml
# ToMe r = 13 on timm's AugReg ViT-B/16 against the paper (84.57 -> 82.60 %), when ImageNet val
# (IMAGENET_VAL) and the weights (the Hugging Face cache, or TOME_CHECKPOINT) are at hand; else it says so.
[ "$DEVICE" = cpu ] || python3 -m benchmarks.bench_tome --val "${IMAGENET_VAL:-/datasets/imagenet/val}" \
    ${TOME_CHECKPOINT:+--checkpoint "$TOME_CHECKPOINT"}
[ "$OUT" = out/bench ] || cp out/bench/*.json "$OUT"/
# Which GPU each job used: twice as many jobs as GPUs take GPU slots at once (spot.workflow.gpus), a
# line per job's run.json. (A pipeline's: python3 -m benchmarks.gpu_slots --root out-imagenet)
if [ "$DEVICE" = cpu ]; then export SPOT_GPUS=${SPOT_GPUS:-0,1}; gpus=2 slot_device=auto
else gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l) slot_device=cuda; fi
SPOT_GPU_LOCKS="$OUT/gpu-locks" python3 -m benchmarks.gpu_slots --jobs $((2 * gpus)) --device "$slot_device" \
    --root "$OUT/gpu-slots"
echo "gpu_check: done; results in $OUT"
