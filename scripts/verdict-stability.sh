#!/usr/bin/env bash
# Do the findings survive other CPU kernels? Reruns the pipeline of a params file (default params.yaml,
# whose run must be complete) into another root with other CPU kernels, then compares every claim's
# verdict with the first run's (`spot verdicts`). Other kernels round differently during training,
# as another machine does: a claim about a training recipe should keep its verdict.
#   scripts/verdict-stability.sh [PARAMS] [ROOT]      (ROOT default: <the params' root>-kernels)
# Kernels: ATen, oneDNN and MKL at AVX-512 where the CPU has it, else ATen's scalar kernels and SSE4;
# KERNELS="VAR=value ..." sets others. Exit 2 if a claim flips between holds and reversed.
set -euo pipefail
params=${1:-params.yaml}
base=$(python -c "import sys; from spot.workflow.config import load_config; print(load_config(sys.argv[1])['root'])" "$params")
root=${2:-$base-kernels}
if [ -z "${KERNELS:-}" ]; then
    if grep -qw avx512f /proc/cpuinfo; then
        KERNELS="ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512"
    else
        KERNELS="ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2"
    fi
fi
test -f "$base/report/findings.csv" || { echo "verdict-stability: $base/report/findings.csv: run the pipeline of $params first" >&2; exit 2; }
mkdir -p "$root"
# The same params, another root and MLflow experiment: the two runs' jobs, folders and runs stay apart.
python - "$params" "$root" > "$root/params.yaml" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["root"], cfg["name"] = sys.argv[2], f"{cfg['name']}-kernels"
yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
PY
echo "verdict-stability: $params into $root with $KERNELS"
env $KERNELS snakemake --cores all --config params="$root/params.yaml"
spot verdicts --params "$params" --other "$root/report/findings.csv" | tee "$root/verdicts.txt"
