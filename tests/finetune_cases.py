"""Pool cases: ``examples/finetune_hf.py``'s CPU path in a pool worker (its own argument parsing
through Megatron-LM's parser, its data set, Megatron-LM's sequential sampler, megatron-core's DDP,
Adam and schedule, the HF hooks), a few iterations; megatron-core 0.17+ (``megatron.training``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _example():
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    import finetune_data
    import finetune_hf

    return finetune_hf, finetune_data


def _one_segment(finetune_data):
    """Negative control: packed rows whose ``cu_seqlens`` say "one sample" (the samples of a row
    attend to each other, positions run on across them)."""
    original = finetune_data.PackedRows.__getitem__

    def getitem(self, i):
        row = original(self, i)
        cu = row["cu_seqlens"]
        row["cu_seqlens"] = torch.cat([cu[:1], cu[-1:].expand(cu.numel() - 1)])
        return row

    finetune_data.PackedRows.__getitem__ = getitem
    return lambda: setattr(finetune_data.PackedRows, "__getitem__", original)


def run(argv: list[str], control: str | None = None) -> dict:
    """One run of the example's CPU path with ``argv``; returns (on every rank) the built model's
    training settings, how often its layers ran forward, and the loss log's path."""
    from megatron.core import parallel_state as ps

    from mcore_bridge import megatron_lm
    from mcore_bridge.runtime import dist as rt
    from tests.megatron_lm_train_cases import _forget_globals

    finetune_hf, finetune_data = _example()
    saved = sys.argv
    sys.argv = ["finetune_hf.py"] + [str(a) for a in argv]
    try:
        args, data_dir = finetune_hf.parse()
    finally:
        sys.argv = saved
        _forget_globals()  # Megatron-LM's process globals: the pool worker serves later cases
    ps.destroy_model_parallel()
    rt._destroy_subgroups()
    hooks = megatron_lm.HFHooks.from_args(args)
    calls = {"layer": 0}
    build = hooks.build

    def counted_build(config=None):
        chunks = build(config)
        for layer in chunks[0].decoder.layers:
            layer.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
        return chunks

    hooks.build = counted_build
    resuming = hooks.resuming()  # at the start (--load holds Megatron-LM's checkpoint)
    undo = _one_segment(finetune_data) if control == "one_segment" else None
    try:
        finetune_hf.train_cpu(args, hooks, data_dir)
    finally:
        finetune_data.LOSSES.path = None
        if undo:
            undo()
    c = hooks.chunks[0].config
    packed = sum(type(layer.self_attention.core_attention).__name__.startswith("Packed")
                 for layer in hooks.chunks[0].decoder.layers)
    return {"recompute": [c.recompute_granularity, c.recompute_method, c.recompute_num_layers],
            "layer_calls": calls["layer"], "layers": len(hooks.chunks[0].decoder.layers),
            "packed_attention": packed, "micro_batches": args.global_batch_size // args.micro_batch_size,
            "frozen": sorted({n for n, p in hooks.chunks[0].named_parameters() if not p.requires_grad}),
            "hf_dirs": [str(p) for _, p in hooks.saved], "resuming": resuming}


def moe_options(source: str, argv: list[str]) -> dict:
    """Megatron-LM's MoE arguments through ``HFHooks.from_args`` into the built model's config."""
    from megatron.core import parallel_state as ps

    from mcore_bridge import megatron_lm
    from mcore_bridge.runtime import dist as rt
    from tests.megatron_lm_train_cases import _forget_globals

    finetune_hf, _ = _example()
    saved = sys.argv
    sys.argv = ["finetune_hf.py", "--hf_model", source, "--load_safetensors", "false", "--save_safetensors",
                "false"] + argv
    try:
        args, _ = finetune_hf.parse()
    finally:
        sys.argv = saved
        _forget_globals()
    ps.destroy_model_parallel()
    rt._destroy_subgroups()
    ps.initialize_model_parallel(create_gloo_process_groups=True)
    hooks = megatron_lm.HFHooks.from_args(args)
    c = hooks.model_provider(True, True).config
    names = ("moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity", "moe_token_drop_policy",
             "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_grouped_gemm")
    return {n: getattr(c, n) for n in names}


def config_recompute(source: str, with_config: bool) -> list:
    """``HFHooks`` made by hand (no ``TrainOptions``): the recomputation of the TransformerConfig that
    ``pretrain`` passes to the provider reaches the built model."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from mcore_bridge import megatron_lm
    from mcore_bridge.runtime import dist as rt

    ps.destroy_model_parallel()
    rt._destroy_subgroups()
    ps.initialize_model_parallel(create_gloo_process_groups=True)
    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, recompute_granularity="full",
                               recompute_method="uniform", recompute_num_layers=1) if with_config else None
    c = megatron_lm.HFHooks(source, load=False).model_provider(True, True, config=config).config
    return [c.recompute_granularity, c.recompute_method, c.recompute_num_layers]


def saved_dtype(source: str, out: str) -> dict:
    """``HFHooks`` (fp32 model) on a bf16 HF checkpoint: the saved safetensors are fp32 and hold the
    model's own values (a bf16 write would round them)."""
    import torch
    from megatron.core import parallel_state as ps

    from mcore_bridge import megatron_lm
    from mcore_bridge.hf_io import HFCheckpoint
    from mcore_bridge.runtime import dist as rt

    ps.destroy_model_parallel()
    rt._destroy_subgroups()
    ps.initialize_model_parallel(create_gloo_process_groups=True)
    hooks = megatron_lm.HFHooks(source, save_dir=out, dtype=torch.float32)
    chunk = hooks.model_provider(True, True)
    with torch.no_grad():  # a "trained" value that bf16 cannot hold
        chunk.embedding.word_embeddings.weight.add_(1e-4)
    path = hooks.save(7)
    saved = HFCheckpoint(path)
    embed = saved.read("model.embed_tokens.weight")
    return {"dtypes": sorted({str(saved.info(n).dtype) for n in saved.names()}),
            "embed_equal": bool(torch.equal(embed, chunk.embedding.word_embeddings.weight.detach()[:embed.shape[0]]))}
