#!/usr/bin/env bash
# The MoE GPU runs behind the numbers in bench/README.md, on a 4-GPU host through the device tool.
#   bash bench/gpu_moe_run.sh verify   # checkpoint + round trips + bf16 reports (2 and 4 GPUs)
#   bash bench/gpu_moe_run.sh load     # load benchmark per rank against the floor
# megatron-core is carried as a wheel (.whl/); results land in $OUT (default /tmp/gpu-moe-out).
set -u
OUT=${OUT:-/tmp/gpu-moe-out}
CKPT=${CKPT:-/tmp/qwen3-30b-a3b-l8}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=4 MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
quiet() { grep -v -e Warning -e warnings.warn -e "^W1" -e "^  warn"; }
case "${1:-verify}" in
verify)
  nvidia-smi -L
  [ -f "$CKPT/config.json" ] || python3 bench/make_checkpoint.py --config qwen3-30b-a3b --out "$CKPT" --layers 8 \
      --max-shard-gb 4 2>&1 | tail -1
  torchrun --nproc-per-node 2 bench/gpu_moe.py "$CKPT" --layouts ep=2 tp=2,sp=1,ep=2,etp=1 \
      --report "$OUT/reports" --out "$OUT/gpu_moe_2gpu.json" 2>&1 | quiet | tail -4
  torchrun --nproc-per-node 4 bench/gpu_moe.py "$CKPT" --layouts tp=2,sp=1,ep=2 pp=2,ep=2 ep=4 \
      --report "$OUT/reports" --out "$OUT/gpu_moe_4gpu.json" 2>&1 | quiet | tail -6
  ;;
load)
  torchrun --nproc-per-node 2 bench/load_bench.py "$CKPT" --ep 2 --device cuda --results "$OUT/load" 2>&1 | quiet | tail -12
  torchrun --nproc-per-node 4 bench/load_bench.py "$CKPT" --tp 2 --ep 2 --device cuda --results "$OUT/load" 2>&1 | quiet | tail -14
  ;;
esac
