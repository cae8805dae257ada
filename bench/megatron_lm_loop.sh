#!/usr/bin/env bash
# Megatron-LM's own training loop (megatron.training from the megatron-core wheel) on our checkpoints,
# one GPU through the device tool (issue 15, "real client"). Needs the 0.17+ wheel in $WHEELS.
#   bash bench/megatron_lm_loop.sh                         # Qwen3-8B shapes, 2 layers; plain and distributed optimizer
#   MODEL=builtin:llama VARIANTS=plain bash bench/megatron_lm_loop.sh
# For each optimizer: HF -> our export --to-mcore (bf16) -> Megatron-LM pretrain (--load ... --finetune,
# 3 iterations, --save: model + optimizer + RNG + args) -> our export --load SAVE --to-hf ->
# bench/megatron_lm_loop.py check. Results: $OUT/mlm_<tag>_<variant>.json and $OUT/mlm_<tag>.log.
set -u -o pipefail
OUT=${OUT:-/tmp/mlm-out}
W=${WORK:-/tmp/mlm-work}
WHEELS=${WHEELS:-.whl/m019}
MODEL=${MODEL:-qwen3-8b-l2}
VARIANTS=${VARIANTS:-plain distopt}
mkdir -p "$OUT" "$W"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-mlm $WHEELS/*.whl || exit 1
# TORCHDYNAMO_DISABLE: the bench's own choice (no compile time inside a short lease); the library sets nothing
export PYTHONPATH=/tmp/site-mlm:$PWD TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=4 MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
case "$MODEL" in
  builtin:*) TAG=${MODEL#builtin:}; HF=$(python3 -c "from mcore_bridge import zoo; print(zoo.materialize('$TAG'))") ;;
  qwen3-8b-l*) TAG=$MODEL; HF=/tmp/$MODEL   # shared with bench/gpu_versions_1gpu.sh
     [ -f "$HF/config.json" ] || python3 bench/make_checkpoint.py --config qwen3-8b --out "$HF" \
         --layers "${MODEL#qwen3-8b-l}" --max-shard-gb 4 2>&1 | tail -1 ;;
  *) echo "MODEL: builtin:NAME or qwen3-8b-lN"; exit 2 ;;
esac
LOG=$OUT/mlm_$TAG.log
CLI="python3 -m mcore_bridge.cli"
step() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }
python3 -c "import megatron.core, torch, transformers; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
step "export --to-mcore $TAG"
$CLI export --model "$HF" --to-mcore --dtype bf16 --save "$W/mc-$TAG" --device cuda --overwrite >>"$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
rc=0
for v in $VARIANTS; do
  flag=""; [ $v = distopt ] && flag=--dist-opt
  S=$W/save-$TAG-$v; B=$W/hf-$TAG-$v; R=$OUT/mlm_${TAG}_$v.json
  rm -rf "$S" "$B"
  step "Megatron-LM pretrain ($TAG, $v)"
  if ! torchrun --nproc-per-node 1 bench/megatron_lm_loop.py train --hf "$HF" --load "$W/mc-$TAG" --save "$S" \
      --result "$R" --tensors "$W/t.pt" $flag >>"$LOG" 2>&1; then
    echo "train $v failed"; tail -40 "$LOG"; rc=1
  else
    grep -E "loading release|successfully loaded|iteration +[0-9]+/|successfully saved" "$LOG" | tail -6
    step "export Megatron-LM's checkpoint to HF ($TAG, $v)"
    if ! $CLI export --load "$S" --model "$HF" --to-hf --save "$B" --device cuda >>"$LOG" 2>&1; then
      echo "export $v failed"; tail -20 "$LOG"; rc=1
    else
      grep -i "ignored\|not read\|skipp" "$LOG" | tail -2
      step "check ($TAG, $v)"
      python3 bench/megatron_lm_loop.py check --hf "$HF" --save "$S" --trained-hf "$B" --result "$R" \
          --tensors "$W/t.pt" >>"$LOG" 2>&1 || { echo "check $v failed"; tail -30 "$LOG"; rc=1; }
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: r.get(k) for k in ('megatron_core','distributed_optimizer','step_losses','first_step','trained_logits','exported','checkpoint')}))" "$R"
    fi
  fi
  rm -rf "$S" "$B" "$W/t.pt"
done
rm -rf "$W/mc-$TAG"
step "done rc=$rc"
exit $rc
