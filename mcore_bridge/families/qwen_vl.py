"""Vision-language Qwen models: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE.

The language model is the text family it is built on (Qwen2, Qwen3, Qwen3-MoE) with multimodal
RoPE; its tensors live under ``model.language_model.`` (transformers 5) or, in the older layout
still written for Qwen2-VL / Qwen2.5-VL, under ``model.``. The vision tower and merger stay the
real transformers module, kept whole on the first pipeline stage: every one of its tensors is a
replicated rule ``visual.<name>`` <-> ``<vision prefix><name>``, so vision weights keep their HF
names on both sides. The rows come from the module itself (built on the meta device), so strict
accounting covers the vision tower too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

from ..errors import AdapterError
from ..transforms import REPLICATED
from .base import HFConfig, UnsupportedConfig, rule
from .moe import MoEMixin
from .qwen import Qwen2, Qwen3

VISION = "visual."  # megatron-side prefix of the vision module
# (language-model prefix, vision prefix) on disk: transformers 5 names, and the older layout
CURRENT = ("model.language_model.", "model.visual.")
LEGACY = ("model.", "visual.")


def text_config(raw: dict) -> dict:
    """The language model's settings: ``text_config`` (nested) or the top level (older configs).
    Tying is decided by the outer config, as transformers does."""
    flat = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}
    text = {**flat, **(raw.get("text_config") or {})}
    text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    return text


@functools.lru_cache(maxsize=16)
def _vision_names(model_type: str, vision_class: str, vision_json: str) -> tuple[str, ...]:
    import json

    import torch

    with torch.device("meta"):
        module = build_vision(model_type, vision_class, json.loads(vision_json))
    return tuple(module.state_dict())


def hf_config(raw: dict):
    """The transformers config object for ``raw`` (config.json contents)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(raw["model_type"], **kw)


