"""Pool cases that write checkpoints the way Megatron-LM's training loop does, with megatron-core's
own pieces: the model wrapped in megatron's DistributedDataParallel, an optimizer from
``get_megatron_optimizer``, an ``OptimizerParamScheduler``, one training step, then
``dist_checkpointing.save`` of the state dict that ``megatron.training.checkpointing``'s
``generate_state_dict`` builds (model, optimizer, rng_state, args, iteration, opt_param_scheduler,
checkpoint_version, num_floating_point_operations_so_far) into ``DIR/iter_0000005/`` plus
``DIR/latest_checkpointed_iteration.txt``. megatron-core 0.16.1 ships no ``megatron.training``, so
the state dict is assembled here, following it.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mcore_bridge import Bridge, ParallelLayout, dist_ckpt
from mcore_bridge.runtime import dist as rt

ITERATION = 5


def _setup_with_gloo_groups(bridge: Bridge):
    """``Bridge.setup`` plus the gloo groups megatron's optimizer asks for (the bridge itself
    creates none: conversion needs none)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    bridge.setup("cpu")
    lay = bridge.layout
    ps.destroy_model_parallel()
    rt._destroy_subgroups()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        expert_model_parallel_size=lay.ep, expert_tensor_parallel_size=lay.etp, create_gloo_process_groups=True)
    model_parallel_cuda_manual_seed(1234)


def _train_one_step(bridge: Bridge, models):
    """Megatron-LM's setup_model_and_optimizer + one train_step (pp = 1: a plain forward)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    assert bridge.layout.pp == 1
    # the distributed optimizer needs CUDA tensors (distrib_optimizer.py checks param.type() for
    # torch.cuda.*); on CPU only the regular one runs. clip_grad=0: the gradient-norm clipping
    # asserts CUDA tensors too (clip_grads.py).
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=False, grad_reduce_in_fp32=True)
    wrapped = [DistributedDataParallel(m.config, ddp_config, m) for m in models]
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, clip_grad=0.0, weight_decay=0.01,
                                 use_distributed_optimizer=False, params_dtype=torch.float32)
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=0,
                                        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=10, wd_incr_style="constant")
    for w in wrapped:
        w.zero_grad_buffer()
    optimizer.zero_grad()
    vocab = int(bridge.hf_config["vocab_size"])
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
    loss = wrapped[0](tokens, position_ids, None, labels=tokens).float().mean()
    loss.backward()
    for w in wrapped:
        w.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(increment=1)
    return optimizer, scheduler


def _rng_state():
    """Megatron-LM's get_rng_state for torch_dist (no CUDA generator on CPU)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
              "torch_rng_state": torch.get_rng_state()}]
    return ShardedObject("rng_state", state, (ps.get_pipeline_model_parallel_world_size(),
                                              ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _args(bridge: Bridge):
    from megatron.core.enums import ModelType

    cfg = bridge.hf_config
    lay = bridge.layout
    return argparse.Namespace(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], ffn_hidden_size=cfg.get("intermediate_size"),
        seq_length=16, max_position_embeddings=cfg.get("max_position_embeddings"), padded_vocab_size=cfg["vocab_size"],
        tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp, expert_model_parallel_size=lay.ep,
        params_dtype=torch.float32, ckpt_format="torch_dist", use_dist_ckpt=True, use_distributed_optimizer=False,
        no_save_optim=False, no_save_rng=False, model_type=ModelType.encoder_or_decoder, iteration=ITERATION)


def _extra_tensor(name: str):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(name, torch.ones(8), replica_id=rt.rank())


def train_and_save(source: str, layout: dict, out: str, variants: dict, prefixed_optimizer: bool = False) -> dict:
    """Train one step at ``layout``, then write one Megatron-LM checkpoint per ``variants`` entry
    (``{name: {"drop": [state-dict names left out of "model"], "extra": sharded key added to
    "model"}}``) under ``out/name`` and the trained weights as HF (through the bridge, from the live
    model) under ``out/reference``. ``prefixed_optimizer``: the optimizer keys as Megatron-LM wrote
    them before ``chained_optim_avoid_prefix`` (``chained_<i>.optimizer...`` for MoE)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    bridge = Bridge(source, ParallelLayout(**layout))
    _setup_with_gloo_groups(bridge)
    models = bridge.build_model(torch.float32)
    bridge.load_weights(models)
    optimizer, scheduler = _train_one_step(bridge, models)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": not prefixed_optimizer,
                "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    for name, spec in variants.items():
        state = {"args": _args(bridge), "checkpoint_version": 3.0, "iteration": ITERATION}
        for i, m in enumerate(models):
            state[dist_ckpt.model_key(i, len(models))] = m.sharded_state_dict(metadata=metadata)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
        state["opt_param_scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_state()
        state["num_floating_point_operations_so_far"] = 0
        exp_avg = [t.data for t in nested_values(state["optimizer"]) if ".exp_avg." in getattr(t, "key", "")]
        for dropped in spec.get("drop", ()):
            del state["model"][dropped]
        if spec.get("extra"):
            state["model"]["extra.weight"] = _extra_tensor(spec["extra"])
        target = Path(out) / name / f"iter_{ITERATION:07d}"
        if rt.rank() == 0:
            target.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(state, str(target))
        if rt.rank() == 0:
            (target.parent / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    bridge.save_weights(models, Path(out) / "reference", overwrite=True)
    return {"rank": rt.rank(), "exp_avg_abs_sum": float(sum(t.abs().sum() for t in exp_avg)),
            "exp_avg_tensors": len(exp_avg), "optimizer": type(optimizer).__name__}


# ---- LoRA: a full (weights + factors) checkpoint, and a wrapper that forgets a tensor ----------------
def save_full_lora(source: str, adapter: str, out: str) -> int:
    """HF weights + a PEFT adapter -> an mcore-bridge torch_dist checkpoint holding both."""
    from mcore_bridge import checkpoint

    bridge = Bridge(source, ParallelLayout())
    bridge.setup("cpu")
    models = bridge.build_model(torch.float32)
    bridge.load_weights(models)
    bridge.load_adapter(models, adapter)
    checkpoint.save_mcore(bridge, models, out, overwrite=True, content="full")
    return rt.rank()


@contextlib.contextmanager
def _forgetting(name: str):
    """The models' sharded state dict without ``name`` (a wrapper that forgets to declare a tensor)."""
    original = dist_ckpt.sharded_state

    def patched(models, content=dist_ckpt.FULL):
        state = original(models, content)
        for chunk in state.values():
            chunk.pop(name, None)
        return state

    dist_ckpt.sharded_state = patched
    try:
        yield
    finally:
        dist_ckpt.sharded_state = original


def unfilled_base_tensor(source: str, adapter: str, out: str, name: str) -> str:
    """Save and load a full LoRA checkpoint through a sharded state dict that lacks ``name``: the
    load must refuse (the fresh model's tensor would stay uninitialised). Returns the error."""
    from mcore_bridge import checkpoint

    with _forgetting(name):
        save_full_lora(source, adapter, out)
        reader = checkpoint.bridge_from_mcore(out)
        models = reader.build_model(torch.float32)
        try:
            checkpoint.load_mcore(reader, models, out)
        except Exception as e:  # noqa: BLE001  (the test checks the type and message)
            return f"{type(e).__name__}: {e}"
    return "loaded"
