"""What a model family declares, and the machinery shared by all families.

A family turns an HF ``config.json`` into megatron settings (``model_settings``) and lists its
weight mapping as ``Rule`` rows: a megatron parameter pattern, the HF on-disk name(s) behind it and
the transform between them. ``{L}`` stands for the global layer index on both sides; ``{E}`` for an
expert: the local index (on its expert-parallel rank) in megatron names, the global one in HF names.
A rule applies to every layer, or only to ``dense`` or ``moe`` layers (models that mix them). The
rank arithmetic is not here: it lives in ``layout`` and ``plan``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

from ..errors import UnsupportedConfig  # noqa: F401  (re-exported: its home before errors.py)
from ..transforms import Transform


class Layers(enum.StrEnum):
    """The layers a rule applies to (compares equal to its value, as ``Family.layer_kind`` returns)."""

    ALL = "all"
    DENSE = "dense"
    MOE = "moe"


@dataclasses.dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    transform: Transform
    export: bool = True  # False: load-only copy (tied output layer on the last pipeline stage)
    when: Layers = Layers.ALL  # layers it applies to
    # token mixer of the layers it applies to: "all", or what ``Family.layer_mixer`` returns
    # ("attention"; hybrid models also "linear", e.g. Qwen3-Next's gated delta-net layers)
    mixer: str = "all"

    def applies(self, family, layer: int) -> bool:
        """Whether this per-layer rule maps a tensor of ``layer`` (its MLP kind and token mixer)."""
        return self.when in ("all", family.layer_kind(layer)) and self.mixer in ("all", family.layer_mixer(layer))

    @property
    def per_layer(self) -> bool:
        return "{L}" in self.mcore

    @property
    def expert(self) -> bool:
        """Per-expert parameter: split by expert parallelism and by the expert-TP group."""
        return "{E}" in self.mcore

    def hf_names(self, layer: Optional[int], expert: Optional[int] = None) -> tuple[str, ...]:
        return tuple(n.replace("{L}", str(layer)).replace("{E}", str(expert)) for n in self.hf)


def rule(mcore: str, hf: str | Sequence[str], transform: Transform, export: bool = True,
         when: Layers = Layers.ALL, mixer: str = "all") -> Rule:
    return Rule(mcore, (hf,) if isinstance(hf, str) else tuple(hf), transform, export, Layers(when), mixer)


# TransformerEngine specs fuse the pre-attention / pre-MLP norms into the following linear; the
# local spec keeps them separate. Both spellings name the same tensor.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
    # multi-latent attention: the q/kv latent norms fuse into the up projections
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}
_WRAPPER_PREFIX = re.compile(r"^(module\.)+")
# TE grouped experts keep one tensor per local expert as ``experts.linear_fc1.weight{i}``; the
# local spec's SequentialMLP spells the same tensor ``experts.local_experts.{i}.linear_fc1.weight``.
_TE_GROUPED = re.compile(r"mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def canonical_param_name(name: str) -> str:
    """Strip DDP/Float16 ``module.`` wrappers and map TE names onto the local-spec names."""
    name = _WRAPPER_PREFIX.sub("", name)
    for te, local in TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    m = _TE_GROUPED.search(name)
    if m:
        return name[: m.start()] + f"mlp.experts.local_experts.{m.group(3)}.{m.group(1)}.{m.group(2)}"
    return name


class HFConfig:
    """Read-only view of an HF ``config.json`` that knows the spellings seen in the wild."""

    def __init__(self, raw: dict):
        self.raw = dict(raw)

    def get(self, *names: str, default: Any = None) -> Any:
        for n in names:
            if n in self.raw and self.raw[n] is not None:
                return self.raw[n]
        return default

    def require(self, name: str) -> Any:
        if self.raw.get(name) is None:
            raise UnsupportedConfig(f"config.json has no '{name}'")
        return self.raw[name]

    @property
    def rope(self) -> dict:
        """RoPE settings merged from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
        ``rope_scaling`` (4.x checkpoints)."""
        params = dict(self.raw.get("rope_parameters") or {})
        scaling = self.raw.get("rope_scaling") or {}
        params = {**scaling, **params}
        if "rope_theta" not in params and self.raw.get("rope_theta") is not None:
            params["rope_theta"] = self.raw["rope_theta"]
        params.setdefault("rope_type", params.pop("type", "default") or "default")
        return params


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Everything megatron-core needs to build a family's model, declared by the family and built
    once per family instance (``Family.architecture``). ``model.build_model`` only calls it:

        config = config_class()(**config, <layout and runtime settings>)
        spec   = layer_spec(config, vp_stage, pp_rank)
        chunk  = model_class()(config, spec, <pipeline placement>, **model,   # vocab padded for TP
                               **chunk_kwargs(config, spec, vp_stage, pp_rank))
    """

    config: Mapping[str, Any]  # megatron config fields that describe the model (no layout, no runtime)
    model: Mapping[str, Any]  # the model class's keyword arguments; vocab_size before TP padding
    config_class: Callable[[], type]  # -> TransformerConfig or a subclass (imported when called)
    layer_spec: Callable[[Any, Optional[int], int], Any]  # (config, vp_stage, pp_rank) -> layer/block spec
    model_class: Callable[[], type]  # -> GPTModel or a subclass (imported when called)
    # (config, layer spec, vp_stage, pp_rank) -> extra model kwargs of one chunk (MTP block spec)
    chunk_kwargs: Callable[[Any, Any, Optional[int], int], Mapping[str, Any]] = lambda *a: {}


