"""Fine-tune an HF checkpoint with Megatron-LM's own training loop; HF safetensors in, HF safetensors out.

    # GPU (megatron-core 0.17+, whose wheel ships megatron.training): Megatron-LM's pretrain()
    torchrun --nproc-per-node 2 examples/finetune_hf.py --hf_model /models/Qwen3-8B \\
        --save /ckpt/run1 --tensor-model-parallel-size 2 --bf16 --train-iters 200
    # CPU (gloo, the tiny zoo model): the same model, data, loss and hooks through the pieces of
    # Megatron-LM's loop that run there (pretrain() asserts CUDA; finetune_cpu.py): its sampler and
    # save_checkpoint_and_time (HF safetensors beside), megatron-core's schedule and optimizer, --load resumes
    torchrun --nproc-per-node 1 examples/finetune_hf.py --hf_model builtin:qwen3 --save /tmp/ft

Every Megatron-LM argument works (given ones override the defaults below); the model arguments
come from the HF config (``megatron_lm.model_arguments``; a Qwen-VL model: its language model's,
with mRoPE). Added flags (``megatron_lm.add_arguments``): ``--hf_model``, ``--load_safetensors
true`` (default here), ``--save_safetensors true`` (default here), ``--save_safetensors_dir``
(default ``<--save>/hf``), ``--hf_lora_rank R``, ``--save_safetensors_adapter_only true``,
``--packing true``, ``--freeze_vit / --freeze_aligner / --freeze_llm true``. Megatron-LM's
recomputation and MoE options (``--recompute-granularity`` ..., ``--moe-expert-capacity-factor`` ...)
reach the model (``megatron_lm.training_options``). ``--load`` defaults to ``--save``: a restarted
run resumes from Megatron-LM's own checkpoint (model, optimizer, iteration) instead of reading HF
again. Example-only flags: ``--data_dir``, ``--loss_log FILE`` (per micro-batch answer-loss sums,
JSONL: ``finetune_data.read_losses``), ``--probe_out FILE`` (the final model's fp32 logits on the
first sample, to check the saved HF directory against).

The data set is made here (``--data_dir``, default ``<--save>/data``; see ``finetune_data.py``):
chat samples rendered by the model's tokenizer and chat template, the loss on the answer tokens
only -- a question about two digits for a text model, a solid-colour image and "what is this ?"
for a vision-language one (pixels and image tokens from the model's image processor).
``--packing true``: one packed row (THD) holds the samples of one unpacked micro-batch; Megatron-LM
then runs ``--micro-batch-size 1`` rows of ``M x --seq-length`` tokens and ``--global-batch-size /
M`` rows per step, so its sequential sampler gives every step the same samples as unpacked.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from mcore_bridge import megatron_lm


from finetune_cpu import train_cpu  # noqa: E402
from finetune_data import (LOSSES, ChatDataset, PackedRows, VLChatDataset, dataset, forward_step,  # noqa: E402,F401
                           make_dataset, make_vl_dataset, read_losses, write_probe)


# ---- arguments -------------------------------------------------------------------------------------
def defaults(hf_model: str, save: str | None) -> list[str]:
    d = megatron_lm.model_arguments(hf_model) + [
        "--tokenizer-type", "NullTokenizer", "--seq-length", "32", "--micro-batch-size", "8",
        "--global-batch-size", "8", "--train-iters", "40", "--lr", "2e-3", "--min-lr", "2e-3",
        "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--weight-decay", "0.0", "--clip-grad", "0.0",
        "--save-interval", "20", "--eval-iters", "0", "--eval-interval", "100000", "--log-interval", "5",
        "--transformer-impl", "local", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion", "--no-rope-fusion", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
        "--ckpt-format", "torch_dist", "--seed", "1234", "--distributed-timeout-minutes", "10",
        "--num-workers", "0", "--load_safetensors", "true", "--save_safetensors", "true"]
    return d + (["--load", save] if save else [])


def _last(argv: list[str], flag: str, default: str) -> str:
    """The value argparse would take for ``flag`` (its last occurrence)."""
    hits = [i for i, a in enumerate(argv) if a == flag]
    return argv[hits[-1] + 1] if hits else default


def packed_argv(argv: list[str]) -> tuple[list[str], int, int]:
    """``--packing true``: a packed row holds the samples of one unpacked micro-batch (``--micro-batch-size
    M``, ``--seq-length S``), so Megatron-LM runs micro-batches of 1 row of ``M x S`` tokens and
    ``--global-batch-size / M`` rows per step: the same samples per step, in the same micro-batches.
    Returns (argv with those three set, M, S)."""
    m, seq = int(_last(argv, "--micro-batch-size", "1")), int(_last(argv, "--seq-length", "0"))
    g = int(_last(argv, "--global-batch-size", str(m)))
    if g % m:
        sys.exit(f"error: --packing true: --global-batch-size {g} is not a multiple of --micro-batch-size {m} "
                 f"(the samples of one packed row)")
    return argv + ["--micro-batch-size", "1", "--global-batch-size", str(g // m), "--seq-length", str(m * seq)], m, seq


@contextlib.contextmanager
def no_device_architecture():
    """CPU only: Megatron-LM's argument validation asks the GPU's architecture when tp > 1 (to
    require ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for CUDA streams before Blackwell); a machine without a
    GPU has none, and no CUDA streams, so while the arguments are validated the question answers
    "Blackwell or later" (no requirement). The example's choice, restored afterwards; with a GPU
    nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.training import arguments

    original = arguments.get_device_arch_version
    arguments.get_device_arch_version = lambda: 10
    try:
        yield
    finally:
        arguments.get_device_arch_version = original


