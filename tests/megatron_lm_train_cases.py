"""Pool cases: a few training steps the way Megatron-LM's loop takes them, on CPU, with the HF hooks
of ``mcore_bridge.megatron_lm`` (megatron-core 0.17+, where ``megatron.training`` exists).

``megatron.training.pretrain`` itself cannot run on CPU: it all-reduces CUDA tensors
unconditionally (``torch.tensor(..., device='cuda')`` for the start time in ``pretrain``, the
iteration in ``checkpointing.read_metadata``). So the loop is assembled from the pieces it calls:
Megatron-LM's own argument parser (with ``megatron_lm.add_arguments``) and global args, the model
from ``HFHooks.model_provider`` called as ``get_model`` calls it, megatron-core's
``DistributedDataParallel``, ``get_megatron_optimizer`` and ``OptimizerParamScheduler``, the
``get_forward_backward_func`` schedule, and Megatron-LM's own ``save_checkpoint_and_time`` (run
inside ``saving_safetensors``, as ``pretrain``'s saves are). Resumption reads Megatron-LM's
checkpoint with megatron-core's ``dist_checkpointing.load`` (the model and optimizer entries, with the
sharding metadata Megatron-LM recorded), as its ``load_checkpoint`` does after the tracker read.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

SEQ, MBS = 16, 2


def batch(step: int, vocab: int, mrope: bool = False) -> dict:
    """One of two deterministic batches (odd / even steps: a tiny data set, seen again); the loss mask drops the first half of every sample (the
    "prompt"), so only the "answer" tokens count."""
    g = torch.Generator().manual_seed(1000 + step % 2)
    x = torch.randint(0, vocab, (MBS, SEQ + 1), generator=g)
    mask = torch.ones(MBS, SEQ)
    mask[:, : SEQ // 2] = 0
    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
    # text-only rows of a vision-language model: its 3-D mRoPE positions are t = h = w
    return {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": mask,
            "position_ids": pos[None].expand(3, -1, -1) if mrope else pos}


def forward_step(data_iterator, model):
    """Megatron-LM's forward_step contract: (per-token losses, loss_func -> (sum, tokens, report))."""
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

    def loss_func(output):
        mask = b["loss_mask"].reshape(-1)
        loss = (output.float().reshape(-1) * mask).sum()
        n = mask.sum()
        return loss, n.to(torch.int), {"lm loss": torch.stack([loss.detach(), n])}

    return out, loss_func


def _megatron_lm_args(source: str, tp: int, pp: int, save: str, lora_rank: int):
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.global_vars import set_global_variables

    from mcore_bridge import megatron_lm

    argv = megatron_lm.model_arguments(source) + [
        "--micro-batch-size", str(MBS), "--global-batch-size", str(MBS), "--seq-length", str(SEQ),
        "--train-iters", "8", "--lr", "1e-3", "--min-lr", "1e-3", "--lr-decay-style", "constant",
        "--weight-decay", "0.0", "--clip-grad", "0.0", "--tokenizer-type", "NullTokenizer",
        "--transformer-impl", "local", "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp), "--save", save, "--save-interval", "2",
        "--ckpt-format", "torch_dist", "--no-save-rng", "--no-load-rng", "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0", "--no-gradient-accumulation-fusion",
        "--hf_model", source, "--load_safetensors", "true", "--save_safetensors", "true"]
    if lora_rank:
        argv += ["--hf_lora_rank", str(lora_rank), "--save_safetensors_adapter_only", "true"]
    sys_argv, sys.argv = sys.argv, ["train"] + argv
    try:
        args = parse_and_validate_args(extra_args_provider=megatron_lm.add_arguments)
    finally:
        sys.argv = sys_argv
    _forget_globals()  # parse_and_validate_args set up the micro-batch calculator already
    set_global_variables(args, build_tokenizer=False)
    return args


def _forget_globals():
    """Megatron-LM's process globals (args, timers, micro-batch calculator), gone: the pool worker
    serves later cases."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training.global_vars import destroy_global_vars

    destroy_global_vars()
    destroy_num_microbatches_calculator()


@contextlib.contextmanager
def _no_cuda_generator():
    """Test-only, CPU: Megatron-LM's ``save_checkpoint`` records ``torch.cuda.get_rng_state()``
    even with ``--no-save-rng`` (checkpointing.get_rng_state); a machine without a GPU has no CUDA
    generator, so the CPU generator's state stands in for it while Megatron-LM saves."""
    original = torch.cuda.get_rng_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    try:
        yield
    finally:
        torch.cuda.get_rng_state = original


def _parallel_state(tp: int, pp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mcore_bridge.runtime import dist as rt

    ps.destroy_model_parallel()
    rt._destroy_subgroups()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 create_gloo_process_groups=True)
    model_parallel_cuda_manual_seed(1234)


