#!/usr/bin/env bash
# Megatron-LM's own training loop (megatron.training from the megatron-core wheel) on our checkpoints,
# one GPU through the device tool (issue 15, "real client"). Needs the 0.17+ wheel in $WHEELS.
#   bash bench/megatron_lm_loop.sh            # Qwen3-8B shapes, 2 layers; with and without the distributed optimizer
# For each optimizer: HF -> our export --to-mcore -> Megatron-LM pretrain (--load ... --finetune, 3 iterations,
# --save: model + optimizer + RNG + args) -> our export --load SAVE --to-hf -> bench/megatron_lm_loop.py check.
# Results: $OUT/megatron_lm_loop_{plain,distopt}.json and $OUT/megatron_lm_loop.log.
set -u -o pipefail
OUT=${OUT:-/tmp/mlm-out}
W=${WORK:-/tmp/mlm-work}
WHEELS=${WHEELS:-.whl/m019}
LAYERS=${LAYERS:-2}
HF=${HF:-/tmp/qwen3-8b-l$LAYERS}   # shared with bench/gpu_versions_1gpu.sh
mkdir -p "$OUT" "$W"
LOG=$OUT/megatron_lm_loop.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-mlm $WHEELS/*.whl || exit 1
# TORCHDYNAMO_DISABLE: the bench's own choice (no compile time inside a short lease); the library sets nothing
export PYTHONPATH=/tmp/site-mlm:$PWD TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=4 MCORE_BRIDGE_QUIET=1 PYTHONWARNINGS=ignore
CLI="python3 -m mcore_bridge.cli"
step() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }
nvidia-smi -L | tee -a "$LOG"
python3 -c "import megatron.core, torch, transformers; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
step make_checkpoint
[ -f "$HF/config.json" ] || python3 bench/make_checkpoint.py --config qwen3-8b --out "$HF" --layers "$LAYERS" \
    --max-shard-gb 4 2>&1 | tail -1 | tee -a "$LOG"
step export --to-mcore
$CLI export --model "$HF" --to-mcore --save "$W/mc" --device cuda --overwrite >>"$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
rc=0
for v in plain distopt; do
  flag=""; [ $v = distopt ] && flag=--dist-opt
  rm -rf "$W/save-$v" "$W/hf-$v"
  step "Megatron-LM pretrain ($v)"
  torchrun --nproc-per-node 1 bench/megatron_lm_loop.py train --hf "$HF" --load "$W/mc" --save "$W/save-$v" \
      --result "$OUT/megatron_lm_loop_$v.json" --tensors "$W/t-$v.pt" $flag >>"$LOG" 2>&1 \
      || { echo "train $v failed"; tail -40 "$LOG"; rc=1; continue; }
  grep -E "iteration +[0-9]+/|lm loss|loading|saving|saved checkpoint|successfully" "$LOG" | tail -12
  ls -la "$W/save-$v" "$W/save-$v"/iter_* | tee -a "$LOG"
  step "export Megatron-LM's checkpoint to HF ($v)"
  $CLI export --load "$W/save-$v" --model "$HF" --to-hf --save "$W/hf-$v" --device cuda >>"$LOG" 2>&1 \
      || { echo "export $v failed"; tail -30 "$LOG"; rc=1; continue; }
  step "check ($v)"
  python3 bench/megatron_lm_loop.py check --hf "$HF" --save "$W/save-$v" --trained-hf "$W/hf-$v" \
      --result "$OUT/megatron_lm_loop_$v.json" --tensors "$W/t-$v.pt" >>"$LOG" 2>&1 \
      || { echo "check $v failed"; tail -30 "$LOG"; rc=1; continue; }
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: r[k] for k in ('megatron_core','distributed_optimizer','step_losses','first_step','trained_logits','exported')}))" "$OUT/megatron_lm_loop_$v.json"
  rm -rf "$W/save-$v" "$W/hf-$v"
done
step done
exit $rc
