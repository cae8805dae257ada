"""Fault-catalogue cases run inside ``verify.pool.Pool`` ranks (one call per rank)."""

from __future__ import annotations

from mcore_bridge import ParallelLayout

LENGTHS = (64,)  # one random text sample and the chat one: the catalogue's time on 2 cores


def verify(source: str, layout: dict, control: str | None = None, reference_cache: str | None = None,
           isolate: bool = True) -> dict | None:
    """The fp32 report with the layer-isolated comparison on rank 0, ``None`` elsewhere."""
    from verify.run import run_layout

    return run_layout(source, ParallelLayout(**layout), "fp32", "cpu", control, reference_cache,
                      lengths=LENGTHS, detection=False, isolate=isolate)


def _summary(fault: str, r: dict) -> dict:
    first, iso = r["first_diverging"], r["isolation"]["first_failing"]
    keep = ("probe", "layer", "cause", "expert", "failing_experts", "mcore_params", "router_agreement")
    return {"fault": fault, "verdict": r["verdict"], "failures": r["failures"][:6],
            "first": first and {k: first[k] for k in keep if k in first},
            "isolated": iso and {k: iso[k] for k in keep if k in iso},
            "isolated_layers": [(e["probe"], e["isolated_rel_mean_diff"], e["ok"]) for e in r["isolation"]["layers"]]}


def _state(models):
    """Everything an after-load fault may change: tensors (cloned) and module attributes."""
    tensors = [t for chunk in models for t in list(chunk.parameters()) + list(chunk.buffers())]
    attrs = [(m, a, getattr(m, a)) for chunk in models for m in chunk.modules()
             for a in ("eps", "activation_func", "config") if a in vars(m)]
    return tensors, [t.detach().clone() for t in tensors], attrs


def _restore(state, fault: str):
    import torch

    tensors, saved, attrs = state
    with torch.no_grad():
        for t, s in zip(tensors, saved):
            t.copy_(s)
    for module, attr, value in attrs:
        setattr(module, attr, value)
    if not all(torch.equal(t, s) for t, s in zip(tensors, saved)):
        raise RuntimeError(f"fault {fault}: weights not restored bitwise")


def catalogue(source: str, layout: dict, faults: list[str], reference_cache: str | None = None,
              lengths=LENGTHS) -> list | None:
    """Every fault of ``faults`` verified (fp32, isolated comparison on) against the HF reference:
    build-time faults (``verify.controls.BUILD_KINDS``) each on a model built with the changed
    setting; the others injected one at a time into one loaded model and taken out again (bitwise).
    ``None`` (no fault) is the clean baseline. Summaries on rank 0, ``None`` elsewhere."""
    from pathlib import Path

    import torch

    from mcore_bridge.bridge import Bridge
    from verify import controls
    from verify.run import model_name, run_layout, verify_loaded

    cache = Path(reference_cache) if reference_cache else None
    out = []
    build = [f for f in faults if f and controls.parse(f)[0] in controls.BUILD_KINDS]
    for fault in build:
        r = run_layout(source, ParallelLayout(**layout), "fp32", "cpu", fault, cache, lengths=lengths,
                       detection=False, isolate=True)
        out.append(r and _summary(fault, r))
    loaded = [f for f in faults if f not in build]
    if loaded:
        bridge = Bridge(source, ParallelLayout(**layout))
        bridge.setup("cpu")
        models = bridge.build_model(torch.float32)
        bridge.load_weights(models)
        for fault in loaded:
            state = _state(models)
            try:
                controls.after_load(models, bridge, fault)
                r = verify_loaded(bridge, models, bridge.source, dtype="fp32", name=model_name(source),
                                  reference_cache=cache, lengths=lengths, source=source, isolate=True)
            finally:
                _restore(state, fault)
            out.append(r and _summary(fault, r))
    return None if out and out[0] is None else out


