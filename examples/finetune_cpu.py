"""The CPU path of ``finetune_hf.py``: Megatron-LM's ``pretrain`` asserts CUDA, so on CPU the example
runs the same model, data, loss and hooks through the pieces of Megatron-LM's loop that run there:
its sequential sampler, its micro-batches per step (``--global-batch-size / (--micro-batch-size x
data-parallel size)``), megatron-core's DDP, Adam and schedule, and Megatron-LM's own
``save_checkpoint_and_time`` (torch_dist with the optimizer, under ``--save``; HF safetensors beside
it through ``megatron_lm.saving_safetensors``, as in ``pretrain``). A ``--load`` holding a
Megatron-LM checkpoint resumes from it: model and optimizer read with megatron-core's
``dist_checkpointing`` as Megatron-LM's ``load_checkpoint`` does after its tracker read (that
function itself all-reduces CUDA tensors), the sampler continuing after the samples consumed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from finetune_data import LOSSES, dataset, forward_step, write_probe
from mcore_bridge import megatron_lm


@contextlib.contextmanager
def megatron_lm_globals(args):
    """Megatron-LM's process globals (its args, timers) for its save function, removed afterwards."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training.global_vars import destroy_global_vars, set_global_variables

    destroy_global_vars()
    destroy_num_microbatches_calculator()
    set_global_variables(args, build_tokenizer=False)
    try:
        yield
    finally:
        destroy_global_vars()
        destroy_num_microbatches_calculator()


@contextlib.contextmanager
def cpu_rng_state():
    """Megatron-LM's ``save_checkpoint`` records ``torch.cuda.get_rng_state()``; a machine without a
    GPU has no CUDA generator, so the CPU generator's state stands in for it while Megatron-LM saves
    (the example's choice on CPU, restored afterwards)."""
    original = torch.cuda.get_rng_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    try:
        yield
    finally:
        torch.cuda.get_rng_state = original


def resume(args, hooks, chunk, opt, sched) -> int:
    """Read Megatron-LM's checkpoint in ``--load`` (its tracker's iteration) into the model and the
    optimizer; returns that iteration (0 when not resuming)."""
    from megatron.core import dist_checkpointing

    if not hooks.resuming():
        return 0
    iteration = int((Path(args.load) / megatron_lm.TRACKER).read_text().strip())
    path = str(Path(args.load) / f"iter_{iteration:07d}")
    meta = dist_checkpointing.load_content_metadata(path)
    model_sd = chunk.sharded_state_dict(metadata=meta)
    state = {"model": model_sd,
             "optimizer": opt.sharded_state_dict({"model": model_sd}, is_loading=True, metadata=meta)}
    state = dist_checkpointing.load(state, path)
    chunk.load_state_dict(state["model"], strict=True)
    opt.load_state_dict(state["optimizer"])
    sched.num_steps = iteration * args.global_batch_size
    print(f"resumed from Megatron-LM's checkpoint {path}", flush=True)
    return iteration


def train_cpu(args, hooks, data_dir):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training import training
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    from mcore_bridge.runtime import compat

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    with compat.scope("cpu"), megatron_lm_globals(args), megatron_lm.saving_safetensors(hooks):
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                     pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                     create_gloo_process_groups=True)
        model_parallel_cuda_manual_seed(args.seed)
        dp, mbs = ps.get_data_parallel_world_size(), args.micro_batch_size
        micro = args.global_batch_size // (mbs * dp)
        data = dataset(args, data_dir, args.train_iters * args.global_batch_size)
        chunk = hooks.model_provider(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        chunk.config.finalize_model_grads_func = finalize_model_grads
        model = [DistributedDataParallel(chunk.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk)]
        for m in model:
            m.train()  # as Megatron-LM's train() does (full recomputation runs in training mode only)
        # Megatron-LM's Adam settings; no gradient clipping on CPU (megatron-core's clip asserts CUDA tensors)
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=0.0,
            params_dtype=torch.float32), model)
        sched = training.get_optimizer_param_scheduler(opt)  # Megatron-LM's, from its arguments
        start = resume(args, hooks, chunk, opt, sched)
        sampler = MegatronPretrainingSampler(total_samples=len(data), consumed_samples=start * args.global_batch_size,
                                             micro_batch_size=mbs, data_parallel_rank=ps.get_data_parallel_rank(),
                                             data_parallel_size=dp)
        batches = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0))
        for it in range(start + 1, args.train_iters + 1):
            LOSSES.iteration = it
            model[0].zero_grad_buffer()
            opt.zero_grad()
            out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches,
                                              model=model, num_microbatches=micro, seq_length=args.seq_length,
                                              micro_batch_size=mbs, forward_only=False)
            opt.step()
            sched.step(increment=args.global_batch_size)
            if out and it % args.log_interval == 0 and ps.get_tensor_model_parallel_rank() == 0:
                s, n = torch.stack([o["lm loss"] for o in out]).sum(0)
                print(f"iteration {it}/{args.train_iters}: answer loss {(s / n).item():.4f}", flush=True)
            if it % args.save_interval == 0 or it == args.train_iters:
                if args.save:
                    args.consumed_train_samples = it * args.global_batch_size
                    with cpu_rng_state():  # Megatron-LM's save; the HF directory follows (saving_safetensors)
                        training.save_checkpoint_and_time(it, model, opt, sched, 0, {})
                else:  # --save_safetensors_dir without --save: HF safetensors only
                    hooks.save(it, model)
                if hooks.saved and hooks.saved[-1][0] == it and torch.distributed.get_rank() == 0:
                    print(f"saved HF safetensors: {hooks.saved[-1][1]}", flush=True)
        write_probe(args, hooks, data)
