#!/usr/bin/env bash
# Published flagship configs (tests/published/*.json) at their real per-matrix shapes, reduced depth
# (and expert count where one GPU needs it), on the oldest and newest supported megatron-core.
#   bash bench/gpu_published.sh 016 019          # wheels in ${WHL_ROOT:-.whl}/m016/ and .../m019/
#   ONLY="deepseek-ai__DeepSeek-V3 openai__gpt-oss-20b" bash bench/gpu_published.sh 019
#   ONLY_019="openai__gpt-oss-20b" ... narrows the 019 lane only
# Phase 1 (CPU, ${MAKE_JOBS:-4} at a time): bench/reduce_published.py writes a random bf16 checkpoint
# per config with transformers' save_pretrained (once); an MXFP4 config (gpt-oss) also gets its
# as-published MXFP4 copy. Phase 2: one lane per megatron-core version, the lanes run at the same
# time on the one GPU. Per version: HF -> megatron -> HF through the CLI must give the same bytes
# (an MXFP4 source: the bf16 output equals its dequantised view), and
# `mcore-bridge verify --dtype fp32,bf16` writes the reports (each names its megatron-core).
# FP8 configs also get their FP8 copy as published (`reduce_published.py --fp8`: blockwise FP8 quantised
# with the published quantization_config, e.g. V3.1's ue8m0 scales), verified and round-tripped (FP8 out).
# Results: $OUT/published-m<V>-<lane>.log, $OUT/reports/<config>-m<V>/ (index.md and the case pages).
# VERIFY_ARGS (default --dtype fp32,bf16) replaces the verify options, e.g. "--dtype fp32 --isolate".
# BUDGET_S=N stops the run N s after the lanes start (no new config, running steps killed); PACK=1 packs
# the reports and logs into $OUT/published.tgz (without verify's caches).
# QUANT_ONLY=1: an MXFP4 config runs its as-published copy alone (not the bf16 checkpoint it was made from),
# an FP8 config its FP8 copy alone. QUANT_ONLY="<names>" does so for those configs only; NO_QUANT="<names>":
# those FP8 configs run their bf16 checkpoint alone (no FP8 copy).
# RT_SKIP="<names>" skips the round trip of those configs (verify only: a re-run after a runtime-only change).
# SERIAL=1 runs the versions' lanes one after the other, not at the same time: for a config whose lanes'
# round-trip outputs and dequantised references would not fit on the disk at once (a reduced DeepSeek-V3
# with its MTP layer: 18 GB bf16, 12.5 GB FP8 copy, per lane 12.5 GB round trip and 18 GB reference), or
# whose fp32 verifications would not fit the GPU at once (that model's holds ~70 GB: two lanes of it ran
# out of memory together on an H200, session 36; one lane takes ~270 s, so one version per call there).
# PRUNE=1 (with QUANT_ONLY) deletes the bf16 weights of the configs that run their quantised copy alone once
# phase 1 is done, so that both versions' lanes fit the disk at once (their round-trip output is removed
# before their reference is made: per lane at most 18 GB for a reduced DeepSeek-V3).
# SPLIT=N runs N lanes per version (the configs dealt round-robin), for a GPU with memory to spare (on an
# H200, 8 lanes in all ran out of memory with 3.6 B-parameter fp32 verifications; 6 did not).
# Every config keeps its published MTP layer (reduce_published.py --mtp). Wheels in ${WHL_ROOT:-.whl}/fla/
# (flash-linear-attention + fla-core) go into every lane: megatron's GatedDeltaNet (Qwen3-Next, Qwen3.5)
# runs its fla Triton kernels on GPU.
set -u -o pipefail
OUT=${PUB_OUT:-/tmp/gpu-published-out}
mkdir -p "$OUT/reports"
export OMP_NUM_THREADS=4 MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
stamp() { echo "== $* ($(date -u +%T))"; }
nvidia-smi -L
# layers / experts per config: real shapes, depth cut so one H200 holds bf16 + fp32 reference
declare -A LAYERS=( [deepseek-ai__DeepSeek-V3]=4 [deepseek-ai__DeepSeek-V3.1]=4 [moonshotai__Kimi-K2-Instruct]=2
                    [zai-org__GLM-4.5]=4 [openai__gpt-oss-120b]=2 [google__gemma-3-1b-it]=6 [google__gemma-3-4b-it]=6
                    [Qwen__Qwen3-Next-80B-A3B-Instruct]=4 [Qwen__Qwen3.5-0.8B]=4 [Qwen__Qwen3.6-35B-A3B]=4
                    [zai-org__GLM-4.5-Air]=2 )  # Air: layer 0 dense + one MoE layer (+ the MTP layer, MoE)