# ---- the catalogue: (fault, the probe that must be named, what else must be named) -----------------
# ``expert``: the routed expert(s) the isolated comparison must name; ``param``: a megatron parameter
# the named location must list. ``None`` as the fault is the clean baseline (must pass). Build-time
# faults (rope_base, rope_scaling, router_score, mrope_section) change the family's megatron settings
# before the build; every other fault is put into the loaded megatron model (eps: the built norm
# module's epsilon; activation: that layer's MLP, with a copy of its config).
def fault(spec, where=None, expert=None, param=None):
    return {"spec": spec, "where": where, "expert": expert, "param": param}


L = "decoder.layers"
DENSE_WS1 = [  # llama: untied output layer, llama3 RoPE scaling
    fault(None),
    fault(f"scale:{L}.1.self_attention.linear_qkv.weight:1.01", "layer.1", param=f"{L}.1.self_attention.linear_qkv.weight"),
    fault(f"scale:{L}.2.self_attention.linear_proj.weight:1.01", "layer.2", param=f"{L}.2.self_attention.linear_proj.weight"),
    fault(f"scale:{L}.3.mlp.linear_fc1.weight:1.01", "layer.3", param=f"{L}.3.mlp.linear_fc1.weight"),
    fault(f"scale:{L}.1.mlp.linear_fc2.weight:1.01", "layer.1", param=f"{L}.1.mlp.linear_fc2.weight"),
    fault(f"scale:{L}.2.input_layernorm.weight:1.01", "layer.2", param=f"{L}.2.input_layernorm.weight"),
    fault(f"scale:{L}.3.pre_mlp_layernorm.weight:1.01", "layer.3", param=f"{L}.3.pre_mlp_layernorm.weight"),
    fault("scale:decoder.final_layernorm.weight:1.01", "final_norm", param="decoder.final_layernorm.weight"),
    fault("scale:embedding.word_embeddings.weight:1.01", "embedding", param="embedding.word_embeddings.weight"),
    fault("scale:output_layer.weight:1.01", "output_layer", param="output_layer.weight"),
    fault("swap_qk:1", "layer.1", param=f"{L}.1.self_attention.linear_qkv.weight"),
    fault("swap_gate_up:2", "layer.2", param=f"{L}.2.mlp.linear_fc1.weight"),
    fault("activation:2:gelu", "layer.2"),
    fault(f"add:{L}.1.input_layernorm.weight:1.0", "layer.1", param=f"{L}.1.input_layernorm.weight"),  # 1 + w
    fault("eps:1:input_layernorm:10", "layer.1"),
    fault("rope_base:1.5", "layer.0"),
]
MOE_WS1 = [  # qwen3_moe: softmax router, q/k norms, 8 experts
    fault(None),
    fault("scale_expert:2:3:fc1:1.05", "layer.2", expert=[3], param=f"{L}.2.mlp.experts.local_experts.3.linear_fc1.weight"),
    fault("scale_expert:1:6:fc2:1.01", "layer.1", expert=[6], param=f"{L}.1.mlp.experts.local_experts.6.linear_fc2.weight"),
    fault("swap_experts:1:0:1", "layer.1", expert=[0, 1]),
    fault("swap_gate_up:3:5", "layer.3", expert=[5]),
    fault(f"scale:{L}.2.mlp.router.weight:1.01", "layer.2", param=f"{L}.2.mlp.router.weight"),
    fault(f"scale:{L}.2.self_attention.q_layernorm.weight:1.01", "layer.2", param=f"{L}.2.self_attention.q_layernorm.weight"),
    fault("activation:3:gelu", "layer.3"),
    fault("router_score:sigmoid", "layer.0"),
]
BIAS_WS1 = [fault(f"zero:{L}.1.self_attention.linear_qkv.bias", "layer.1", param=f"{L}.1.self_attention.linear_qkv.bias")]
VL_WS1 = [  # qwen2_vl: the vision tower is not isolated: the language layers, fed HF's inputs, stay clean
    fault("scale:visual.blocks.1.mlp.fc1.weight:1.01", "vision.block.1", param="visual.blocks.1.mlp.fc1.weight"),
    fault("mrope_section:3,3,2", "layer.0"),
]
