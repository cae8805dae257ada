"""Per-layer probes: hidden states after the embedding, after every decoder layer and after the
final norm, captured with forward hooks on the real modules of both models.

Probe names are shared by both sides: ``embedding``, ``layer.{i}`` (global index), ``final_norm``.
All captured tensors are ``[B, S, H]`` fp32 on the CPU.
"""

from __future__ import annotations

import contextlib


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def _hooked(targets, store: dict, to_bsh):
    """Record ``to_bsh(output)`` of each ``(name, module)`` into ``store`` (first call wins)."""
    def hook_for(name):
        def hook(_module, _inputs, out):
            store.setdefault(name, to_bsh(_first(out).detach()).float().cpu())
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in targets]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def hf_probes(model, store: dict):
    """Hooks on a transformers causal LM (``model.model.{embed_tokens,layers,norm}``)."""
    inner = model.model
    targets = [("embedding", inner.embed_tokens)]
    targets += [(f"layer.{i}", layer) for i, layer in enumerate(inner.layers)]
    targets.append(("final_norm", inner.norm))
    return _hooked(targets, store, lambda hidden: hidden)


def megatron_probes(models, store: dict, sequence_parallel: bool):
    """Hooks on megatron GPT chunks; activations are ``[S, B, H]`` there (sequence-sharded under
    SP, gathered here inside the tensor-parallel group: every TP rank runs the hook)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    targets = []
    for chunk in models:
        if getattr(chunk, "pre_process", False):
            targets.append(("embedding", chunk.embedding))
        targets += [(f"layer.{layer.layer_number - 1}", layer) for layer in chunk.decoder.layers]
        if getattr(chunk, "post_process", False) and chunk.decoder.final_layernorm is not None:
            targets.append(("final_norm", chunk.decoder.final_layernorm))

    def to_bsh(hidden):
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden.transpose(0, 1)

    return _hooked(targets, store, to_bsh)


def probe_order(num_layers: int) -> list[str]:
    return ["embedding"] + [f"layer.{i}" for i in range(num_layers)] + ["final_norm"]


def probe_layer(name: str):
    return int(name.split(".")[1]) if name.startswith("layer.") else None
