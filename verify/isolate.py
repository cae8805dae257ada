"""Layer-isolated (teacher-forced) comparison: each megatron decoder layer is fed the exact hidden
states that enter the same HF layer, so its own error is measured without what came before.

HF side (rank 0, fp32): forward pre-hooks on every decoder layer record the incoming hidden states,
forward hooks the outputs; MoE layers also record the input of their experts module.
Megatron side (every rank, a real forward through megatron's own pipeline schedule): a forward
pre-hook on every ``TransformerLayer`` replaces the incoming ``hidden_states`` with the HF ones,
laid out as megatron expects (``[s, b, h]``, scattered to this rank's sequence-parallel shard);
the usual probes (``verify.probes``) record the outputs. Pipeline stages each run their own layers
from the injected inputs; expert-parallel layers dispatch the injected tokens as usual.

MoE expert localisation: every expert is re-run on the same tokens on both sides (the HF experts
module with each token routed to that one expert at weight 1; each megatron ``SequentialMLP``
local expert called on the same tokens, its expert-tensor-parallel partial outputs summed), so a
wrong expert is named even when the layer's output drift stays under its threshold. The router's
logits and the shared expert(s) (with their sigmoid gate where the model has one) are re-run on the
same tokens too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from mcore_bridge.errors import UsageError
from mcore_bridge.runtime import dist as rt

from . import metrics

FINAL_NORM, OUTPUT = "final_norm", "output_layer"  # keys beside the layer numbers
ROUTER = "router"  # beside the expert numbers: the router's logits on the same tokens
SHARED = "shared"  # beside the expert numbers: the shared expert(s), gated as the model gates them
MAX_EXPERT_TOKENS = 256  # tokens each expert is re-run on (per side); enough to see a x1.01 weight


def _hidden_arg(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _text_model(model):
    return getattr(model.model, "language_model", model.model)


# ---- HF side (rank 0) ----------------------------------------------------------------------------
def _keep(store: dict, key, pick):
    """A hook recording ``pick(...)`` (first call wins); returns None: changes nothing."""
    def hook(_module, first, second):
        if key not in store:
            store[key] = pick(first, second).detach().float().cpu()
    return hook


_MEMO: dict = {}  # the last reference of this process (a pool worker verifies many faults of one model)


def hf_isolation_reference(hf_dir, samples, device: str, adapter=None) -> dict:
    """``_hf_isolation_reference``, kept for the next call with the same checkpoint files and inputs."""
    from .run import _reference_key

    key = (_reference_key(hf_dir, samples, "isolate", adapter), device)
    if key not in _MEMO:
        _MEMO.clear()
        _MEMO[key] = _hf_isolation_reference(hf_dir, samples, device, adapter)
    return _MEMO[key]


def _hf_isolation_reference(hf_dir, samples, device: str, adapter=None) -> dict:
    """``inputs``/``outputs``: per sample ``{layer: [1, S, H]}`` fp32 on the CPU; ``expert_in``:
    per MoE layer the tokens its experts module saw (``[T, H]``, first samples' tokens, at most
    ``MAX_EXPERT_TOKENS``); ``expert_out``: per MoE layer ``[E, T, H]``, each expert applied to
    every one of those tokens."""
    from .forward import hf_forward, hf_model

    model = hf_model(hf_dir, torch.float32, device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).get_base_model().eval()
    inner = _text_model(model)
    layers = inner.layers
    out = {"inputs": {}, "outputs": {}, "expert_in": {}, "expert_out": {}, "router_out": {}, "shared_out": {}}
    experts = {i: layer.mlp.experts for i, layer in enumerate(layers)
               if hasattr(getattr(layer, "mlp", None), "experts")}
    seen: dict[int, list] = {i: [] for i in experts}
    with torch.no_grad():
        for s in samples:
            ins, outs, handles = {}, {}, []
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(_keep(ins, i, lambda a, k: _hidden_arg(a, k)),
                                                               with_kwargs=True))
                handles.append(layer.register_forward_hook(
                    _keep(outs, i, lambda _a, o: o[0] if isinstance(o, tuple) else o)))
            # the final norm and the output layer, isolated too: their own inputs, their own outputs
            handles.append(inner.norm.register_forward_pre_hook(_keep(ins, FINAL_NORM, _hidden_arg),
                                                                with_kwargs=True))
            handles.append(inner.norm.register_forward_hook(_keep(outs, FINAL_NORM, lambda _a, o: o)))
            handles.append(inner.norm.register_forward_hook(_keep(ins, OUTPUT, lambda _a, o: o)))
            for i, module in experts.items():
                handles.append(module.register_forward_pre_hook(
                    lambda _m, a, k, i=i: seen[i].append(_hidden_arg(a, k).detach().float().cpu()),
                    with_kwargs=True))
            try:
                pos = None if s.position_ids is None else s.position_ids[:, None]
                outs[OUTPUT] = hf_forward(model, s.input_ids[None], pos, s.vision).float().cpu()
            finally:
                for h in handles:
                    h.remove()
            out["inputs"][s.name], out["outputs"][s.name] = ins, outs
        for i, module in experts.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[i]])[:MAX_EXPERT_TOKENS]
            out["expert_in"][i] = x
            dev = next(module.parameters()).device
            xd = x.to(dev)
            ones = torch.ones(x.shape[0], 1, device=dev)
            num = _num_experts(module)
            gate = getattr(layers[i].mlp, "gate", None)  # the router: logits = linear(x, weight[, bias])
            if isinstance(getattr(gate, "weight", None), torch.Tensor):
                out["router_out"][i] = torch.nn.functional.linear(
                    xd, gate.weight, getattr(gate, "bias", None)).float().cpu()
            shared = _hf_shared(layers[i].mlp)
            if shared is not None:
                out["shared_out"][i] = shared(xd).float().cpu()
            out["expert_out"][i] = torch.stack([
                module(xd, torch.full((x.shape[0], 1), e, dtype=torch.long, device=dev), ones).float().cpu()
                for e in range(num)])
    del model
    return out


def _hf_shared(mlp):
    """The HF MoE block's shared expert(s) as one function of the tokens, gate included (Qwen2-MoE's
    ``shared_expert`` x sigmoid(``shared_expert_gate``), DeepSeek's / GLM's ``shared_experts``), or None."""
    shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    if shared is None:
        return None
    gate = getattr(mlp, "shared_expert_gate", None)
    if gate is None:
        return shared
    return lambda x: torch.sigmoid(gate(x)) * shared(x)


def _num_experts(module) -> int:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return next(p for n, p in module.named_parameters() if p.dim() == 3).shape[0]


# ---- megatron side (collective) --------------------------------------------------------------------
@contextlib.contextmanager
def injected(models, inputs: dict, sequence_parallel: bool):
    """Every megatron decoder layer of ``models`` takes ``inputs[global layer]`` (``[1, S, H]``)
    instead of what the layer before it produced."""
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

    def pre(module, args, kwargs):
        layer = getattr(module, "_isolate_key", None)
        layer = module.layer_number - 1 if layer is None else layer
        current = _hidden_arg(args, kwargs)
        new = inputs[layer].transpose(0, 1).contiguous().to(current.device, current.dtype)  # [s, b, h]
        if sequence_parallel:
            new = scatter_to_sequence_parallel_region(new)
        if new.shape != current.shape:
            raise UsageError(f"isolated comparison: layer {layer} takes hidden states of shape {tuple(current.shape)}, "
                             f"the HF input is {tuple(new.shape)} after the sequence-parallel scatter")
        if "hidden_states" in kwargs:
            return args, dict(kwargs, hidden_states=new)
        return (new,) + tuple(args[1:]), kwargs

    targets = [layer for chunk in models for layer in chunk.decoder.layers]
    for chunk in models:
        if getattr(chunk, "post_process", False):
            for key, module in ((FINAL_NORM, chunk.decoder.final_layernorm), (OUTPUT, getattr(chunk, "output_layer", None))):
                if module is not None:
                    module._isolate_key = key
                    targets.append(module)
    handles = [module.register_forward_pre_hook(pre, with_kwargs=True) for module in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in targets:
            vars(module).pop("_isolate_key", None)


def _local_expert_layers(models) -> dict:
    """``{global layer: moe module}`` of this rank's layers with one module per local expert."""
    out = {}
    for chunk in models:
        for layer in chunk.decoder.layers:
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if experts is not None and hasattr(experts, "local_experts"):
                out[layer.layer_number - 1] = layer.mlp
    return out


