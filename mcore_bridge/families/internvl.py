"""InternVL 3 / 3.5 in transformers' format (``model_type: internvl``, ``InternVLForConditionalGeneration``,
the ``OpenGVLab/InternVL3-*-hf`` / ``InternVL3_5-*-HF`` checkpoints).

Three parts: the InternViT vision tower, a pixel-shuffle + ``multi_modal_projector`` (LayerNorm,
linear, GELU, linear), and a language model that is one of our text families, chosen by
``text_config.model_type`` (Qwen2 for InternVL3, Qwen3 / Qwen3-MoE for InternVL3.5): the class
``InternVL`` composes itself with that family (``InternVLQwen2`` ...), so every LM setting, refusal and
rule is the text family's own. Positions are plain 1-D RoPE (no multimodal RoPE).

The vision side stays transformers' own modules, regrouped on the megatron side as ``visual``:
``visual.patch_embed`` (the tower's embeddings: patch conv, CLS token, position embedding),
``visual.blocks.{i}`` (the tower's layers) and ``visual.merger`` (the tower's final norm, CLS drop,
pixel shuffle and the projector). Each of their tensors is one replicated rule, listed from the
module built on the meta device, so strict accounting covers the vision weights too.

The original ``OpenGVLab/InternVL3-*`` repositories (``model_type: internvl_chat``, custom code,
other tensor names: ``vision_model.*``, ``mlp1.*``) are not read: convert them with transformers'
``convert_internvl_weights_to_hf`` first.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from ..errors import AdapterError
from ..transforms import REPLICATED
from .base import Family, HFConfig, UnsupportedConfig, rule
from .moe import Qwen3MoE
from .qwen import Qwen2, Qwen3
from .qwen_vl import hf_config, text_config

VISION = "visual."  # megatron-side prefix of the vision module
# On-disk prefixes: (language model, vision tower, projector, untied output head). transformers
# (4.52 to 5.x) writes InternVL checkpoints as the hub holds them (``STORED``, its checkpoint
# conversion mapping reversed); a state dict saved as is has the in-memory names (``IN_MEMORY``).
STORED = ("language_model.model.", "vision_tower.", "multi_modal_projector.", "language_model.lm_head.weight")
IN_MEMORY = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.weight")
# megatron-side module (``visual.<part>``) -> (spelling index, prefix under it) of the HF tensors
PARTS = (("patch_embed.", 1, "embeddings."), ("blocks.", 1, "encoder.layer."), ("merger.norm.", 1, "layernorm."),
         ("merger.projector.", 2, ""))


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """What the megatron-side model needs to run the vision side (``internvl_model.TiledVisionGPT``)."""

    image_token_id: int
    image_size: int  # side of one tile, pixels
    patch_size: int
    downsample_ratio: float
    tokens_per_tile: int  # language tokens one tile becomes


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[B, S, S, C] -> [B, S*r, S*r, C/r^2]``: neighbouring features merged into channels, with
    InternVL's axis order (the width axis is folded first, then the height axis)."""
    b, w, h, c = x.shape
    x = x.reshape(b, w, int(h * ratio), int(c / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(b, int(h * ratio), int(w * ratio), int(c / ratio ** 2)).permute(0, 2, 1, 3)
    return x.contiguous()


class Merger(torch.nn.Module):
    """The tower's final norm, the CLS token dropped, the pixel shuffle and the projector:
    ``[tiles, 1 + S*S, W] -> [tiles, tokens_per_tile, hidden]``."""

    def __init__(self, norm, projector, ratio: float):
        super().__init__()
        self.norm, self.projector, self.ratio = norm, projector, ratio

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        feats = self.norm(hidden)[:, 1:, :]
        side = int(feats.shape[1] ** 0.5)
        feats = pixel_shuffle(feats.reshape(feats.shape[0], side, side, -1), self.ratio)
        return self.projector(feats.reshape(feats.shape[0], -1, feats.shape[-1]))


class InternVLVision(torch.nn.Module):
    """transformers' InternViT tower and projector, regrouped (see the module docstring)."""

    def __init__(self, raw: dict):
        super().__init__()
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        from transformers.models.internvl.modeling_internvl import (InternVLMultiModalProjector,
                                                                    InternVLVisionModel)

        cfg = hf_config(raw)
        with no_init_weights():  # the checkpoint fills the parameters
            tower = InternVLVisionModel._from_config(cfg.vision_config)
            projector = InternVLMultiModalProjector(cfg)
        self.patch_embed = tower.embeddings
        self.blocks = tower.encoder.layer
        self.merger = Merger(tower.layernorm, projector, float(cfg.downsample_ratio))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.patch_embed(pixel_values.to(self.dtype))
        for block in self.blocks:
            hidden = block(hidden)
        return self.merger(hidden)


@functools.lru_cache(maxsize=16)
def _vision_names(raw_json: str) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(InternVLVision(json.loads(raw_json)).state_dict())


class InternVL(Family):
    """``model_type: internvl``; instances are of the composed class for the language model."""

    model_types = ("internvl",)
    name = "internvl"
    multimodal = True
    first_stage_prefixes = ("embedding.", "visual.")  # the vision side runs before the first layer
    vision_input = "tiles"  # verify's image samples: fixed-size tiles (``verify.inputs``)
    spelling = STORED

    def __new__(cls, raw_config: dict | None = None, *args, **kwargs):
        if cls is InternVL and raw_config is not None:
            kind = (raw_config.get("text_config") or {}).get("model_type", "qwen2")
            if kind not in TEXT_FAMILIES:
                raise UnsupportedConfig(
                    f"internvl: text_config.model_type={kind!r} is not mapped (supported language models: "
                    f"{', '.join(sorted(TEXT_FAMILIES))})")
            cls = TEXT_FAMILIES[kind]
        return super().__new__(cls)

    def __init__(self, raw_config: dict):
        self.full_config = dict(raw_config)
        text = text_config(raw_config)
        # tying is the outer config's (transformers' InternVLConfig defaults it to True)
        text["tie_word_embeddings"] = bool(hf_config(raw_config).tie_word_embeddings)
        self.cfg = HFConfig(text)
        self.spelling = STORED

    spellings = (STORED, IN_MEMORY)  # as stored, or the in-memory names; export keeps it

    @property
    def hf_prefix(self) -> str:
        return self.spelling[0]

    # -- config ------------------------------------------------------------------------------
    def rope_settings(self) -> dict:
        """InternVL3's Qwen2.5 language models declare dynamic-NTK scaling (factor 2): transformers
        computes the default frequencies up to ``max_position_embeddings`` tokens and rescales only
        beyond; megatron keeps the default ones, so the two agree up to that length."""
        rope = self.cfg.rope
        if rope.get("rope_type") == "dynamic":
            return {"rotary_base": float(rope.get("rope_theta", 10000.0)),
                    "rotary_percent": float(rope.get("partial_rotary_factor", 1.0))}
        return super().rope_settings()

    def tile_settings(self) -> TileSettings:
        raw = self.full_config
        cfg = hf_config(raw)
        v = cfg.vision_config
        layer = cfg.vision_feature_layer
        if layer != -1:
            raise UnsupportedConfig(f"internvl: vision_feature_layer={layer!r}: only the last vision layer (-1) is "
                                    f"mapped (the bridge runs the whole tower and its final norm)")
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedConfig(f"internvl: vision_feature_select_strategy="
                                    f"{cfg.vision_feature_select_strategy!r}: only 'default' (CLS token dropped) "
                                    f"gives a square feature map to pixel-shuffle")
        size, patch = tuple(v.image_size), tuple(v.patch_size)
        if size[0] != size[1] or patch[0] != patch[1]:
            raise UnsupportedConfig(f"internvl: vision image_size={list(size)} / patch_size={list(patch)}: only "
                                    f"square tiles are mapped")
        ratio = float(cfg.downsample_ratio)
        side = size[0] // patch[0]
        shuffled = side * ratio
        if shuffled != int(shuffled) or int(1 / ratio) != 1 / ratio:
            raise UnsupportedConfig(f"internvl: downsample_ratio={ratio} does not divide the {side} x {side} "
                                    f"patch grid into whole pixel-shuffle blocks")
        if "image_token_id" not in raw and "image_token_index" not in raw:
            raise UnsupportedConfig("internvl: config.json has no 'image_token_id'")
        return TileSettings(int(cfg.image_token_id), size[0], patch[0], ratio, int(shuffled) ** 2)

    def vision_settings(self) -> TileSettings:
        return self.tile_settings()

    def model_settings(self) -> dict:
        settings = super().model_settings()
        # the vision side (transformers' own modules) runs inside the model, on the first stage
        settings["model"].update(vision=self.tile_settings(), hf_config=self.full_config)
        return settings

    def megatron_model_class(self) -> type:
        from .internvl_model import TiledVisionGPT

        return TiledVisionGPT

    def check_lora(self) -> None:
        raise AdapterError(f"LoRA on vision-language models ({self.name}) is not supported yet: "
                           f"PEFT names their modules under model.language_model / model.vision_tower, which "
                           f"the adapter tables do not map; merge the adapter with PEFT first")

    # -- weights -----------------------------------------------------------------------------
    def vision_names(self) -> tuple[str, ...]:
        return _vision_names(json.dumps(self.full_config, sort_keys=True))

    def hf_vision_name(self, name: str) -> str:
        """The on-disk name of ``visual.<name>``."""
        for mine, which, theirs in PARTS:
            if name.startswith(mine):
                return self.spelling[which] + theirs + name[len(mine):]
        raise AssertionError(f"internvl: vision tensor {name!r} has no HF counterpart")  # PARTS covers the module

    def rules(self):
        """The text family's rules (under ``hf_prefix``; the untied head under its spelling) and one
        replicated rule per vision tensor."""
        rows = [dataclasses.replace(r, hf=tuple(self.spelling[3] if n == "lm_head.weight" else n for n in r.hf))
                for r in super().rules()]
        return rows + [rule(VISION + n, self.hf_vision_name(n), REPLICATED) for n in self.vision_names()]


class InternVLQwen2(InternVL, Qwen2):
    """InternVL3 (Qwen2 / Qwen2.5 language models)."""


class InternVLQwen3(InternVL, Qwen3):
    """InternVL3.5 dense (Qwen3 language models)."""


class InternVLQwen3MoE(InternVL, Qwen3MoE):
    """InternVL3.5 MoE (Qwen3-MoE language models)."""


TEXT_FAMILIES = {"qwen2": InternVLQwen2, "qwen3": InternVLQwen3, "qwen3_moe": InternVLQwen3MoE}
