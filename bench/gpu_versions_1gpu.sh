#!/usr/bin/env bash
# Oldest and newest supported megatron-core on one H200 (issue 16, "GPU evidence on both ends").
#   bash bench/gpu_versions_1gpu.sh 016 019     # wheels in ${WHL_ROOT:-.whl}/m016/ and .../m019/
#   MODELS=llama,qwen3_moe,deepseek_v3,qwen3_vl LORA="qwen2_moe" REAL=1 (defaults; MODELS=all for the whole zoo)
# Per version, each in its own --target site: the bf16 round-trip matrix over every built-in model
# (dense, MoE, vision-language; byte-exact export + save, logits against transformers), the demo
# (HF -> megatron -> torch_dist checkpoint -> megatron -> HF, fp32 logits), a LoRA round trip through
# the CLI (PEFT -> torch_dist adapter -> PEFT, byte-exact, --test-convert-precision), and a
# real-shaped dense model (Qwen3-8B shapes, 2 layers; byte-exact + bf16 verification report).
# Results in $OUT: gpu_matrix_1gpu_m<V>.json, gpu_real_1gpu_m<V>.json, versions_1gpu.log; verification reports in /tmp/rep<V>.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-versions-out}
mkdir -p "$OUT"
LOG=$OUT/versions_1gpu.log
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=4 MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
quiet() { grep -v -e Warning -e warnings.warn -e "^W1" -e "^  warn" -e "^\s*$"; }
step() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }
nvidia-smi -L | tee -a "$LOG"
MODELS=${MODELS:-llama,qwen3_moe,deepseek_v3,qwen3_vl}
[ "$MODELS" = all ] && MODELS=$(python3 -c "from mcore_bridge import zoo; print(','.join(zoo.names()))")
LORA=${LORA:-qwen2_moe}
REAL=${REAL:-1}
CKPT=/tmp/qwen3-8b-l2
[ "$REAL" = 1 ] && [ ! -f "$CKPT/config.json" ] && python3 bench/make_checkpoint.py --config qwen3-8b --out "$CKPT" --layers 2 \
    --max-shard-gb 4 2>&1 | tail -1 | tee -a "$LOG"
rc=0
run() { "$@" || { echo "FAILED: $*" | tee -a "$LOG"; rc=1; }; }
for V in "$@"; do
  SITE=/tmp/site$V
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" ${WHL_ROOT:-.whl}/m$V/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
  step "megatron-core $(python3 -c 'import megatron.core as m; print(m.__version__)')"
  step "m$V gpu_matrix ($MODELS; tp1, bf16)"
  run torchrun --nproc-per-node 1 bench/gpu_matrix.py --models "$MODELS" --out "$OUT/gpu_matrix_1gpu_m$V.json" \
      --work /tmp/gm$V > >(quiet | tee -a "$LOG" | grep -e byte-exact -e Error -e "cases, all") 2>&1
  step "m$V demo ($MODELS; torch_dist write -> read, fp32)"
  run python3 -m mcore_bridge.cli demo --device cuda --tp 1 --models "$MODELS" > >(quiet | tee -a "$LOG" | grep -e PASS -e FAIL -e Error) 2>&1
  for m in $LORA; do
    step "m$V LoRA CLI round trip ($m)"
    run python3 bench/gpu_lora_cli.py --model $m --work /tmp/lora$V-$m > >(quiet | tee -a "$LOG" | tail -1) 2>&1
  done
  if [ "$REAL" = 1 ]; then
    step "m$V real-shaped dense (Qwen3-8B shapes, 2 layers), tp1 bf16"
    run torchrun --nproc-per-node 1 bench/gpu_moe.py "$CKPT" --layouts tp=1 --report /tmp/rep$V \
        --out "$OUT/gpu_real_1gpu_m$V.json" --work /tmp/real$V > >(quiet | tee -a "$LOG" | tail -2) 2>&1
  fi
  rm -rf /tmp/gm$V /tmp/real$V
done
step "done rc=$rc"
exit $rc
