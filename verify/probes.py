"""Per-layer probes: hidden states after the embedding, after every decoder layer and after the
final norm, captured with forward hooks on the real modules of both models.

Probe names are shared by both sides: ``embedding``, ``layer.{i}`` (global index), ``final_norm``;
vision-language models add ``vision.block.{i}``, ``vision.merger`` and ``vision.deepstack.{k}``.
Captured tensors are ``[B, S, H]`` fp32 on the CPU (vision ones ``[1, tokens, W]``). MoE layers add ``router.{i}``: the experts
each token was sent to, as a boolean ``[B*S, E]`` map (so routing is compared as sets); MoE MTP
layers add ``mtp.{k}.router`` (megatron side here, the reference side in ``verify.mtp``).
"""

from __future__ import annotations

import contextlib


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def _hooked(targets, store: dict, convert, pick=_first):
    """Record ``convert(pick(output))`` of each ``(name, module)`` into ``store`` (first call wins).
    The hooks run before any hook the model itself registered, so a layer's probe is its own
    output, as on the HF side."""
    def hook_for(name):
        def hook(_module, _inputs, out):
            store.setdefault(name, convert(pick(out).detach()).cpu())
        return hook

    handles = [module.register_forward_hook(hook_for(name), prepend=True) for name, module in targets]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def vision_targets(visual) -> list:
    """Probes of a transformers vision tower: every block, the merger, the deepstack mergers.
    Their outputs are ``[patches or tokens, W]`` (no batch dimension)."""
    if visual is None:
        return []
    if hasattr(visual, "multi_modal_projector"):
        # a vision_tower + multi_modal_projector model (Gemma 3's SigLIP: encoder.layers; InternVL's
        # InternViT: encoder.layer): its blocks, then the projector (megatron's visual.merger ends with it)
        encoder = visual.vision_tower.encoder
        blocks = encoder.layers if hasattr(encoder, "layers") else encoder.layer
        merger = [("vision.merger", visual.multi_modal_projector)]
        return [(f"vision.block.{i}", b) for i, b in enumerate(blocks)] + merger
    targets = [(f"vision.block.{i}", block) for i, block in enumerate(visual.blocks)]
    targets.append(("vision.merger", visual.merger))
    targets += [(f"vision.deepstack.{k}", m) for k, m in enumerate(getattr(visual, "deepstack_merger_list", []))]
    return targets


def _unbatched(hidden):
    return hidden.float()[None]


@contextlib.contextmanager
def hf_probes(model, store: dict):
    """Hooks on a transformers causal LM (``model.model.{embed_tokens,layers,norm}``) or on a
    vision-language model (its ``language_model`` and ``visual``)."""
    inner = getattr(model.model, "language_model", model.model)
    targets = [("embedding", inner.embed_tokens)]
    targets += [(f"layer.{i}", layer) for i, layer in enumerate(inner.layers)]
    targets.append(("final_norm", inner.norm))
    tower = model.model if hasattr(model.model, "multi_modal_projector") else getattr(model.model, "visual", None)
    vision = vision_targets(tower)
    with _hooked(targets, store, lambda hidden: hidden.float()), _hooked(vision, store, _unbatched), \
            _hf_routing(inner.layers, store):
        yield store


def _routing_map(indices, num_experts: int):
    import torch

    idx = indices.reshape(-1, indices.shape[-1]).long()
    out = torch.zeros(idx.shape[0], num_experts, dtype=torch.bool)
    out.scatter_(1, idx.cpu(), True)
    return out[None]  # [1, tokens, E]: one sample per forward, like the hidden-state probes


