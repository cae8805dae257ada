#!/usr/bin/env bash
# Issue 22 GPU evidence: Megatron-LM's pretrain (megatron-core 0.19.2 wheel) with the HF hooks
# (examples/finetune_hf.py), one H200, fp32, TF32 off. Per model (Qwen3-8B, Qwen3-30B-A3B, Qwen3-VL-8B
# shapes, 2 language layers): 200 iterations (losses fall), HF safetensors at 100 and 200, the last
# loads strictly in transformers with megatron's final fp32 logits, resumption from Megatron-LM's
# checkpoint at 100 matches 101..200, packing and recomputation match the first 5 steps.
#   bash bench/gpu_train.sh                        # all three (MODELS=qwen3-8b,... to choose)
# Results: $OUT/gpu_train_<model>.json, $OUT/gpu_train_summary.md; exit 1 on any failed step or gate.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-train-out}
WHEELS=${WHEELS:-.whl/m019}
MODELS=${MODELS:-qwen3-8b,qwen3-30b-a3b,qwen3-vl-8b}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site-mlm \
    $WHEELS/*.whl || { echo "pip install of $WHEELS failed"; exit 1; }
# the bench's own environment (the library sets none): TF32 off for the fp32 logit check, no compile time
export PYTHONPATH=/tmp/site-mlm:$PWD NVIDIA_TF32_OVERRIDE=0 TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=4 \
    MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
nvidia-smi -L
df -h /tmp | tail -1
python3 bench/gpu_train.py --out "$OUT" --work "${WORK:-/tmp/gpu-train}" --models "$MODELS" --iters "${ITERS:-200}" \
    2>&1 | grep -v -e Warning -e "warnings.warn" -e "^W1" -e "^  warn"
exit "${PIPESTATUS[0]}"
