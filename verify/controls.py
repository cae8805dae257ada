"""Negative controls: deliberate, known errors injected into the megatron side, to prove the
harness catches them and points at the right place. Used by the tests and by
``mcore-bridge verify --control``:

  scale:<megatron param with global layer>:<factor>   e.g. scale:decoder.layers.2.mlp.linear_fc2.weight:1.01
                                                       or a vision weight: scale:visual.blocks.1.mlp.fc1.weight:1.01
                                                       or an MTP weight: scale:mtp.layers.0.eh_proj.weight:1.01
  swap_qk:<layer>                                      q and k rows swapped in that layer's fused QKV
  rope_base:<factor>                                   the megatron model built with rotary_base x factor
  local_rope_base:<factor>                             ... with the sliding layers' own RoPE base x factor
  zero:<megatron param or buffer with global layer>    e.g. zero:decoder.layers.1.mlp.router.expert_bias
                                                       (a dropped router bias / shared-expert gate)
  swap_experts:<layer>:<a>:<b>                         two experts' weights exchanged in that layer
                                                       (both on one expert-parallel rank)
  mrope_section:<t>,<h>,<w>                            the model built with another multimodal RoPE
                                                       split (vision-language models)
  grad_scale:<megatron param with global layer>:<f>   that parameter's gradient x f (a backward hook; the
                                                       forward is unchanged: only ``verify --grad`` sees it)
  optimizer_exclude:<megatron param with global layer> that parameter left out of megatron's optimizer
                                                       (only ``verify --train-steps`` sees it)
  window:<delta>                                       the model built with its sliding window's left
                                                       reach + delta (delta 1: HF's off-by-one)
  mrope_contiguous                                     Qwen3-VL's interleaved t/h/w frequencies laid
                                                       out in contiguous sections (megatron's default)
  config:<megatron config field>:<JSON value>          the model built with that config field changed,
                                                       e.g. config:window_size:[4,0] (a wrong window)
  model:<model argument>:<JSON value>                  the model built with that model-class argument changed,
                                                       e.g. model:bidirectional_images:false (Gemma 3)
  add:<megatron param>:<value>                         value added to a weight, e.g. 1.0 to a norm weight:
                                                       a ``1 + w`` norm offset applied twice or dropped
  eps:<layer>:<norm module>:<factor>                   that norm's epsilon x factor (set on the built
                                                       module after loading), e.g. eps:1:input_layernorm:100
  swap_gate_up:<layer>[:<expert>]                      the gate and up halves of linear_fc1 exchanged (dense
                                                       MLP, or one routed expert: global expert index)
  activation:<layer>:<gelu|relu|silu>                  that layer's MLP (and its experts') activation replaced
  scale_expert:<layer>:<expert>:<fc1|fc2>:<factor>     one routed expert's weight scaled (global expert index,
                                                       on whichever expert-parallel rank holds it)
  rope_scaling:<factor>                                the model built with rope_scaling_factor x factor
  router_score:<softmax|sigmoid>                       the model built with that router score function

``scale``/``add``/``zero`` also take the non-layer weights ``embedding.word_embeddings.weight``,
``decoder.final_layernorm.weight`` and ``output_layer.weight``. Controls are injected after the load
into the built megatron model, except the build kinds (``BUILD_KINDS``: rotary base and scaling,
router scoring, multimodal RoPE), which change the family's megatron settings before the build.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch

from mcore_bridge.errors import UsageError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
KINDS = ("scale", "swap_qk", "rope_base", "local_rope_base", "window", "zero", "swap_experts", "mrope_section",
         "mrope_contiguous", "grad_scale", "optimizer_exclude", "config", "add", "eps", "swap_gate_up",
         "activation", "scale_expert", "rope_scaling", "router_score", "model")
BUILD_KINDS = ("rope_base", "local_rope_base", "window", "mrope_section", "mrope_contiguous", "config",
               "rope_scaling", "router_score", "model")
_GLOBAL = ("embedding.", "decoder.final_layernorm.", "output_layer.")


def parse(spec: str | None) -> tuple[str, list[str]] | None:
    if not spec:
        return None
    kind, *args = spec.split(":")
    if kind not in KINDS:
        raise UsageError(f"--control {spec!r}: unknown kind {kind!r} ({', '.join(KINDS)})")
    return kind, args


def before_build(bridge, spec: str | None):
    """Controls that change how the model is built (rope_base, mrope_section)."""
    parsed = parse(spec)
    if not parsed or parsed[0] not in BUILD_KINDS:
        return
    kind, args = parsed
    family = bridge.family
    arch = family.architecture
    config, model = arch.config, arch.model
    if kind == "rope_base":
        model = dict(model, rotary_base=model["rotary_base"] * float(args[0]))
    elif kind == "local_rope_base":
        if "local_rotary_base" not in model:
            raise UsageError(f"control local_rope_base: {family.name} has no separate local RoPE base")
        model = dict(model, local_rotary_base=model["local_rotary_base"] * float(args[0]))
    elif kind == "window":
        if not config.get("window_size"):
            raise UsageError(f"control window: {family.name} has no sliding window")
        left, right = config["window_size"]
        config = dict(config, window_size=(left + int(args[0]), right))
    elif kind == "config":
        config = dict(config, **{args[0]: _config_value(config, args[0], ":".join(args[1:]))})
    elif kind == "model":
        model = dict(model, **{args[0]: _config_value(model, args[0], ":".join(args[1:]), "model")})
    elif kind == "rope_scaling":
        if not model.get("rope_scaling"):
            raise UsageError(f"control {kind}: {family.name} has no RoPE scaling")
        model = dict(model, rope_scaling_factor=model["rope_scaling_factor"] * float(args[0]))
    elif kind == "router_score":
        if "moe_router_score_function" not in config or args[0] not in ("softmax", "sigmoid"):
            raise UsageError(f"control {kind}: needs an MoE model and softmax or sigmoid")
        config = dict(config, moe_router_score_function=args[0])
    elif "mrope_section" not in config:
        raise UsageError(f"control {kind}: {family.name} has no multimodal RoPE")
    elif kind == "mrope_section":
        config = dict(config, mrope_section=[int(x) for x in args[0].split(",")])
    else:
        model = dict(model, vision=dataclasses.replace(model["vision"], mrope_interleaved=False))
    family.architecture = dataclasses.replace(arch, config=config, model=model)  # this bridge's family only


def _config_value(config, field: str, text: str, kind: str = "config"):
    import json

    if field not in config:
        raise UsageError(f"control {kind}:{field}: the model's {kind} settings have no such field "
                         f"(has e.g. {', '.join(sorted(config)[:8])})")
    try:
        value = json.loads(text)
    except ValueError:
        raise UsageError(f"control {kind}:{field}:{text}: the value must be JSON (e.g. 0, true, [4,0])") from None
    return tuple(value) if isinstance(config[field], tuple) and isinstance(value, list) else value


def _layer_param(models, layer: int, rest: str):
    for chunk in models:
        for module in chunk.decoder.layers:
            if module.layer_number - 1 == layer:
                tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
                if rest not in tensors:
                    raise UsageError(f"control: layer {layer} has no {rest!r} (has e.g. "
                                     f"{', '.join(sorted(tensors)[:6])})")
                return tensors[rest]
    return None  # another pipeline stage holds it


def _vision_param(models, name: str):
    """A vision-tower tensor (first pipeline stage; None elsewhere)."""
    for chunk in models:
        visual = getattr(chunk, "visual", None)
        if visual is not None:
            tensors = dict(visual.named_parameters())
            rest = name[len("visual."):]
            if rest not in tensors:
                raise UsageError(f"control: the vision tower has no {rest!r} (has e.g. "
                                 f"{', '.join(sorted(tensors)[:6])})")
            return tensors[rest]
    return None


def _mtp_param(models, name: str):
    """A multi-token-prediction tensor, ``mtp.layers.<k>.*`` (last pipeline stage; None elsewhere)."""
    for chunk in models:
        if getattr(chunk, "mtp_process", False):
            tensors = {**dict(chunk.mtp.named_parameters()), **dict(chunk.mtp.named_buffers())}
            rest = name[len("mtp."):]
            if rest not in tensors:
                raise UsageError(f"control: the MTP block has no {rest!r} (has e.g. {', '.join(sorted(tensors)[:6])})")
            return tensors[rest]


def _global_param(models, name: str):
    """embedding / final norm / output layer weight of the chunk holding it (None elsewhere)."""
    for chunk in models:
        tensors = dict(chunk.named_parameters())
        if name in tensors:
            return tensors[name]
    return None


def _param(models, spec_name: str):
    if spec_name.startswith("visual."):
        return _vision_param(models, spec_name)
    if spec_name.startswith("mtp."):
        return _mtp_param(models, spec_name)
    if spec_name.startswith(_GLOBAL):
        return _global_param(models, spec_name)
    return _layer_param(models, *_named(spec_name))


def _named(spec_name: str):
    m = _LAYER.match(spec_name)
    if not m:
        raise UsageError(f"control needs a decoder.layers.<i>.* name, got {spec_name!r}")
    return int(m.group(1)), m.group(2)


def _swap_experts(models, bridge, layer: int, a: int, b: int):
    from mcore_bridge.model import param_views

    owner_a, local_a = bridge.layout.expert_owner(bridge.family.num_experts, a)
    owner_b, local_b = bridge.layout.expert_owner(bridge.family.num_experts, b)
    if owner_a != owner_b:
        raise UsageError(f"swap_experts: experts {a} and {b} live on expert-parallel ranks {owner_a} and "
                         f"{owner_b}; pick two experts of one rank")
    from megatron.core import parallel_state as ps

    if ps.get_expert_model_parallel_rank() != owner_a:
        return
    state = param_views(models, bridge.family, bridge.layout)
    for fc in ("linear_fc1", "linear_fc2"):
        found = [(c, n) for (c, n) in state
                 if n.endswith(f"mlp.experts.local_experts.{local_a}.{fc}.weight")]
        for chunk, name in found:
            m = re.match(r"decoder\.layers\.(\d+)\.", name)
            if m is None:  # an MTP layer's experts (mtp.layers.<k>.*): not a decoder layer
                continue
            chunk_layers = [x.layer_number - 1 for x in models[chunk].decoder.layers]
            if chunk_layers[int(m.group(1))] != layer:
                continue
            x = state[(chunk, name)]
            y = state[(chunk, name.replace(f"local_experts.{local_a}.", f"local_experts.{local_b}."))]
            tmp = x.clone()
            x.copy_(y)
            y.copy_(tmp)


def _layer_module(models, layer: int):
    for chunk in models:
        for module in chunk.decoder.layers:
            if module.layer_number - 1 == layer:
                return module
    return None  # another pipeline stage holds it


def _local_expert(models, bridge, layer: int, expert: int):
    """This rank's module of global ``expert`` in ``layer``; None where another rank holds it."""
    from megatron.core import parallel_state as ps

    module = _layer_module(models, layer)
    if module is None:
        return None
    owner, local = bridge.layout.expert_owner(bridge.family.num_experts, expert)
    if ps.get_expert_model_parallel_rank() != owner:
        return None
    return module.mlp.experts.local_experts[local]