def _setup(hooks, args):
    """get_model + setup_model_and_optimizer, as Megatron-LM does them (CPU: no distributed
    optimizer, no gradient clipping -- both assert CUDA tensors)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunk = hooks.model_provider(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    ddp = DistributedDataParallel(chunk.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk)
    # as Megatron-LM's train() does: data-parallel and tied-embedding (first/last stage) gradient sync
    from megatron.core.distributed import finalize_model_grads

    chunk.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, clip_grad=0.0,
                                                 weight_decay=0.0, params_dtype=torch.float32), [ddp])
    sched = OptimizerParamScheduler(opt, init_lr=args.lr, max_lr=args.lr, min_lr=args.lr, lr_warmup_steps=0,
                                    lr_decay_steps=8, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=8, wd_incr_style="constant")
    return [ddp], opt, sched


def _step(model, opt, sched, step: int, vocab: int, mrope: bool = False):
    """One train_step: forward-backward over one micro-batch, optimizer step. The loss (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in model:
        m.zero_grad_buffer()
    opt.zero_grad()
    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch(step, vocab, mrope)]),
                                      model=model, num_microbatches=1, seq_length=SEQ, micro_batch_size=MBS,
                                      forward_only=False)
    ok, _, _ = opt.step()
    assert ok
    sched.step(increment=1)
    if not out:
        return None
    s, n = out[0]["lm loss"]
    return (s / n).item()


def train(source: str, tp: int, pp: int, out: str, steps: int = 4, lora_rank: int = 0, resume: bool = True) -> dict:
    """``steps`` steps with Megatron-LM's saves every 2 (HF beside them); then a fresh process state
    resumes from Megatron-LM's checkpoint at step 2 and takes steps 3.. again. Returns losses, the
    HF directories written, and megatron's fp32 logits of the final model on a probe (last stage)."""
    save = str(Path(out) / "mlm")
    args = _megatron_lm_args(source, tp, pp, save, lora_rank)
    try:
        return _train(args, save, steps, resume)
    finally:
        _forget_globals()


def _train(args, save: str, steps: int, resume: bool) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.training import training

    from mcore_bridge import megatron_lm
    from verify.forward import megatron_logits

    _parallel_state(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    hooks = megatron_lm.HFHooks.from_args(args)
    original = hooks_original(training)
    model, opt, sched = _setup(hooks, args)
    vocab = int(hooks.bridge.family.cfg.require("vocab_size"))
    mrope = bool(getattr(hooks.bridge.family, "multimodal", False))
    tokens = _text_tokens(hooks.bridge.family, vocab) if mrope else vocab  # no image tokens without pixels
    losses = []
    with megatron_lm.saving_safetensors(hooks):
        wrapped_inside = training.save_checkpoint is not original
        for it in range(1, steps + 1):
            losses.append(_step(model, opt, sched, it, tokens, mrope))
            if it % args.save_interval == 0:
                with _no_cuda_generator():
                    training.save_checkpoint_and_time(it, model, opt, sched, 0, {})
    restored = training.save_checkpoint is original
    probe = torch.randint(0, tokens, (2, SEQ), generator=torch.Generator().manual_seed(7))
    for m in model:
        m.eval()
    pos = torch.arange(SEQ).expand(3, 2, -1) if mrope else None
    logits = megatron_logits([m.module for m in model], probe, vocab, pos)
    result = {"losses": losses, "hf_dirs": [str(p) for _, p in hooks.saved], "wrapped_inside": wrapped_inside,
              "restored": restored, "probe": probe, "logits": logits}
    if not resume:
        return result

    # resume: fresh model (no HF read: --load holds Megatron-LM's checkpoint), Megatron-LM's checkpoint
    # of step 2 read by megatron-core's loader, steps 3.. again
    args.load = save
    resume_hooks = megatron_lm.HFHooks.from_args(args)
    assert resume_hooks.resuming()
    tracker = (Path(save) / megatron_lm.TRACKER).read_text().strip()  # Megatron-LM's: the last save
    resume_dir = Path(save) / "iter_0000002"
    model2, opt2, sched2 = _setup(resume_hooks, args)
    untouched = [p.detach().clone() for p in model2[0].parameters()]
    meta = dist_checkpointing.load_content_metadata(str(resume_dir))
    model_sd = model2[0].module.sharded_state_dict(metadata=meta)  # unwrapped, as load_checkpoint does
    state = {"model": model_sd, "optimizer": opt2.sharded_state_dict({"model": model_sd}, is_loading=True,
                                                                      metadata=meta)}
    state = dist_checkpointing.load(state, str(resume_dir))
    model2[0].module.load_state_dict(state["model"], strict=True)
    opt2.load_state_dict(state["optimizer"])
    changed_by_load = any(not torch.equal(a, b) for a, b in zip(untouched, model2[0].parameters()))
    resumed = [_step(model2, opt2, sched2, it, tokens, mrope) for it in range(3, steps + 1)]
    return {**result, "resumed": resumed, "changed_by_load": changed_by_load,
            "hf_read_on_resume": not resume_hooks.resuming(), "tracker": tracker}


def _text_tokens(family, vocab: int) -> int:
    """Token ids below this are text (the vision-language model's special ids are above)."""
    v = family.vision_settings()
    cfg = family.full_config
    return min(vocab, v.image_token_id, v.video_token_id, int(cfg["vision_start_token_id"]),
               int(cfg["vision_end_token_id"]))


_ORIGINAL = {}


def hooks_original(training):
    """Megatron-LM's own save_checkpoint (as first seen in this process)."""
    return _ORIGINAL.setdefault("save_checkpoint", training.save_checkpoint)
