"""Family registry: HF ``model_type`` -> family class."""

from __future__ import annotations

from .base import Family, HFConfig, Rule, UnsupportedConfig, canonical_param_name
from .deepseek import DeepSeekV3
from .deepseek_v2 import DeepSeekV2
from .gemma import Gemma3Text
from .gemma3_vl import Gemma3VL
from .glm4 import Glm4
from .glm4_moe import Glm4Moe
from .gpt_oss import GptOss
from .internvl import InternVL
from .llama import Llama
from .moe import Mixtral, Qwen2MoE, Qwen3MoE
from .olmoe import Olmoe
from .phi3 import Phi3
from .qwen import Qwen2, Qwen3
from .qwen_vl import Qwen2VL, Qwen3VL, Qwen3VLMoE, Qwen25VL
from .qwen3_next import Qwen3Next
from .qwen3_5 import Qwen35, Qwen35MoE

FAMILIES: dict[str, type[Family]] = {}
for _cls in (Llama, Qwen2, Qwen3, Mixtral, Qwen2MoE, Qwen3MoE, DeepSeekV3, DeepSeekV2, Glm4Moe, Olmoe, GptOss, Qwen2VL,
             Qwen25VL, Qwen3VL, Qwen3VLMoE, Gemma3Text, Phi3, Glm4, InternVL, Gemma3VL, Qwen3Next,
             Qwen35, Qwen35MoE):
    for _t in _cls.model_types:
        FAMILIES[_t] = _cls


def family_for(raw_config: dict) -> Family:
    model_type = raw_config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedConfig(
            f"unknown architecture model_type={model_type!r} (architectures="
            f"{raw_config.get('architectures')}); supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type](raw_config)


__all__ = ["FAMILIES", "Family", "HFConfig", "Rule", "UnsupportedConfig", "canonical_param_name", "family_for"]