def _swap_halves(weight):
    """[gate; up] -> [up; gate] on this rank's shard (each TP shard holds its own gate and up rows)."""
    half = weight.shape[0] // 2
    gate = weight[:half].clone()
    weight[:half] = weight[half:]
    weight[half:] = gate


ACTIVATIONS = {"gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu, "silu": torch.nn.functional.silu}


def _more_after_load(models, bridge, kind: str, args: list[str]):
    if kind == "add":
        p = _param(models, args[0])
        if p is not None:
            p.add_(float(args[1]))
    elif kind == "eps":
        module = _layer_module(models, int(args[0]))
        if module is not None:
            norm = module.get_submodule(args[1])
            if not hasattr(norm, "eps"):
                raise UsageError(f"control eps: {args[1]} of layer {args[0]} ({type(norm).__name__}) has no eps")
            norm.eps = norm.eps * float(args[2])
    elif kind == "swap_gate_up":
        if len(args) > 1:
            expert = _local_expert(models, bridge, int(args[0]), int(args[1]))
            if expert is not None:
                _swap_halves(expert.linear_fc1.weight)
        else:
            p = _layer_param(models, int(args[0]), "mlp.linear_fc1.weight")
            if p is not None:
                _swap_halves(p)
    elif kind == "activation":
        if args[1] not in ACTIVATIONS:
            raise UsageError(f"control activation: one of {', '.join(ACTIVATIONS)}")
        module = _layer_module(models, int(args[0]))
        if module is not None:
            mlps = [module.mlp] + list(getattr(getattr(module.mlp, "experts", None), "local_experts", []))
            for mlp in mlps:
                if hasattr(mlp, "activation_func"):  # gated MLPs read it from their config: a copy for this layer
                    mlp.activation_func = ACTIVATIONS[args[1]]
                    mlp.config = copy.copy(mlp.config)
                    mlp.config.activation_func = ACTIVATIONS[args[1]]
    elif kind == "scale_expert":
        expert = _local_expert(models, bridge, int(args[0]), int(args[1]))
        if expert is not None:
            getattr(expert, f"linear_{args[2]}").weight.mul_(float(args[3]))


def after_load(models, bridge, spec: str | None):
    """Controls that change loaded weights (scale, swap_qk); ranks not holding the layer skip."""
    parsed = parse(spec)
    if not parsed or parsed[0] in BUILD_KINDS:
        return
    kind, args = parsed
    with torch.no_grad():
        if kind in ("add", "eps", "swap_gate_up", "activation", "scale_expert"):
            _more_after_load(models, bridge, kind, args)
        elif kind == "scale":
            p = _param(models, args[0])
            if p is not None:
                p.mul_(float(args[1]))
        elif kind == "grad_scale":
            p = _param(models, args[0])
            if p is not None:
                factor = float(args[1])
                p.register_hook(lambda g: g * factor)
        elif kind == "zero":
            p = _param(models, args[0])
            if p is not None:
                p.zero_()
        elif kind == "swap_experts":
            _swap_experts(models, bridge, *(int(a) for a in args[:3]))
        elif kind == "swap_qk":
            layer = int(args[0])
            p = _layer_param(models, layer, "self_attention.linear_qkv.weight")
            if p is not None:
                s = bridge.family.architecture.config
                heads, groups, d = s["num_attention_heads"], s["num_query_groups"], s["kv_channels"]
                local_groups = groups // bridge.layout.tp
                per_group = (heads // groups + 2) * d
                view = p.view(local_groups, per_group, -1)
                q_first = view[:, :d].clone()
                k_rows = slice(heads // groups * d, heads // groups * d + d)
                view[:, :d] = view[:, k_rows]
                view[:, k_rows] = q_first


def optimizer_exclusion(spec: str | None) -> str | None:
    """The megatron parameter an ``optimizer_exclude`` control leaves out of the optimizer."""
    parsed = parse(spec)
    return parsed[1][0] if parsed and parsed[0] == "optimizer_exclude" else None


def find_param(models, spec_name: str):
    """The parameter behind a control's name (global layer numbers), None on other stages."""
    return _param(models, spec_name)