def build_vision(model_type: str, vision_class: str, raw: dict):
    """The transformers vision tower (+ merger) for the model's config, with its own defaults.
    Parameters are left uninitialised (the checkpoint fills them; 37 s -> 0.1 s for Qwen3-VL's
    27 blocks on a CPU); buffers such as the rotary frequencies are computed as usual."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    module, cls = vision_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(f"transformers.models.{module}"), cls)
    with no_init_weights():
        return cls._from_config(hf_config(raw).vision_config)


@dataclasses.dataclass(frozen=True)
class VisionSettings:
    """What the megatron-side model needs to run the vision tower (``vl_model.VisionLanguageGPT``)."""

    model_type: str
    vision_class: str
    image_token_id: int
    video_token_id: int
    deepstack_layers: int  # language layers that receive deepstack features (Qwen3-VL), else 0
    mrope_interleaved: bool


class VisionLanguageMixin:
    """Turns a text family into its vision-language model. Subclasses set ``vision_class`` (module
    path under ``transformers.models``), ``model_class`` (the inner ``*Model`` with
    ``get_rope_index``) and ``mrope_interleaved``."""

    multimodal = True
    first_stage_prefixes = ("embedding.", "visual.")  # the vision tower runs before the first layer
    vision_class = ""
    model_class = ""
    mrope_interleaved = False
    spelling = CURRENT  # on-disk prefixes; ``adapt`` switches to what a checkpoint uses
    default_spelling = CURRENT  # what transformers writes for this model type

    def __init__(self, raw_config: dict):
        self.full_config = dict(raw_config)
        self.cfg = HFConfig(text_config(raw_config))
        self.spelling = self.default_spelling
        self.rope_model = None  # transformers' model on the meta device (``get_rope_index``), built on first use

    spellings = (CURRENT, LEGACY)  # transformers 5's names or the older layout; export keeps it

    @property
    def hf_prefix(self) -> str:
        return self.spelling[0]

    # -- config ------------------------------------------------------------------------------
    @property
    def mrope_section(self) -> list[int]:
        section = self.cfg.rope.get("mrope_section")
        if not section or len(section) != 3:
            raise UnsupportedConfig(f"text rope settings have no 3-part mrope_section (got {section!r}): "
                                    f"multimodal RoPE cannot be mapped")
        rotary = int(self.head_dim * float(self.cfg.rope.get("partial_rotary_factor", 1.0)))
        if 2 * sum(section) != rotary:
            raise UnsupportedConfig(f"mrope_section={section} sums to {sum(section)}, the rotary dimension "
                                    f"is {rotary} (expected a sum of {rotary // 2})")
        return [int(s) for s in section]

    def rope_settings(self) -> dict:
        rope = self.cfg.rope
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise UnsupportedConfig(f"rope_type={rope.get('rope_type')!r}: only default multimodal RoPE is mapped")
        return {"rotary_base": float(rope.get("rope_theta", 10000.0)),
                "rotary_percent": float(rope.get("partial_rotary_factor", 1.0))}

    def vision_settings(self) -> VisionSettings:
        raw = self.full_config
        vision = raw.get("vision_config") or {}
        deepstack = len(vision.get("deepstack_visual_indexes") or [])
        if deepstack > self.num_layers:  # transformers would fail on them too
            raise UnsupportedConfig(f"{deepstack} deepstack features for {self.num_layers} language layers")
        return VisionSettings(raw["model_type"], self.vision_class, int(raw["image_token_id"]),
                              int(raw["video_token_id"]), deepstack, self.mrope_interleaved)

    def check_lora(self) -> None:
        raise AdapterError(f"LoRA on vision-language models ({self.name}) is not supported yet: "
                           f"PEFT names their modules under model.language_model / model.visual, which "
                           f"the adapter tables do not map; merge the adapter with PEFT first")

    def check_layout(self, layout) -> None:
        """Deepstack features enter the first language layers, next to the vision tower."""
        from ..layout import LayoutError

        need = self.vision_settings().deepstack_layers
        first = len(layout.chunk_layers(self.num_layers, 0, 0))
        if need > first:
            raise LayoutError(
                f"{self.name} adds deepstack vision features into language layers 0-{need - 1}, which must "
                f"sit on the first pipeline stage with the vision tower; this layout puts {first} there: "
                f"use --decoder-first-pipeline-num-layers {need} or more (first_stage_layers), or fewer pipeline stages")

    def model_settings(self) -> dict:
        settings = super().model_settings()
        settings["config"]["mrope_section"] = self.mrope_section
        settings["model"]["position_embedding_type"] = "mrope"
        # the vision tower (transformers' own module) runs inside the model, on the first stage
        settings["model"].update(vision=self.vision_settings(), hf_config=self.full_config)
        return settings

    def megatron_model_class(self) -> type:
        from .vl_model import VisionLanguageGPT

        return VisionLanguageGPT

    # -- weights -----------------------------------------------------------------------------
    def vision_names(self) -> tuple[str, ...]:
        import json

        raw = self.full_config
        return _vision_names(raw["model_type"], self.vision_class, json.dumps(raw, sort_keys=True))

    def rules(self):
        """The text family's rules (under ``hf_prefix``) and the vision tower's, one per tensor."""
        vision = self.spelling[1]
        return super().rules() + [rule(VISION + n, vision + n, REPLICATED) for n in self.vision_names()]


class Qwen2VL(VisionLanguageMixin, Qwen2):
    model_types = ("qwen2_vl",)
    name = "qwen2_vl"
    vision_class = "qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel"
    model_class = "qwen2_vl.modeling_qwen2_vl.Qwen2VLModel"
    default_spelling = LEGACY


class Qwen25VL(VisionLanguageMixin, Qwen2):
    model_types = ("qwen2_5_vl",)
    name = "qwen2_5_vl"
    vision_class = "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel"
    model_class = "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLModel"
    default_spelling = LEGACY


class Qwen3VL(VisionLanguageMixin, Qwen3):
    model_types = ("qwen3_vl",)
    name = "qwen3_vl"
    vision_class = "qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel"
    model_class = "qwen3_vl.modeling_qwen3_vl.Qwen3VLModel"
    mrope_interleaved = True  # transformers always interleaves t/h/w frequencies for Qwen3-VL


class Qwen3VLMoE(VisionLanguageMixin, MoEMixin, Qwen3):
    """Experts are stored stacked on disk (``mlp.experts.gate_up_proj [E, 2F, H]``); the MoE
    rules are written per expert and ``stacked`` views them. The top-k weights are always
    renormalised (there is no ``norm_topk_prob`` switch) and there is no shared expert."""

    model_types = ("qwen3_vl_moe",)
    name = "qwen3_vl_moe"
    vision_class = "qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeVisionModel"
    model_class = "qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeModel"
    mrope_interleaved = True

    @property
    def norm_topk_prob(self) -> bool:
        return True