def parse():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--hf_model", "--hf-model", dest="hf_model", required=True)
    pre.add_argument("--save")
    pre.add_argument("--data_dir", "--data-dir", dest="data_dir")
    pre.add_argument("--loss_log", "--loss-log", dest="loss_log")
    pre.add_argument("--probe_out", "--probe-out", dest="probe_out")
    known, rest = pre.parse_known_args()
    from megatron.training.arguments import parse_and_validate_args

    user = rest + ["--hf_model", known.hf_model] + (["--save", known.save] if known.save else [])
    argv = defaults(known.hf_model, known.save) + user
    packing = megatron_lm._bool(_last(argv, "--packing", "false"))
    per_row, seq = 1, None
    if packing:
        argv, per_row, seq = packed_argv(argv)
    sys.argv = [sys.argv[0]] + argv
    with no_device_architecture():
        args = parse_and_validate_args(extra_args_provider=megatron_lm.add_arguments)
    args.samples_per_row, args.sample_seq_length = per_row, seq or args.seq_length
    data_dir = Path(known.data_dir or Path(args.save or ".") / "data")
    LOSSES.path = known.loss_log
    args.probe_out = known.probe_out
    return args, data_dir


# ---- GPU: Megatron-LM's pretrain -------------------------------------------------------------------
@contextlib.contextmanager
def prebuilt_dataset_helpers():
    """Megatron-LM's initialisation runs ``make`` on its C++ dataset helpers; the wheel ships them
    prebuilt without the Makefile, so ``make`` fails. This example's data set needs no helpers: while
    pretrain runs, that step is its barrier only (the example's choice; restored afterwards)."""
    from megatron.training import initialize

    original = initialize._compile_dependencies
    initialize._compile_dependencies = lambda: torch.distributed.barrier()
    try:
        yield
    finally:
        initialize._compile_dependencies = original


def train_gpu(args, hooks, data_dir):
    from megatron.core.enums import ModelType
    from megatron.training import get_args, pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    def datasets_provider(num_samples):
        return dataset(args, data_dir, int(num_samples[0])), None, None

    def step(data_iterator, model):  # the loss log's iteration: Megatron-LM's (0-based while it runs)
        LOSSES.iteration = get_args().curr_iteration + 1
        return forward_step(data_iterator, model)

    datasets_provider.is_distributed = True
    with prebuilt_dataset_helpers(), megatron_lm.saving_safetensors(hooks):
        pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
                 step, model_provider=hooks.model_provider)
    write_probe(args, hooks, dataset(args, data_dir, 1))


def main():
    from mcore_bridge.errors import UsageError

    try:
        megatron_lm.require_megatron_training()
        args, data_dir = parse()
        hooks = megatron_lm.HFHooks.from_args(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    (train_gpu if torch.cuda.is_available() else train_cpu)(args, hooks, data_dir)


if __name__ == "__main__":
    main()
