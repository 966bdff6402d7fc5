#!/bin/sh
# On the lent GPU machine (at most 8 minutes): bf16 LoRA, full fine-tuning, packing of long rows, a 1-GPU FSDP
# run and QLoRA where bitsandbytes is present, each with tokens/s, peak GPU memory, the plan and the final loss.
# Prepare here first with scripts/gpu_carry.sh; the results go to benchmarks/RESULTS.md.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d gpu-carry/wheels ]; then
  # --no-deps --no-index: nothing can be fetched there; the image's torch, transformers and peft stay as they are.
  $PY -m pip install -q --no-deps --no-index gpu-carry/wheels/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not here"
OUT_JSON=${OUT:-.}/gpu_check.json
timeout 480 $PY scripts/gpu_check.py --json "$OUT_JSON" "$@"