@contextlib.contextmanager
def _hf_routing(layers, store: dict):
    """Capture the expert choice of each HF MoE block: from ``route_tokens_to_experts`` where the
    block has one (DeepSeek-V3: sigmoid + bias + groups), else from the router's returned indices
    (Mixtral, Qwen-MoE routers, gpt-oss's ``mlp.router`` return ``(logits, weights, indices)``)."""
    undo = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
        if gate is None or not hasattr(gate, "weight") or gate.weight.shape[0] < 2:
            continue
        num_experts, name = gate.weight.shape[0], f"router.{i}"
        if hasattr(mlp, "route_tokens_to_experts"):
            original = mlp.route_tokens_to_experts

            def route(*args, _orig=original, _name=name, _n=num_experts, **kwargs):
                out = _orig(*args, **kwargs)
                store.setdefault(_name, _routing_map(out[0], _n))
                return out

            mlp.route_tokens_to_experts = route
            undo.append(lambda m=mlp: delattr(m, "route_tokens_to_experts"))
        else:
            def hook(_m, _inputs, out, _name=name, _n=num_experts):
                if isinstance(out, tuple) and len(out) == 3:
                    store.setdefault(_name, _routing_map(out[2], _n))

            undo.append(gate.register_forward_hook(hook).remove)
    try:
        yield
    finally:
        for u in undo:
            u()


def megatron_probes(models, store: dict, sequence_parallel: bool):
    """Hooks on megatron GPT chunks; activations are ``[S, B, H]`` there (sequence-sharded under
    SP, gathered here inside the tensor-parallel group: every TP rank runs the hook)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    targets, whole, vision = [], [], []
    for chunk in models:
        if getattr(chunk, "pre_process", False):
            # vision-language models scatter the sequence only after the vision features went in
            sharded = (getattr(chunk.embedding, "scatter_to_sequence_parallel", True)
                       and not getattr(chunk, "embeds_whole_sequence", False))
            (targets if sharded else whole).append(("embedding", chunk.embedding))
            vision += vision_targets(getattr(chunk, "visual", None))
        # a deepstack layer's own output is seen before its vision addition, as on the HF side
        targets += [(f"layer.{layer.layer_number - 1}", getattr(layer, "before_deepstack", layer))
                    for layer in chunk.decoder.layers]
        if getattr(chunk, "post_process", False) and chunk.decoder.final_layernorm is not None:
            targets.append(("final_norm", chunk.decoder.final_layernorm))
        if getattr(chunk, "mtp_process", False):  # MTP layers: output after their final norm (verify.mtp)
            targets += [(f"mtp.{k}", layer) for k, layer in enumerate(chunk.mtp.layers)]

    def to_bsh(hidden, gather=sequence_parallel):
        if gather:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden.transpose(0, 1).float()

    routers = [(f"router.{layer.layer_number - 1}", layer.mlp.router) for chunk in models
               for layer in chunk.decoder.layers if hasattr(getattr(layer, "mlp", None), "router")]
    routers += mtp_routers(models)

    def routing(routing_map):  # [tokens on this rank, E]; tokens are sequence-sharded under SP
        routing_map = routing_map.float()
        if sequence_parallel:
            routing_map = gather_from_sequence_parallel_region(routing_map, tensor_parallel_output_grad=False)
        return routing_map.bool()[None]

    @contextlib.contextmanager
    def both():
        # megatron's router returns (probs, routing_map)
        with _hooked(targets, store, to_bsh), _hooked(whole, store, lambda h: to_bsh(h, False)), \
                _hooked(vision, store, _unbatched), _hooked(routers, store, routing, pick=lambda out: out[1]):
            yield store

    return both()


def mtp_routers(models) -> list:
    """``(mtp.{k}.router, router)`` of each MoE MTP layer on this rank: the decoder layer inside
    megatron's MTP layer is ``transformer_layer`` (0.16) or ``mtp_model_layer`` (0.19)."""
    out = []
    for chunk in models:
        if getattr(chunk, "mtp_process", False):
            for k, layer in enumerate(chunk.mtp.layers):
                inner = getattr(layer, "transformer_layer", None) or getattr(layer, "mtp_model_layer", None)
                if hasattr(getattr(inner, "mlp", None), "router"):
                    out.append((f"mtp.{k}.router", inner.mlp.router))
    return out


def probe_order(num_layers: int, vision: list[str] = ()) -> list[str]:
    """Probes in forward order: the vision tower's (vision-language models) first."""
    return list(vision) + ["embedding"] + [f"layer.{i}" for i in range(num_layers)] + ["final_norm"]


def probe_layer(name: str):
    return int(name.split(".")[1]) if name.startswith("layer.") else None
