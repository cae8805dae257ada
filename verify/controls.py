"""Negative controls: deliberate, known errors injected into the megatron side, to prove the
harness catches them and points at the right place. Used by the tests and by
``mcore-bridge verify --control``:

  scale:<megatron param with global layer>:<factor>   e.g. scale:decoder.layers.2.mlp.linear_fc2.weight:1.01
  swap_qk:<layer>                                      q and k rows swapped in that layer's fused QKV
  rope_base:<factor>                                   the megatron model built with rotary_base x factor
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def parse(spec: str | None) -> tuple[str, list[str]] | None:
    if not spec:
        return None
    kind, *args = spec.split(":")
    if kind not in ("scale", "swap_qk", "rope_base"):
        raise ValueError(f"--control {spec!r}: unknown kind {kind!r} (scale, swap_qk, rope_base)")
    return kind, args


def before_build(bridge, spec: str | None):
    """Controls that change how the model is built (rope_base)."""
    parsed = parse(spec)
    if not parsed or parsed[0] != "rope_base":
        return
    factor = float(parsed[1][0])
    family = bridge.family
    original = family.model_settings

    def settings():
        s = original()
        s["model"] = dict(s["model"], rotary_base=s["model"]["rotary_base"] * factor)
        return s

    family.model_settings = settings


def _layer_param(models, layer: int, rest: str):
    for chunk in models:
        for module in chunk.decoder.layers:
            if module.layer_number - 1 == layer:
                return dict(module.named_parameters())[rest]
    return None  # another pipeline stage holds it


def after_load(models, bridge, spec: str | None):
    """Controls that change loaded weights (scale, swap_qk); ranks not holding the layer skip."""
    parsed = parse(spec)
    if not parsed or parsed[0] == "rope_base":
        return
    kind, args = parsed
    with torch.no_grad():
        if kind == "scale":
            name, factor = args[0], float(args[1])
            m = _LAYER.match(name)
            if not m:
                raise ValueError(f"scale control needs a decoder.layers.<i>.* name, got {name!r}")
            p = _layer_param(models, int(m.group(1)), m.group(2))
            if p is not None:
                p.mul_(factor)
        elif kind == "swap_qk":
            layer = int(args[0])
            p = _layer_param(models, layer, "self_attention.linear_qkv.weight")
            if p is not None:
                s = bridge.family.model_settings()["config"]
                heads, groups, d = s["num_attention_heads"], s["num_query_groups"], s["kv_channels"]
                local_groups = groups // bridge.layout.tp
                per_group = (heads // groups + 2) * d
                view = p.view(local_groups, per_group, -1)
                q_first = view[:, :d].clone()
                k_rows = slice(heads // groups * d, heads // groups * d + d)
                view[:, :d] = view[:, k_rows]
                view[:, k_rows] = q_first
