"""Fine-tune an HF checkpoint with Megatron-LM's own training loop; HF safetensors in, HF safetensors out.

    # GPU (megatron-core 0.17+, whose wheel ships megatron.training): Megatron-LM's pretrain()
    torchrun --nproc-per-node 2 examples/finetune_hf.py --hf_model /models/Qwen3-8B \\
        --save /ckpt/run1 --tensor-model-parallel-size 2 --bf16 --train-iters 200
    # CPU (gloo, the tiny zoo model): the same model, data, loss and hooks through megatron-core's
    # schedule and optimizer (pretrain() asserts CUDA), HF safetensors at every --save-interval
    torchrun --nproc-per-node 1 examples/finetune_hf.py --hf_model builtin:qwen3 --save /tmp/ft

Every Megatron-LM argument works (given ones override the defaults below); the model arguments
come from the HF config (``megatron_lm.model_arguments``). Added flags (``megatron_lm.add_arguments``):
``--hf_model``, ``--load_safetensors true`` (default here), ``--save_safetensors true`` (default here),
``--save_safetensors_dir`` (default ``<--save>/hf``), ``--hf_lora_rank R`` and
``--save_safetensors_adapter_only true``. ``--load`` defaults to ``--save``: a restarted run resumes
from Megatron-LM's own checkpoint (model, optimizer, iteration) instead of reading HF again.

The data set is made here (``--data_dir``, default ``<--save>/data``): chat samples (a question about
two digits, the answer the first of them) as JSONL, rendered by the model's tokenizer and chat
template; the loss counts the answer tokens only (the loss mask is 0 on the prompt and padding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from pathlib import Path

import torch

from mcore_bridge import megatron_lm


# ---- data: chat samples, rendered by the tokenizer's chat template, loss on answers only ------------
def make_dataset(path: Path, n: int = 512, seed: int = 0) -> Path:
    """A small local chat data set (JSONL, one ``{"messages": [...]}`` per line), written once."""
    if path.exists():
        return path
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randrange(10), rng.randrange(10)
            messages = [{"role": "user", "content": f"what is the first of {a} and {b} ?"},
                        {"role": "assistant", "content": str(a)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


class ChatDataset(torch.utils.data.Dataset):
    """Token ids, labels (next tokens) and a loss mask that is 1 only where the label is an answer
    token (the assistant turn after the prompt the chat template renders), padded to ``seq``.
    ``length``: the samples Megatron-LM's sampler asks for (the file is repeated)."""

    def __init__(self, path: Path, tokenizer, seq: int, length: int = 0):
        self.length = length
        self.samples = []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for line in open(path):
            messages = json.loads(line)["messages"]
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if ids[:n_prompt] != tokenizer(prompt, add_special_tokens=False)["input_ids"] or len(ids) > seq + 1:
                raise ValueError(f"{path}: the rendered prompt is not a prefix of the sample, or the sample "
                                 f"is longer than --seq-length {seq}: {full!r}")
            x = torch.full((seq + 1,), pad, dtype=torch.long)
            x[: len(ids)] = torch.tensor(ids)
            mask = torch.zeros(seq)
            mask[n_prompt - 1: len(ids) - 1] = 1.0  # label i is token i + 1: the answer's tokens
            self.samples.append({"tokens": x[:-1], "labels": x[1:], "loss_mask": mask})

    def __len__(self):
        return max(self.length, len(self.samples))

    def __getitem__(self, i):
        return self.samples[i % len(self.samples)]


def forward_step(data_iterator, model):
    """Megatron-LM's forward_step: per-token losses and a loss function over the answer tokens."""
    b = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels, mask = b["tokens"].to(device), b["labels"].to(device), b["loss_mask"].to(device)
    pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    out = model(tokens, pos, None, labels=labels)

    def loss_func(output):
        loss = (output.float().reshape(-1) * mask.reshape(-1)).sum()
        n = mask.sum()
        return loss, n.to(torch.int), {"lm loss": torch.stack([loss.detach(), n.float()])}

    return out, loss_func


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
        "--load_safetensors", "true", "--save_safetensors", "true"]
    return d + (["--load", save] if save else [])


def parse():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--hf_model", "--hf-model", dest="hf_model", required=True)
    pre.add_argument("--save")
    pre.add_argument("--data_dir", "--data-dir", dest="data_dir")
    known, rest = pre.parse_known_args()
    from megatron.training.arguments import parse_and_validate_args

    user = rest + ["--hf_model", known.hf_model] + (["--save", known.save] if known.save else [])
    sys.argv = [sys.argv[0]] + defaults(known.hf_model, known.save) + user
    args = parse_and_validate_args(extra_args_provider=megatron_lm.add_arguments)
    data_dir = Path(known.data_dir or Path(args.save or ".") / "data")
    return args, data_dir


def dataset(args, data_dir: Path, length: int = 0):
    from transformers import AutoTokenizer

    from mcore_bridge import Bridge

    path = data_dir / "train.jsonl"
    if torch.distributed.get_rank() == 0:
        make_dataset(path)
    torch.distributed.barrier()
    return ChatDataset(path, AutoTokenizer.from_pretrained(Bridge(args.hf_model).source), args.seq_length, length)


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
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    def datasets_provider(num_samples):
        return dataset(args, data_dir, int(num_samples[0])), None, None

    datasets_provider.is_distributed = True
    with prebuilt_dataset_helpers(), megatron_lm.saving_safetensors(hooks):
        pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
                 forward_step, model_provider=hooks.model_provider)


# ---- CPU: the same pieces through megatron-core's schedule and optimizer ---------------------------
def train_cpu(args, hooks, data_dir):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mcore_bridge.runtime import compat

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    with compat.scope("cpu"):  # megatron-core's CPU adaptations (RNG tracker, CUDA queries), this loop only
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                     pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                     create_gloo_process_groups=True)
        model_parallel_cuda_manual_seed(args.seed)
        data = dataset(args, data_dir)
        chunk = hooks.model_provider(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        chunk.config.finalize_model_grads_func = finalize_model_grads
        model = [DistributedDataParallel(chunk.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk)]
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=args.weight_decay,
                                                     clip_grad=0.0, params_dtype=torch.float32), model)
        loader = torch.utils.data.DataLoader(data, batch_size=args.micro_batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(args.seed))
        batches = iter(())
        for it in range(1, args.train_iters + 1):
            model[0].zero_grad_buffer()
            opt.zero_grad()
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),
                                              model=model, num_microbatches=1, seq_length=args.seq_length,
                                              micro_batch_size=args.micro_batch_size, forward_only=False)
            opt.step()
            if out and it % args.log_interval == 0:
                s, n = out[0]["lm loss"]
                print(f"iteration {it}/{args.train_iters}: answer loss {(s / n).item():.4f}", flush=True)
            if it % args.save_interval == 0 or it == args.train_iters:
                path = hooks.save(it, model)
                if path and torch.distributed.get_rank() == 0:
                    print(f"saved HF safetensors: {path}", flush=True)


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
