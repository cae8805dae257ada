"""A family declares its whole model (``Family.architecture``): megatron config fields and class,
layer spec, model class and its arguments; ``model.py`` decides nothing about architectures."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from mcore_bridge import model as model_module
from mcore_bridge.families import family_for
from mcore_bridge.families.base import Architecture
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.zoo import _COMMON, MULTIMODAL, ZOO


def raw(name: str) -> dict:
    spec = {k: v for k, v in ZOO[name].items() if k != "max_shard_size"}
    if name in MULTIMODAL or "vision_config" in spec:
        from transformers import AutoConfig

        return AutoConfig.for_model(**spec).to_dict()
    return {**_COMMON, **spec}


def test_architecture_is_built_once_and_read_only(monkeypatch):
    fam = family_for(raw("qwen3_moe"))
    calls = []
    original = fam.model_settings
    monkeypatch.setattr(fam, "model_settings", lambda: calls.append(1) or original())
    arch = fam.architecture
    assert isinstance(arch, Architecture)
    assert fam.architecture is arch and fam.layout_dims() and fam.rules() and fam.architecture is arch
    assert calls == [1]  # layout, rules and the model read the one declaration
    with pytest.raises(TypeError):
        arch.config["hidden_size"] = 1
    with pytest.raises(AttributeError):
        arch.config_class = None


def test_refusals_surface_when_the_architecture_is_declared():
    from mcore_bridge.errors import UnsupportedConfig

    with pytest.raises(UnsupportedConfig, match="hidden_act"):
        family_for({**raw("llama"), "hidden_act": "gelu"}).architecture


@pytest.mark.parametrize("name,config_class,model_class,block", [
    ("llama", "TransformerConfig", "GPTModel", False),
    ("qwen3", "TransformerConfig", "GPTModel", False),
    ("mixtral", "TransformerConfig", "GPTModel", True),
    ("deepseek_v3", "MLATransformerConfig", "GPTModel", True),
    ("deepseek_v2", "MLATransformerConfig", "GPTModel", True),
    ("glm4_moe", "TransformerConfig", "GPTModel", True),
    ("olmoe", "TransformerConfig", "GPTModel", True),
    ("qwen3_vl", "TransformerConfig", "VisionLanguageGPT", False),
    ("qwen3_vl_moe", "TransformerConfig", "VisionLanguageGPT", True),
    ("qwen3_next", "TransformerConfig", "GPTModel", True),
    ("qwen3_5", "TransformerConfig", "VisionLanguageGPT", True),
    ("qwen3_5_moe", "TransformerConfig", "VisionLanguageGPT", True),
])
def test_each_family_declares_its_classes_and_spec(name, config_class, model_class, block):
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mcore_bridge.model import transformer_config

    fam = family_for(raw(name))
    arch = fam.architecture
    assert arch.config_class().__name__ == config_class and arch.model_class().__name__ == model_class
    assert arch.config["activation_func"] is torch.nn.functional.silu
    config = transformer_config(fam, ParallelLayout(), torch.float32, "cpu")
    assert type(config).__name__ == config_class
    spec = arch.layer_spec(config, None, 0)
    if block:  # per-layer specs: dense and MoE layers as moe_layer_freq says
        assert isinstance(spec, TransformerBlockSubmodules) and len(spec.layer_specs) == fam.num_layers
        moe = ["experts" in str(s.submodules.mlp) for s in spec.layer_specs]
        assert moe == [fam.is_moe_layer(i) for i in range(fam.num_layers)]
    else:
        assert isinstance(spec, ModuleSpec)
        qk_norm = spec.submodules.self_attention.submodules.q_layernorm
        assert (qk_norm.__name__ != "IdentityOp") is name.startswith("qwen3")  # q/k RMSNorm
    if model_class == "VisionLanguageGPT":
        assert arch.model["vision"].vision_class == fam.vision_class and arch.model["hf_config"] is fam.full_config


def test_model_module_names_no_architecture():
    source = inspect.getsource(model_module)
    for word in ("RMSNorm", "LayerNorm", "silu", "gelu", "multi_latent", "MLATransformerConfig", "vision",
                 "VisionLanguage", "get_gpt_layer_local_spec", "get_gpt_decoder_block_spec", "block"):
        assert not re.search(word, source, re.IGNORECASE), f"model.py decides {word!r}"


@pytest.mark.parametrize("name", list(ZOO))
def test_rules_are_typed_and_composed_by_hooks(name):
    from mcore_bridge.families.base import Layers, rule
    from mcore_bridge.families.llama import Llama
    from mcore_bridge.families.moe import MoEMixin

    fam = family_for(raw(name))
    rules = fam.rules()
    assert all(isinstance(r.when, Layers) for r in rules)
    lm_names = [n for r in rules if not r.mcore.startswith(("visual.", "mtp.")) for n in r.hf  # MTP: its own prefix
                if not n.endswith("lm_head.weight")]  # InternVL stores it as language_model.lm_head.weight
    assert all(n.startswith(fam.hf_prefix) for n in lm_names)  # one prefix, declared once
    if isinstance(fam, MoEMixin):  # the dense MLP of the parent, on dense layers only
        dense = [r for r in rules if r.when == Layers.DENSE]
        assert [r.mcore for r in dense] == [r.mcore for r in Llama.mlp_rules(fam)]
    with pytest.raises(ValueError):
        rule("x.weight", "y.weight", rules[0].transform, when="sparse")