declare -A EXPERTS=( [deepseek-ai__DeepSeek-V3]=32 [deepseek-ai__DeepSeek-V3.1]=32 [moonshotai__Kimi-K2-Instruct]=32
                     [zai-org__GLM-4.5]=32 [openai__gpt-oss-120b]=32 [moonshotai__Moonlight-16B-A3B-Instruct]=32
                     [Qwen__Qwen3-Next-80B-A3B-Instruct]=128 [Qwen__Qwen3.6-35B-A3B]=128 [Qwen__Qwen3-235B-A22B]=32
                     [zai-org__GLM-4.5-Air]=32 )
same_bytes() { python3 - "$1" "$2" <<'PY'
import sys, torch
from mcore_bridge import quant
from mcore_bridge.hf_io import HFCheckpoint
src, b = HFCheckpoint(sys.argv[1]), HFCheckpoint(sys.argv[2])
# an MXFP4 source comes back in bf16 (MXFP4 export is refused): compared with its dequantised view
a = quant.open_quantized(src) if isinstance(quant.open_quantized(src), quant.MXFP4Checkpoint) else src
bad = sorted(set(a.names()) ^ set(b.names())) + [n for n in a.names() if n in b.tensors and not torch.equal(a.read(n).contiguous().view(torch.uint8), b.read(n).contiguous().view(torch.uint8))]
print(f"byte-exact: {not bad} ({len(a.names())} tensors{', vs the bf16 view of MXFP4' if a is not src else ''}){'' if not bad else ' differ: ' + ', '.join(bad[:5])}")
sys.exit(1 if bad else 0)
PY
}
CONFIGS=()  # ONLY's order when given (lane K of SPLIT takes every SPLIT-th: the caller balances the lanes)
for name in ${ONLY:-$(ls tests/published/*.json | xargs -n1 basename | sed 's/\.json$//')}; do
  [ -f "tests/published/$name.json" ] || { echo "FAILED: no tests/published/$name.json"; exit 1; }
  CONFIGS+=("$name")
done
make_one() {  # phase 1, one config
  name=$1; cfg=tests/published/$name.json; ck=/tmp/pub/$name
  mx=""; grep -q '"quant_method": *"mxfp4"' "$cfg" && mx="--mxfp4 $ck-mxfp4"
  grep -q '"quant_method": *"fp8"' "$cfg" && [[ " ${NO_QUANT:-} " != *" $name "* ]] && mx="--fp8 $ck-fp8"
  ls "$ck"/*.safetensors > /dev/null 2>&1 && { [ -z "$mx" ] || [ -f "${mx#* }/config.json" ]; } \
    && return 0  # made by an earlier call on this (warm) host
  python3 bench/reduce_published.py "$cfg" --out "$ck" --layers "${LAYERS[$name]:-2}" --mtp --device cuda \
      ${EXPERTS[$name]:+--experts ${EXPERTS[$name]}} $mx > "/tmp/pub/$name.make.log" 2>&1 \
    && echo "made $name: $(tail -c 300 /tmp/pub/$name.make.log | tail -1 | cut -c1-160)" \
    || { echo "FAILED: make $name: $(tail -3 /tmp/pub/$name.make.log)"; return 1; }
}
install() {  # one site per megatron-core version (before the lanes start: they share it)
  V=$1; SITE=/tmp/site$V
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" ${WHL_ROOT:-.whl}/m$V/*.whl \
      $(ls ${WHL_ROOT:-.whl}/fla/*.whl 2>/dev/null) || return 1
}
for V in "$@"; do install "$V" || { echo "FAILED: install megatron-core $V"; exit 1; }; done
export PYTHONPATH=/tmp/site$1:$PWD  # phase 1 writes MTP layers with mcore_bridge.zoo
export -f make_one; export LAYERS_DECL="$(declare -p LAYERS EXPERTS)"
mkdir -p /tmp/pub
stamp "phase 1: ${#CONFIGS[@]} checkpoints" | tee "$OUT/make.log"
printf '%s\n' "${CONFIGS[@]}" | xargs -P "${MAKE_JOBS:-4}" -I{} bash -c 'eval "$LAYERS_DECL"; make_one {}' \
  2>&1 | tee -a "$OUT/make.log"
if [ -n "${PRUNE:-}" ]; then  # disk: the bf16 weights of configs that run their quantised copy alone
  for name in "${CONFIGS[@]}"; do
    ck=/tmp/pub/$name
    { [ "${QUANT_ONLY:-}" = 1 ] || [[ " ${QUANT_ONLY:-} " == *" $name "* ]]; } && { [ -d "$ck-fp8" ] || [ -d "$ck-mxfp4" ]; } \
      && rm -f "$ck"/*.safetensors && echo "pruned the bf16 weights of $name" | tee -a "$OUT/make.log"
  done
fi
lane() {  # phase 2, one megatron-core version; lane K of SPLIT takes every SPLIT-th config
  V=$1; K=${2:-0}; rc=0
  FAILS=/tmp/pub-fails-$V-$K; : > "$FAILS"  # run() often sits in a pipeline (a subshell): rc via a file
  run() { "$@"; local r=$?; [ $r -eq 0 ] || { echo "FAILED (exit $r): $*"; echo "$*" >> "$FAILS"; }; }
  tail_or_why() { local out; out=$(cat); echo "$out" | grep -E "Error|error:|Killed" | tail -2; echo "$out" | tail -1; }
  SITE=/tmp/site$V
  export PYTHONPATH=$SITE:$PWD
  stamp "megatron-core $(python3 -c 'import megatron.core as m; print(m.__version__)') lane $K/${SPLIT:-1}"
  only_v=ONLY_$V  # ONLY_016="..." narrows one lane further
  i=-1
  for name in "${CONFIGS[@]}"; do
    if [ -n "${!only_v:-}" ] && [[ " ${!only_v} " != *" $name "* ]]; then continue; fi
    i=$((i + 1)); [ $((i % ${SPLIT:-1})) -eq "$K" ] || continue
    if [ -n "${DEADLINE:-}" ] && [ "$(date +%s)" -ge "$DEADLINE" ]; then
      echo "SKIPPED (deadline): $name"; rc=1; continue
    fi
    ck=/tmp/pub/$name; cfg=tests/published/$name.json
    [ -f "$ck/config.json" ] || { echo "FAILED: no checkpoint for $name"; rc=1; continue; }
    sources=("$ck")
    [ -d "$ck-mxfp4" ] && sources+=("$ck-mxfp4")
    qonly=""; [ "${QUANT_ONLY:-}" = 1 ] || [[ " ${QUANT_ONLY:-} " == *" $name "* ]] && qonly=1
    [ -d "$ck-mxfp4" ] && [ -n "$qonly" ] && sources=("$ck-mxfp4")  # the as-published copy alone
    if grep -q '"quant_method": *"fp8"' "$cfg" && [[ " ${NO_QUANT:-} " != *" $name "* ]]; then
      [ -d "$ck-fp8" ] || { echo "FAILED: no FP8 copy of $name (made before NO_QUANT named it?)"; rc=1; continue; }
      sources+=("$ck-fp8")
      [ -n "$qonly" ] && sources=("$ck-fp8")
    fi
    for src in "${sources[@]}"; do
      tag=$(basename "$src")
      if [[ " ${RT_SKIP:-} " != *" $name "* ]]; then
      stamp "m$V $tag: HF -> megatron -> HF (cuda)"
      run timeout ${STEP_TIMEOUT:-300} python3 -m mcore_bridge.cli export --model "$src" --to-hf --save "/tmp/rt-m$V-$tag" \
          --overwrite --device cuda $( [[ "$src" == *-fp8 ]] && echo --export-dtype fp8 ) 2>&1 | tail_or_why
      run same_bytes "$src" "/tmp/rt-m$V-$tag" 2>&1
      rm -rf "/tmp/rt-m$V-$tag"
      fi
      stamp "m$V $tag: verify ${VERIFY_ARGS:---dtype fp32,bf16}"
      rep=$OUT/reports/$tag-m$V
      run timeout ${STEP_TIMEOUT:-300} python3 -m mcore_bridge.cli verify --model "$src" --matrix "tp=1" ${VERIFY_ARGS:---dtype fp32,bf16} \
          --device cuda --report "$rep" 2>&1 | grep --line-buffered -E "PASS|FAIL|verdict|rror" | tail -4
      for f in "$rep"/*/*.md; do [ -f "$f" ] && cp "$f" "$rep/"; done  # the case pages one level up (the
      rm -rf "$rep/.cache"                                               # device returns two levels only)
    done
  done
  [ -s "$FAILS" ] && rc=1
  stamp "m$V done rc=$rc"
  return $rc
}
# BUDGET_S=N: no config starts after N s from here, and every step ends by then (a device call's limit
# minus the time to pack the results); the reports are then packed (PACK=1) even if steps were cut.
[ -n "${BUDGET_S:-}" ] && DEADLINE=$(( $(date +%s) + BUDGET_S )) && export DEADLINE
pids=()
if [ -n "${SERIAL:-}" ]; then  # one lane after another (disk: each removes its outputs as it goes)
  ( r=0; for V in "$@"; do lane "$V" 0 > "$OUT/published-m$V-0.log" 2>&1 || r=1; done; exit $r ) &
  pids+=($!)
else
  for V in "$@"; do
    for ((K = 0; K < ${SPLIT:-1}; K++)); do lane "$V" "$K" > "$OUT/published-m$V-$K.log" 2>&1 & pids+=($!); done
  done
fi
rc=0
if [ -n "${DEADLINE:-}" ]; then  # cut every lane at the deadline (their own steps stop then too)
  ( while [ "$(date +%s)" -lt "$DEADLINE" ]; do sleep 2; done; kill "${pids[@]}" 2>/dev/null
    pkill -f "mcore_bridge.cli" 2>/dev/null ) & watchdog=$!
fi
for p in "${pids[@]}"; do wait "$p" || rc=1; done
[ -n "${watchdog:-}" ] && kill "$watchdog" 2>/dev/null
if [ -n "${PACK:-}" ]; then  # one small archive: a device call returns 8 files, 2 folders deep, size-limited
  find "$OUT/reports" -name .cache -prune -exec rm -rf {} + 2>/dev/null
  tar czf "$OUT/published.tgz" -C "$OUT" reports $(cd "$OUT" && ls *.log) && rm -rf "$OUT/reports"
fi
for f in "$OUT"/published-m*.log; do  # a compact summary: the device returns the last 12,000 characters
  echo "--- $(basename "$f")"; grep -E "^== m[0-9]+ .*(->|verify)|byte-exact|PASS|FAIL|rror" "$f" | cut -c1-230
done
exit $rc