class Family:
    """Base class. Subclasses set ``model_types`` and implement ``model_settings`` and ``rules``;
    they override ``layer_spec`` / ``megatron_config_class`` / ``megatron_model_class`` where the
    model is not a dense GPT (see README.md in this directory)."""

    model_types: tuple[str, ...] = ()
    name: str = ""
    multimodal = False  # vision-language families (``qwen_vl``) say True
    # megatron parameter names (suffixes) megatron keeps in fp32 whatever the model's dtype: an fp32
    # HF tensor that lands there does not decide the model's dtype (``Bridge.source_dtype``)
    fp32_in_megatron: tuple[str, ...] = ()
    hf_prefix = "model."  # HF prefix of the language model's tensors (embeddings, layers, final norm)
    # True where ``layer_spec`` returns megatron's decoder *block* spec (per-layer specs) instead of
    # one layer spec: megatron's TE variant of it adds a final-norm ``_extra_state`` (te_layout).
    decoder_block_spec = False
    # Prefixes of the non-layer megatron parameters the first pipeline stage holds (the rest of
    # them belong to the last stage); a vision tower adds its own.
    first_stage_prefixes: tuple[str, ...] = ("embedding.",)
    # LoRA: megatron modules besides the ``linear_*`` ones that an adapter covers only when named
    # (never by all-linear): module kind -> the parameter name PEFT targets it by (``target_parameters``)
    lora_named_only: Mapping[str, str] = MappingProxyType({})
    # LoRA targets users may name that this family lacks -> the reason ("target 'router': NAME has no MoE router")
    lora_absent: Mapping[str, str] = MappingProxyType({"router": "has no MoE router", "gate": "has no MoE router"})

    @property
    def hf_layer_prefix(self) -> str:
        """HF prefix of a decoder layer's tensors, ``{L}`` standing for the layer."""
        return self.hf_prefix + "layers.{L}."

    def __init__(self, raw_config: dict):
        self.cfg = HFConfig(raw_config)

    def fp8_unquantized(self) -> frozenset[str]:
        """HF 2-D weights that an FP8 export of a bf16 source leaves unquantised beyond
        ``quant.default_fp8_names``' own rule (norms, embeddings, lm_head, routers)."""
        return frozenset()

    # -- to override --------------------------------------------------------------------------
    def model_settings(self) -> dict:
        """``{"config": megatron config kwargs, "model": model class kwargs}``, read from the HF
        config; refuses (``UnsupportedConfig``) what megatron-core cannot express. Called once,
        by ``architecture``: everything else reads that."""
        raise NotImplementedError

    def megatron_config_class(self) -> type:
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig

    def megatron_model_class(self) -> type:
        from megatron.core.models.gpt import GPTModel

        return GPTModel

    def layer_spec(self, config, vp_stage: Optional[int], pp_rank: int):
        """The local (no TransformerEngine) spec of a GPT layer, the same for every layer."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        c = self.architecture.config
        return get_gpt_layer_local_spec(normalization=c["normalization"], qk_layernorm=c["qk_layernorm"])

    def extend_settings(self, settings: dict) -> dict:
        """``model_settings`` completed by mixins a family lists in its bases (``mtp.MTPMixin``),
        which cannot override ``model_settings`` where the family class defines it itself."""
        return settings

    def chunk_kwargs(self, config, spec, vp_stage: Optional[int], pp_rank: int) -> dict:
        """Extra keyword arguments of the model class for one chunk, from its layer ``spec`` (none
        by default; ``mtp.MTPMixin``: the multi-token-prediction block spec)."""
        return {}

    @functools.cached_property
    def architecture(self) -> Architecture:
        s = self.extend_settings(self.model_settings())
        return Architecture(config=MappingProxyType(dict(s["config"])), model=MappingProxyType(dict(s["model"])),
                            config_class=self.megatron_config_class, layer_spec=self.layer_spec,
                            model_class=self.megatron_model_class, chunk_kwargs=self.chunk_kwargs)

    def rules(self) -> list[Rule]:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.cfg.require("num_hidden_layers"))

    @property
    def tied(self) -> bool:
        return bool(self.cfg.get("tie_word_embeddings", default=False))

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0: a dense model)."""
        return 0

    def is_moe_layer(self, layer: int) -> bool:
        return False

    def check_tensors(self, names) -> None:
        """Refuse checkpoint contents this family knows it cannot convert (before strict accounting
        would call them merely unexpected)."""

    # naming layouts of the checkpoints a family reads (tuples of prefixes; item 0 is the language
    # model's), in the order they are tried; the family sets ``self.spelling`` to its default one
    spellings: tuple = ()

    def spelling_markers(self, spelling) -> list[str]:
        """Tensor names whose presence identifies ``spelling``: by default the embedding under its prefix."""
        return [f"{spelling[0]}embed_tokens.weight"]

    def adapt(self, hf_names) -> None:
        """Follow naming choices of the checkpoint at hand (``hf_names``) where a family allows
        several (``spellings``: the first whose markers are all there); the rules then produce
        those names, so export writes them back."""
        names = set(hf_names)
        for spelling in self.spellings:
            if all(m in names for m in self.spelling_markers(spelling)):
                self.spelling = spelling
                return

    def check_lora(self) -> None:
        """Refuse LoRA (``errors.AdapterError``, with the reason) where the family cannot carry it."""

    def check_layout(self, layout) -> None:
        """Refuse layouts this model cannot run on beyond what ``layout_dims`` expresses."""

    def runtime_config(self, dtype, packed: bool = False) -> dict:
        """megatron config fields that choose how (not what) this model computes at ``dtype`` (and
        on THD ``packed`` sequences): an execution path of megatron's own, never a change of the
        weights or their names."""
        return {}

    def check_packing(self, dtype) -> None:
        """Refuse training on packed (THD) sequences at ``dtype`` where this model's megatron modules
        cannot take them here (a clear error before megatron's own, deep in a forward)."""

    def layer_kind(self, layer: int) -> Layers:
        return Layers.MOE if self.is_moe_layer(layer) else Layers.DENSE

    def layer_mixer(self, layer: int) -> str:
        """The layer's token mixer, matched against ``Rule.mixer`` ("attention" unless a hybrid
        family says otherwise)."""
        return "attention"

    def layout_dims(self) -> dict:
        """What the layout validator needs to know about this model."""
        s = self.architecture.config
        dense = any(not self.is_moe_layer(i) for i in range(self.num_layers))
        return dict(num_layers=s["num_layers"], num_attention_heads=s["num_attention_heads"],
                    num_query_groups=s.get("num_query_groups") or s["num_attention_heads"],
                    ffn_hidden_size=s["ffn_hidden_size"] if dense else None,
                    num_experts=s.get("num_moe_experts") or 0,
                    expert_ffn_hidden_size=s.get("moe_ffn_hidden_size"),
                    shared_expert_ffn_hidden_size=s.get("moe_shared_expert_intermediate_size"))

    def compiled_rules(self) -> list[tuple[re.Pattern, Rule]]:
        out = []
        for r in self.rules():
            pat = re.escape(r.mcore).replace(re.escape("{L}"), r"(?P<L>\d+)")
            pat = pat.replace(re.escape("{E}"), r"(?P<E>\d+)")
            out.append((re.compile(pat + "$"), r))
        return out
