"""Fine-tune an HF checkpoint with Megatron-LM's own training loop; HF safetensors in, HF safetensors out.

    # GPU (megatron-core 0.17+, whose wheel ships megatron.training): Megatron-LM's pretrain()
    torchrun --nproc-per-node 2 examples/finetune_hf.py --hf_model /models/Qwen3-8B \\
        --save /ckpt/run1 --tensor-model-parallel-size 2 --bf16 --train-iters 200
    # CPU (gloo, the tiny zoo model): the same model, data, loss and hooks through megatron-core's
    # schedule and optimizer (pretrain() asserts CUDA), HF safetensors at every --save-interval
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


from finetune_data import (LOSSES, ChatDataset, PackedRows, VLChatDataset, forward_step,  # noqa: E402,F401
                           make_dataset, make_vl_dataset, read_losses)


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


def is_vision_language(hf_model: str) -> bool:
    from mcore_bridge import Bridge

    return bool(getattr(Bridge(hf_model).family, "multimodal", False))


def dataset(args, data_dir: Path, length: int = 0):
    """This run's data set (text or image chat, made on rank 0 once), ``length`` rows; packed
    rows of ``args.samples_per_row`` samples when ``--packing true``."""
    from transformers import AutoTokenizer

    from mcore_bridge import Bridge

    bridge = Bridge(args.hf_model)
    tokenizer = AutoTokenizer.from_pretrained(bridge.source)
    vl = getattr(bridge.family, "multimodal", False)
    path = data_dir / ("vl_train.jsonl" if vl else "train.jsonl")
    if torch.distributed.get_rank() == 0:
        (make_vl_dataset if vl else make_dataset)(path)
    torch.distributed.barrier()
    k, seq = args.samples_per_row, args.sample_seq_length
    if vl:
        from transformers import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil.from_pretrained(bridge.source)
        data = VLChatDataset(path, tokenizer, processor, bridge.family, seq, length * k)
    else:
        data = ChatDataset(path, tokenizer, seq, length * k)
    return PackedRows(data, k) if args.packing else data


# ---- the final model's logits on a fixed sample (checked against the saved HF directory) ----------
def write_probe(args, hooks, data) -> None:
    """``--probe_out FILE``: the first sample of the data set (unpadded) and the final model's fp32
    logits on it (megatron's own forward; the last stage's rank 0 writes)."""
    if not args.probe_out:
        return
    from megatron.core import parallel_state as ps

    from verify.forward import megatron_logits

    s = data.data[0] if isinstance(data, PackedRows) else data[0]
    n = int(s["n_tokens"])
    ids = s["tokens"][:n][None]
    pos = s["position_ids"][:, :n][:, None] if "position_ids" in s else None
    vision = {k: s[k] for k in ("pixel_values", "image_grid_thw") if k in s}
    chunks = hooks.chunks
    for c in chunks:
        c.eval()
    with torch.no_grad():
        logits = megatron_logits(chunks, ids, int(hooks.bridge.family.cfg.require("vocab_size")), pos, vision or None)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        Path(args.probe_out).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"input_ids": ids, "position_ids": pos, "vision": vision, "logits": logits.float().cpu()},
                   args.probe_out)


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


# ---- CPU: the same pieces through megatron-core's schedule and optimizer ---------------------------
def train_cpu(args, hooks, data_dir):
    """Megatron-LM's loop as far as it runs on CPU: its sequential sampler, its micro-batches per
    step (``--global-batch-size / (--micro-batch-size x data-parallel size)``), megatron-core's DDP,
    Adam and schedule; HF safetensors at every ``--save-interval`` and at the end."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    from mcore_bridge.runtime import compat

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    with compat.scope("cpu"):  # megatron-core's CPU adaptations (RNG tracker, CUDA queries), this loop only
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                     pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                     create_gloo_process_groups=True)
        model_parallel_cuda_manual_seed(args.seed)
        dp, mbs = ps.get_data_parallel_world_size(), args.micro_batch_size
        micro = args.global_batch_size // (mbs * dp)
        data = dataset(args, data_dir, args.train_iters * args.global_batch_size)
        sampler = MegatronPretrainingSampler(total_samples=len(data), consumed_samples=0, micro_batch_size=mbs,
                                             data_parallel_rank=ps.get_data_parallel_rank(), data_parallel_size=dp)
        batches = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0))
        chunk = hooks.model_provider(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        chunk.config.finalize_model_grads_func = finalize_model_grads
        model = [DistributedDataParallel(chunk.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk)]
        for m in model:
            m.train()  # as Megatron-LM's train() does (full recomputation runs in training mode only)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=args.weight_decay,
                                                     clip_grad=0.0, params_dtype=torch.float32), model)
        for it in range(1, args.train_iters + 1):
            LOSSES.iteration = it
            model[0].zero_grad_buffer()
            opt.zero_grad()
            out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches,
                                              model=model, num_microbatches=micro, seq_length=args.seq_length,
                                              micro_batch_size=mbs, forward_only=False)
            opt.step()
            if out and it % args.log_interval == 0 and ps.get_tensor_model_parallel_rank() == 0:
                s, n = torch.stack([o["lm loss"] for o in out]).sum(0)
                print(f"iteration {it}/{args.train_iters}: answer loss {(s / n).item():.4f}", flush=True)
            if it % args.save_interval == 0 or it == args.train_iters:
                path = hooks.save(it, model)
                if path and torch.distributed.get_rank() == 0:
                    print(f"saved HF safetensors: {path}", flush=True)
        write_probe(args, hooks, data)


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
