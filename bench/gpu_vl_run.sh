#!/usr/bin/env bash
# Vision-language GPU runs behind bench/README.md (2 GPUs through the device tool; bf16, NCCL):
#   bash bench/gpu_vl_run.sh dense   # Qwen3-VL-8B shapes (8 language layers): tp2+sp, pp2
#   bash bench/gpu_vl_run.sh moe     # Qwen3-VL-30B-A3B shapes (8 language layers): ep2, tp2+sp x ep2 (etp1)
# Each: random-weight checkpoint with published shapes, then bench/gpu_moe.py per layout (load,
# byte-exact export and save, bf16 verification report gated on the loss tokens).
set -u
OUT=${OUT:-/tmp/gpu-vl-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=4 MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
quiet() { grep -v -e Warning -e warnings.warn -e "^W1" -e "^  warn"; }
case "${1:-dense}" in
dense) CONFIG=qwen3-vl-8b; LAYOUTS="tp=2,sp=1 pp=2" ;;
moe) CONFIG=qwen3-vl-30b-a3b; LAYOUTS="ep=2 tp=2,sp=1,ep=2,etp=1" ;;
esac
CKPT=/tmp/$CONFIG-l8
nvidia-smi -L
[ -f "$CKPT/config.json" ] || python3 bench/make_checkpoint.py --config $CONFIG --out "$CKPT" --layers 8 \
    --max-shard-gb 4 2>&1 | tail -1
torchrun --nproc-per-node 2 bench/gpu_moe.py "$CKPT" --layouts $LAYOUTS --report "$OUT/reports" \
    --out "$OUT/gpu_vl_${CONFIG}_2gpu.json" --work /tmp/gpu-vl-work 2>&1 | quiet | tail -8