def megatron_expert_outputs(models, expert_in: dict, shared_layers=()) -> dict | None:
    """Collective: each megatron expert applied to ``expert_in[layer]``; on rank 0
    ``{layer: {global expert: [T, H], "router": [T, E]}}`` (expert-tensor-parallel partials summed),
    None elsewhere.
    Layers whose experts are not one module each (grouped GEMM) are absent."""
    from megatron.core import parallel_state as ps

    mine_layers = _local_expert_layers(models)
    result = {}
    for layer in sorted(expert_in):
        mine = {}
        moe = mine_layers.get(layer)
        if moe is not None:
            etp = ps.get_expert_tensor_parallel_rank()
            local = list(moe.experts.local_experts)
            indices = list(getattr(moe, "local_expert_indices", range(len(local))))
            param = next(moe.experts.parameters())
            x = expert_in[layer].to(param.device, param.dtype)
            with torch.no_grad():
                for e, expert in zip(indices, local):
                    y = expert(x)
                    mine[(int(e), etp)] = (y[0] if isinstance(y, tuple) else y).float().cpu()
                router = moe.router  # replicated on every rank of the layer
                mine[(ROUTER, 0)] = torch.nn.functional.linear(
                    x.to(router.weight.dtype), router.weight, getattr(router, "bias", None)).float().cpu()
                shared = getattr(moe, "shared_experts", None)
                if shared is not None and layer in shared_layers:
                    # every tensor-parallel rank of the layer calls it (its linears communicate); with
                    # sequence parallelism each rank's identical tokens come back whole (gathered
                    # tp-fold, then reduce-scattered back to this rank's copy)
                    y = shared(x)
                    mine[(SHARED, 0)] = (y[0] if isinstance(y, tuple) else y).float().cpu()
        parts = gather(mine)
        if parts is None:
            continue
        partial = {}
        for part in parts:
            for key, y in (part or {}).items():
                partial.setdefault(key, y)  # ranks that only replicate an expert shard (data parallel)
        summed = {}
        for (e, _), y in sorted(partial.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            summed[e] = y if e in (ROUTER, SHARED) or e not in summed else summed[e] + y
        if summed:
            result[layer] = summed
    return result if rt.rank() == 0 else None


def gather(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if not (dist.is_initialized() and rt.world_size() > 1):
        return [obj]
    parts = [None] * rt.world_size() if rt.rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and rt.world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_megatron(models, samples, vocab: int, sequence_parallel: bool, ref: dict | None, outputs) -> tuple:
    """Collective: the isolated megatron outputs (``outputs`` as ``verify.run.megatron_outputs``)
    and the per-expert outputs; ``ref`` is ``hf_isolation_reference`` on rank 0 (None elsewhere)."""
    shared = broadcast(None if ref is None else {"inputs": ref["inputs"], "expert_in": ref["expert_in"],
                                                 "shared_layers": sorted(ref["shared_out"])})
    got = outputs(models, samples, vocab, sequence_parallel,
                  inject=lambda name: injected(models, shared["inputs"][name], sequence_parallel))
    experts = megatron_expert_outputs(models, shared["expert_in"], shared["shared_layers"])
    return got, experts


# ---- report (rank 0) -------------------------------------------------------------------------------
def summarise(report: dict, samples, ref: dict, got: dict, experts: dict, params, expert_params) -> dict:
    """The report's ``isolation`` entry: per decoder layer the isolated and the end-to-end drift
    (same threshold as the end-to-end probe; the final norm and the output layer too: the logits
    from the HF final norm's output), per MoE layer every expert's drift, and the first layer whose
    isolated error (or one of whose experts) fails with its parameters (``params(probe)``,
    ``expert_params(layer, expert)``: ``{"hf_params": [...], "mcore_params": [...]}``)."""
    gate_experts = report["dtype"] == "fp32"
    end_to_end = {e["probe"]: e for e in report["layers"]}
    layers, first = [], None
    emb = end_to_end.get("embedding")
    if emb is not None:  # its input is the token ids: its end-to-end drift is its isolated drift
        layers.append({"probe": "embedding", "layer": None, "isolated_rel_mean_diff": emb["rel_mean_diff"],
                       "isolated_max_diff": emb["max_diff"], "end_to_end_rel_mean_diff": emb["rel_mean_diff"],
                       "threshold": emb["threshold"], "isolated_ok": emb["ok"], "failing_experts": [], "ok": emb["ok"]})
        if not emb["ok"]:
            first = {"probe": "embedding", "layer": None, "isolated_rel_mean_diff": emb["rel_mean_diff"],
                     "threshold": emb["threshold"], **params("embedding")}
    keys = sorted(k for k in ref["outputs"][samples[0].name] if isinstance(k, int)) + [FINAL_NORM, OUTPUT]
    for layer in keys:
        probe = f"layer.{layer}" if isinstance(layer, int) else layer
        worst = {"rel_mean_diff": 0.0, "max_diff": 0.0}
        for s in samples:
            mine = got[s.name]["logits"] if layer == OUTPUT else got[s.name]["probes"].get(probe)
            if mine is None:
                raise RuntimeError(f"isolated comparison: megatron {probe} missing for sample {s.name}")
            want = ref["outputs"][s.name][layer]
            d = metrics.probe_drift(want[0] if layer == OUTPUT else want, mine)  # logits: [S, V] here
            worst = {k: max(worst[k], d[k]) for k in worst}
        e2e = end_to_end.get(probe, {})
        limit = e2e.get("threshold", report["thresholds"]["layer_rel_drift"])
        entry = {"probe": probe, "layer": layer if isinstance(layer, int) else None, "isolated_rel_mean_diff": worst["rel_mean_diff"],
                 "isolated_max_diff": worst["max_diff"], "end_to_end_rel_mean_diff": e2e.get("rel_mean_diff"),
                 "threshold": limit, "isolated_ok": worst["rel_mean_diff"] <= limit}
        failing_experts, router_fails, shared_fails = [], False, False
        if layer in ref["expert_out"]:
            hf = ref["expert_out"][layer]
            mine = experts.get(layer)
            if mine is None:
                entry["experts"] = "not compared (experts are not one module each: grouped GEMM)"
            else:
                mine = dict(mine)
                logits = mine.pop(ROUTER, None)
                shared_y = mine.pop(SHARED, None)
                if layer in ref.get("shared_out", {}) and shared_y is not None:
                    sd = metrics.probe_drift(ref["shared_out"][layer], shared_y)["rel_mean_diff"]
                    entry["shared_expert_rel_mean_diff"] = sd
                    shared_fails = gate_experts and sd > limit
                if layer in ref["router_out"] and logits is not None:
                    router = metrics.probe_drift(ref["router_out"][layer], logits)["rel_mean_diff"]
                    entry["router_rel_mean_diff"] = router
                    router_fails = gate_experts and router > limit
                drift = {e: metrics.probe_drift(hf[e], y)["rel_mean_diff"] for e, y in sorted(mine.items())}
                if sorted(drift) != list(range(hf.shape[0])):
                    raise RuntimeError(f"isolated comparison: layer {layer} experts {sorted(drift)} came back, "
                                       f"HF has {hf.shape[0]}")
                entry["experts"] = {str(e): v for e, v in drift.items()}
                entry["worst_expert"] = max(drift, key=drift.get)
                failing_experts = [e for e, v in drift.items() if v > limit] if gate_experts else []
        entry["failing_experts"] = failing_experts
        entry["router_ok"] = not router_fails
        entry["shared_expert_ok"] = not shared_fails
        entry["ok"] = entry["isolated_ok"] and not failing_experts and not router_fails and not shared_fails
        layers.append(entry)
        if not entry["ok"] and first is None:
            first = {"probe": probe, "layer": entry["layer"], "isolated_rel_mean_diff": worst["rel_mean_diff"],
                     "threshold": limit, **params(probe)}
            if router_fails:
                first.update(component="router", router_rel_mean_diff=entry["router_rel_mean_diff"],
                             **params(f"router.{layer}"))
            elif shared_fails:
                first.update(component="shared_expert",
                             shared_expert_rel_mean_diff=entry["shared_expert_rel_mean_diff"],
                             **params(f"shared_experts.{layer}"))
            elif failing_experts:
                worst_e = max(failing_experts, key=lambda e: entry["experts"][str(e)])
                first.update(expert=worst_e, expert_rel_mean_diff=entry["experts"][str(worst_e)],
                             failing_experts=failing_experts, **expert_params(layer, worst_e))
    return {"layers": layers, "first_failing": first, "experts_gated": gate_experts,
            "expert_tokens": {str(k): int(v.shape[0]) for k, v in ref["expert_in"].items()}}


def apply(report: dict, isolation: dict) -> None:
    """Put ``isolation`` in the report; a layer whose isolated error fails fails the run."""
    report["isolation"] = isolation
    first = isolation["first_failing"]
    if first is None:
        return
    what = (f"router logits drift {first['router_rel_mean_diff']:.2e}" if first.get("component") == "router"
            else f"shared expert drift {first['shared_expert_rel_mean_diff']:.2e}"
            if first.get("component") == "shared_expert"
            else f"expert {first['expert']} drift {first['expert_rel_mean_diff']:.2e}" if "expert" in first
            else f"drift {first['isolated_rel_mean_diff']:.2e}")
    report["failures"].append(f"isolated {first['probe']}: {what} > {first['threshold']:.1e}")
    report["verdict"] = "fail"


def line(isolation: dict | None) -> str:
    if not isolation:
        return ""
    first = isolation["first_failing"]
    if first is None:
        return "isolated: every layer within its threshold"
    return (f"isolated: first failing {first['probe']}" + (f" expert {first['expert']}" if "expert" in first else "")
            + (" router" if first.get("component") == "router" else ""))


def markdown(report: dict) -> list[str]:
    """The report page's section: isolated vs end-to-end drift per layer."""
    from .report import fmt

    iso = report.get("isolation")
    if not iso:
        return []
    out = ["## Layer-isolated drift (each layer fed the HF layer's input)", "", line(iso), ""]
    out += ["| layer | isolated rel_mean_diff | end-to-end rel_mean_diff | threshold | router logits | worst expert | ok |",
            "|---|---|---|---|---|---|---|"]
    first = (iso["first_failing"] or {}).get("probe")
    for e in iso["layers"]:
        worst = e.get("worst_expert")
        expert = "" if worst is None else f"{worst} ({fmt(e['experts'][str(worst)])})"
        ok = ("yes" if e["ok"] else "**NO**") + (" ← first failing" if e["probe"] == first else "")
        out.append(f"| {e['probe']} | {fmt(e['isolated_rel_mean_diff'])} | {fmt(e['end_to_end_rel_mean_diff'])} | "
                   f"{fmt(e['threshold'])} | {fmt(e.get('router_rel_mean_diff')) if 'router_rel_mean_diff' in e else ''} | "
                   f"{expert} | {ok} |")
    return out + [""]
