"""Detection power, measured in every run: standard positive controls put into the loaded megatron
model for one extra forward each, compared with the same HF reference, then taken out again.

The controls (``verify.controls`` specs):
  * ``scale:decoder.layers.<L>.mlp.linear_fc2.weight:1.01`` with ``L = num_layers // 2`` (a model
    whose middle layer has no dense ``linear_fc2``, i.e. an MoE layer: its ``linear_proj``; a layer
    with a norm after its MLP: its ``linear_fc1``, which that norm does not undo);
  * MoE models: ``swap_experts:<L>:0:1`` in the MoE layer nearest the middle (when experts 0 and 1
    live on one expert-parallel rank).

Each control perturbs weights in place; the layer's tensors are snapshotted first and copied back
after the forward, and restoration is asserted bitwise before anything else runs. The result lands
in the report under ``detection``: per control whether the gate caught it (the case would fail) and
located it (the first diverging layer is the control's layer). In fp32 (the gate) a missed control
is a failure of the run: the gate is blind for this case. bf16 runs are kernel-drift reports, not
the conversion gate: their detection is reported, never gated.
"""

from __future__ import annotations

import torch

from . import controls

FACTOR = 1.01


def standard_controls(bridge) -> list[tuple[str, int]]:
    """``(control spec, global layer)`` of the standard positive controls for this model."""
    units = bridge.units
    mid = bridge.family.num_layers // 2
    names = {u.rule.mcore for u in units if u.layer == mid}
    # the dense MLP's output, else the token mixer's: attention, or a linear-attention (delta-net) layer's
    candidates = ("mlp.linear_fc2.weight", "self_attention.linear_proj.weight", "self_attention.out_proj.weight")
    weight = next((w for w in candidates if f"decoder.layers.{{L}}.{w}" in names), None)
    if weight is None:
        raise RuntimeError(f"no standard detection control for layer {mid}: it has none of {candidates}")
    if names & {"decoder.layers.{L}.mlp.post_layernorm.weight", "decoder.layers.{L}.post_mlp_layernorm.weight"}:
        # a norm right after the MLP (Gemma 3, GLM-4) undoes a scaled linear_fc2 up to its epsilon;
        # the gated activation is not homogeneous, so a scaled linear_fc1 is not undone
        weight = "mlp.linear_fc1.weight"
    out = [(f"scale:decoder.layers.{mid}.{weight}:{FACTOR}", mid)]
    experts = bridge.family.num_experts or 0
    moe_layers = sorted({u.layer for u in units if u.layer is not None and "local_experts" in u.rule.mcore})
    if experts >= 2 and moe_layers:
        layer = min(moe_layers, key=lambda x: (abs(x - mid), x))
        owner_a, _ = bridge.layout.expert_owner(experts, 0)
        owner_b, _ = bridge.layout.expert_owner(experts, 1)
        if owner_a == owner_b:
            out.append((f"swap_experts:{layer}:0:1", layer))
    return out


def _layer_tensors(models, layer: int) -> dict[str, torch.Tensor]:
    """This rank's parameters of global ``layer`` (none on other pipeline stages)."""
    out = {}
    for chunk in models:
        for module in chunk.decoder.layers:
            if module.layer_number - 1 == layer:
                out.update(module.named_parameters())
    return out


def _inject(models, bridge, spec: str, tensors: dict) -> None:
    """``controls.after_load``; a scaled weight under a LoRA wrapper is its ``base_layer`` weight."""
    kind, *args = spec.split(":")
    rest = args[0].split(".", 3)[3] if kind == "scale" else None
    if rest is not None and tensors and rest not in tensors:
        base = rest.replace(".weight", ".base_layer.weight")
        if base not in tensors:
            raise RuntimeError(f"detection control {spec}: layer has no {rest!r} nor {base!r}")
        tensors[base].mul_(float(args[1]))
        return
    controls.after_load(models, bridge, spec)


def perturbed_outputs(bridge, models, samples, vocab: int, outputs) -> list[dict]:
    """Collective: for each standard control, the megatron outputs with the control in place
    (rank 0; None elsewhere). The weights are restored bitwise after each forward."""
    runs = []
    for spec, layer in standard_controls(bridge):
        named = _layer_tensors(models, layer)
        tensors = list(named.values())
        with torch.no_grad():
            saved = [t.detach().clone() for t in tensors]
            try:
                _inject(models, bridge, spec, named)
                got = outputs(models, samples, vocab, bridge.layout.sp)
            finally:
                for t, s in zip(tensors, saved):
                    t.copy_(s)
            for t, s in zip(tensors, saved):
                if not torch.equal(t, s):
                    raise RuntimeError(f"detection control {spec}: layer {layer} weights not restored bitwise")
        runs.append({"control": spec, "layer": layer, "got": got})
    return runs


def summarise(report: dict, control_reports: list[tuple[dict, dict]]) -> dict:
    """The ``detection`` entry from the per-control reports (``(run, report built on its outputs)``)."""
    gate = report["dtype"] == "fp32"
    entries = []
    for run, r in control_reports:
        first = r["first_diverging"]
        entries.append({"control": run["control"], "layer": run["layer"], "caught": r["verdict"] == "fail",
                        "located": first is not None and first.get("layer") == run["layer"],
                        "first_diverging": first and first["probe"], "failures": r["failures"][:3]})
    caught = all(e["caught"] for e in entries)
    located = all(e["located"] for e in entries)
    status = ("caught and located" if caught and located else "caught, not located" if caught
              else "blind: positive control not caught")
    return {"gate": gate, "controls": entries, "caught": caught, "located": located, "status": status,
            **({} if gate else {"note": "bf16 is not the conversion gate: reported, not gated"})}


def apply(report: dict, detection: dict) -> None:
    """Put ``detection`` in the report; an fp32 gate that misses a control fails the run."""
    report["detection"] = detection
    if detection["gate"] and not detection["caught"]:
        missed = ", ".join(e["control"] for e in detection["controls"] if not e["caught"])
        report["failures"].append(f"gate blind: positive control not caught ({missed})")
        report["verdict"] = "fail"


def line(detection: dict | None) -> str:
    """One line for summaries."""
    if not detection:
        return ""
    parts = []
    for e in detection["controls"]:
        where = f"first diverging {e['first_diverging']}" if e["first_diverging"] else "no layer named"
        parts.append(f"{e['control']} {'caught' if e['caught'] else 'MISSED'} ({where})")
    note = "" if detection["gate"] else " [bf16 is not the conversion gate]"
    return f"detection: {detection['status']}: " + "; ".join(parts) + note
