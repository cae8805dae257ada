#!/usr/bin/env bash
# Published flagship configs (tests/published/*.json) at their real per-matrix shapes, reduced depth
# (and expert count where one GPU needs it), on the oldest and newest supported megatron-core.
#   bash bench/gpu_published.sh 016 019          # wheels in ${WHL_ROOT:-.whl}/m016/ and .../m019/
#   ONLY="deepseek-ai__DeepSeek-V3 openai__gpt-oss-20b" bash bench/gpu_published.sh 019
# Per config: bench/reduce_published.py writes a random bf16 checkpoint with transformers'
# save_pretrained (once); per version: HF -> megatron -> HF through the CLI must give the same bytes,
# and `mcore-bridge verify --dtype fp32,bf16` writes the reports (each names its megatron-core).
# FP8 configs also get an FP8 copy (`export --export-dtype fp8`) that is verified and round-tripped.
# Results: $OUT/published.log, $OUT/reports/<config>-m<V>/ (report.md / report.json).
set -u -o pipefail
OUT=${PUB_OUT:-/tmp/gpu-published-out}
mkdir -p "$OUT/reports"
LOG=$OUT/published.log
export OMP_NUM_THREADS=4 MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
step() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }
nvidia-smi -L | tee -a "$LOG"
# layers / experts per config: real shapes, depth cut so one H200 holds bf16 + fp32 reference
declare -A LAYERS=( [deepseek-ai__DeepSeek-V3]=4 [deepseek-ai__DeepSeek-V3.1]=4 [moonshotai__Kimi-K2-Instruct]=2
                    [zai-org__GLM-4.5]=4 [openai__gpt-oss-120b]=2 [google__gemma-3-1b-it]=6 )
declare -A EXPERTS=( [deepseek-ai__DeepSeek-V3]=32 [deepseek-ai__DeepSeek-V3.1]=32 [moonshotai__Kimi-K2-Instruct]=32
                     [zai-org__GLM-4.5]=32 [openai__gpt-oss-120b]=32 [moonshotai__Moonlight-16B-A3B-Instruct]=32 )
same_bytes() { python3 - "$1" "$2" <<'PY'
import sys, torch
from mcore_bridge.hf_io import HFCheckpoint
a, b = HFCheckpoint(sys.argv[1]), HFCheckpoint(sys.argv[2])
bad = sorted(set(a.names()) ^ set(b.names())) + [n for n in a.names() if n in b.tensors and not torch.equal(a.read(n).view(torch.uint8), b.read(n).view(torch.uint8))]
print(f"byte-exact: {not bad} ({len(a.names())} tensors){'' if not bad else ' differ: ' + ', '.join(bad[:5])}")
sys.exit(1 if bad else 0)
PY
}
rc=0
run() { "$@" || { echo "FAILED: $*" | tee -a "$LOG"; rc=1; }; }
CONFIGS=$(ls tests/published/*.json)
for V in "$@"; do
  SITE=/tmp/site$V
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" ${WHL_ROOT:-.whl}/m$V/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
  step "megatron-core $(python3 -c 'import megatron.core as m; print(m.__version__)')"
  for cfg in $CONFIGS; do
    name=$(basename "$cfg" .json)
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
    ck=/tmp/pub/$name
    if [ ! -f "$ck/config.json" ]; then
      step "make $name (layers ${LAYERS[$name]:-2}, experts ${EXPERTS[$name]:-all})"
      run python3 bench/reduce_published.py "$cfg" --out "$ck" --layers "${LAYERS[$name]:-2}" \
          ${EXPERTS[$name]:+--experts ${EXPERTS[$name]}} 2>&1 | tail -1 | cut -c1-200 | tee -a "$LOG"
    fi
    sources=("$ck")
    if grep -q '"quant_method": *"fp8"' "$cfg"; then
      step "m$V $name: FP8 copy"
      run python3 -m mcore_bridge.cli export --model "$ck" --to-hf --export-dtype fp8 --save "$ck-fp8" --overwrite \
          --device cuda 2>&1 | tail -1 | tee -a "$LOG"
      sources+=("$ck-fp8")
    fi
    for src in "${sources[@]}"; do
      tag=$(basename "$src")
      step "m$V $tag: HF -> megatron -> HF (cuda)"
      run timeout ${STEP_TIMEOUT:-300} python3 -m mcore_bridge.cli export --model "$src" --to-hf --save "/tmp/rt-$tag" --overwrite --device cuda \
          $( [[ "$src" == *-fp8 ]] && echo --export-dtype fp8 ) 2>&1 | tail -1 | tee -a "$LOG"
      run same_bytes "$src" "/tmp/rt-$tag" 2>&1 | tee -a "$LOG"
      rm -rf "/tmp/rt-$tag"
      step "m$V $tag: verify fp32,bf16"
      run timeout ${STEP_TIMEOUT:-300} python3 -m mcore_bridge.cli verify --model "$src" --matrix "tp=1" --dtype fp32,bf16 --device cuda \
          --report "$OUT/reports/$tag-m$V" 2>&1 | grep -E "PASS|FAIL|verdict|error" | tail -4 | tee -a "$LOG"
    done
  done
done
step "done rc=$rc"
exit $rc
