#!/usr/bin/env bash
# Issue 21 on one GPU host, one device call: the RL transport end to end (colocated: CUDA IPC into an
# engine process on the same GPU) and every CLI conversion against the copy floor (GPU and CPU).
#   OUT=/tmp/io21 bash bench/gpu_io21.sh [016|019]     # wheels in ${WHL_ROOT:-.whl}/m<V>/
# Writes to $OUT: rl-*.json/.log (rl_sync_bench.py), io_floor-*.md/.json/.log (io_floor.py), prof-*.txt
# (the top of a cProfile of one conversion of each kind on cuda) and host.txt (cores, disk, GPU).
# Knobs: LAYERS (io_floor's Qwen3-8B depth, default 12: the 7.1 GB table), RL_LAYERS (36: full
# depth; 0 skips), LEAN (1: io_floor --lean, for LAYERS=36 on the 64 GB disk), PROF (the profiled kinds,
# 'td hf'; empty skips), BASELINE (another checkout, e.g. an exported commit carried along: io_floor's cuda
# rows A/B against it), MOE_LAYERS (24 of Qwen3-30B-A3B's 48; 0 skips), REPS (2), CPU_PROCS (1,2; empty
# skips), STEP_S (a timeout per step), BUDGET_S (520: no step runs past it; the results are then packed
# into $OUT/io21.tgz, as a device call returns few files).
set -u -o pipefail
OUT=${OUT:-/tmp/io21}; V=${1:-019}; mkdir -p "$OUT"
SITE=/tmp/site$V
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" ${WHL_ROOT:-.whl}/m$V/*.whl \
  || { echo "FAILED: install megatron-core $V"; exit 1; }
export PYTHONPATH=$SITE:$PWD MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# The device's torch site is read-only and has no bytecode, and its environment sets
# PYTHONDONTWRITEBYTECODE=1, so every process compiled ~2,250 modules: 8.6 s of a 14.8 s start-up in
# session 34's profile (the prefix below alone did nothing: nothing was written to it). An installed
# environment has its .pyc files; so do these runs.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache-io21}
python3 -c 'import mcore_bridge.cli, mcore_bridge.bridge, mcore_bridge.dist_ckpt, megatron.core.models.gpt, torch.distributed.checkpoint, transformers' 2>/dev/null
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-520} ))
left() {  # a step's timeout: its own limit or what is left of the budget, whichever is less
  local r=$(( DEADLINE - $(date +%s) )); [ "$r" -gt "${STEP_S:-240}" ] && r=${STEP_S:-240}; [ "$r" -lt 1 ] && r=1; echo "$r"; }
{ nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1
  python3 -c 'import megatron.core as m, torch, transformers as t; print("megatron-core", m.__version__, "torch", torch.__version__, "transformers", t.__version__)'
} > "$OUT/host.txt" 2>&1
cat "$OUT/host.txt"
stamp() { echo "== $* ($(date -u +%T))"; }
if [ "${RL_LAYERS:-36}" != 0 ]; then
  stamp "rl sync: Qwen3-8B, ${RL_LAYERS:-36} layers, colocated"
  timeout "$(left)" torchrun --nproc-per-node 1 bench/rl_sync_bench.py --config qwen3-8b --layers "${RL_LAYERS:-36}" \
    --mode colocated --repeats 3 --out "$OUT/rl-qwen3-8b-colocated.json" > "$OUT/rl-qwen3-8b.log" 2>&1
  echo "rc=$?"; grep -E "^(bf16|fp8|lora):|Error|error" "$OUT/rl-qwen3-8b.log" | tail -6
fi
L=${LAYERS:-12}
stamp "io_floor cuda, $L layers"
LEAN=${LEAN:+--lean}  # LEAN=1: io_floor deletes each output once read (a full-depth 16 GB checkpoint on a 64 GB disk)
timeout "$(left)" python3 bench/io_floor.py --layers "$L" --reps "${REPS:-2}" --procs 1 --device cuda $LEAN ${BASELINE:+--baseline $BASELINE} \
  --results "$OUT/io_floor-cuda.md" --label "megatron-core $V, GPU host" > "$OUT/io_floor-cuda.log" 2>&1
echo "rc=$?"; tail -12 "$OUT/io_floor-cuda.log"
SRC=/tmp/io_floor/qwen3-8b-l$L
for kind in ${PROF-td hf}; do  # where a cuda conversion spends its time (PROF= skips)
  if [ $kind = td ]; then a="--model $SRC --to-mcore --save /tmp/prof-td"; else a="--model $SRC --load /tmp/prof-td --to-hf --save /tmp/prof-hf"; fi
  timeout "$(left)" python3 -m cProfile -o /tmp/prof-$kind.out -m mcore_bridge.cli export $a --overwrite --device cuda > /dev/null 2>&1
  python3 -c "import pstats,sys; p=pstats.Stats('/tmp/prof-$kind.out', stream=sys.stdout); p.sort_stats('tottime').print_stats(25); p.sort_stats('cumtime').print_stats(40)" \
    > "$OUT/prof-cuda-$kind.txt" 2>&1
done
rm -rf /tmp/prof-td /tmp/prof-hf /tmp/prof-*.out  # two more copies of the checkpoint: the disk is 64 GB
if [ "${MOE_LAYERS:-24}" != 0 ]; then
  stamp "rl sync: Qwen3-30B-A3B, ${MOE_LAYERS:-24} layers, colocated"
  timeout "$(left)" torchrun --nproc-per-node 1 bench/rl_sync_bench.py --config qwen3-30b-a3b --layers "${MOE_LAYERS:-24}" \
    --mode colocated --repeats 3 --out "$OUT/rl-qwen3-30b-a3b-colocated.json" > "$OUT/rl-qwen3-30b-a3b.log" 2>&1
  echo "rc=$?"; grep -E "^(bf16|fp8|lora):|Error|error" "$OUT/rl-qwen3-30b-a3b.log" | tail -6
fi
if [ -n "${CPU_PROCS-1,2}" ]; then
  stamp "io_floor cpu, $L layers, procs ${CPU_PROCS-1,2}"
  timeout "$(left)" python3 bench/io_floor.py --layers "$L" --reps "${REPS:-2}" --procs "${CPU_PROCS-1,2}" --device cpu $LEAN \
    --results "$OUT/io_floor-cpu.md" --label "megatron-core $V, GPU host's CPU" > "$OUT/io_floor-cpu.log" 2>&1
  echo "rc=$?"; tail -14 "$OUT/io_floor-cpu.log"
fi
stamp done
(cd "$OUT" && tar czf io21.tgz --exclude io21.tgz * && find . -type f ! -name io21.tgz -delete)
