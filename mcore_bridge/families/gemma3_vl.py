"""Gemma 3 vision-language (``gemma3``: Gemma3ForConditionalGeneration, e.g. google/gemma-3-4b-it).

The language model is Gemma 3 text (``gemma.Gemma3Text``); the vision side is transformers' own
SigLIP tower and ``Gemma3MultiModalProjector`` (average pool to ``mm_tokens_per_image``, ``(1 + w)``
RMSNorm, a matrix), kept whole on the first pipeline stage under ``visual.`` with their HF names,
one replicated rule per tensor (strict accounting covers them). Tensors live under
``model.language_model.`` / ``model.vision_tower.`` / ``model.multi_modal_projector.``
(transformers 5's module names), ``language_model.model.`` / ``vision_tower.`` /
``multi_modal_projector.`` (what transformers 5.24 saves) or the same with
``vision_tower.vision_model.`` (as Google publishes them); ``adapt`` follows the checkpoint and
export writes its spelling back.

What transformers 5.24 computes (``Gemma3Model.forward``), and how it is expressed here
(``gemma3_vl_model.Gemma3VLGPT``):
  * all tokens are embedded and scaled by sqrt(hidden), image positions included; the image
    features then replace those positions unscaled (``masked_scatter``);
  * with ``token_type_ids`` (the processor's; 1 on image tokens) each image's tokens attend to each
    other bidirectionally: full layers OR(causal, same image), sliding layers
    AND(window, OR(causal, same image)); without them the mask is causal. megatron-core's local
    attention takes an arbitrary mask (``AttnMaskType.arbitrary``) but replaces it by its own
    sliding-window mask on window layers (``FusedScaleMaskSoftmax.forward_torch_softmax``), so
    the window is folded into the mask instead: the model builds both masks, each layer picks its
    own, and no ``window_size`` goes into the megatron config.
"""

from __future__ import annotations

import functools
import json

from ..errors import AdapterError
from ..transforms import REPLICATED
from .base import HFConfig, UnsupportedConfig, rule
from .gemma import Gemma3Text

VISION = "visual."  # megatron-side prefix of the vision tower + projector
# On-disk spellings: (language-model prefix, prefix of vision_tower./multi_modal_projector., what sits
# between ``vision_tower.`` and the SigLIP names). transformers 5.24 writes SAVED (and reads all three).
SAVED = ("language_model.model.", "", "")
PUBLISHED = ("language_model.model.", "", "vision_model.")  # as Google publishes Gemma 3 on the hub
CURRENT = ("model.language_model.", "model.", "")  # transformers 5's module names (a raw state_dict)
TOWER = "vision_tower."


def resolved_configs(raw: dict):
    """transformers' ``Gemma3Config`` for ``raw`` (its defaults filled in, 4.x rope fields turned
    into per-layer-type ``rope_parameters``)."""
    from .qwen_vl import hf_config

    return hf_config(raw)


@functools.lru_cache(maxsize=8)
def _vision_names(raw_json: str) -> tuple[str, ...]:
    import torch

    from .gemma3_vl_model import build_vision

    with torch.device("meta"):
        return tuple(build_vision(json.loads(raw_json)).state_dict())


class Gemma3VL(Gemma3Text):
    model_types = ("gemma3",)
    name = "gemma3"
    multimodal = True
    first_stage_prefixes = ("embedding.", VISION)
    spelling = SAVED

    def __init__(self, raw_config: dict):
        self.full_config = dict(raw_config)
        if not isinstance(raw_config.get("vision_config"), dict):
            raise UnsupportedConfig("gemma3: config.json has no vision_config (a text-only Gemma 3 is "
                                    "model_type 'gemma3_text')")
        text = resolved_configs(raw_config).text_config.to_dict()
        # tying is the outer config's (Gemma3Config defaults to tied, as every published Gemma 3 is)
        text["tie_word_embeddings"] = bool(raw_config.get("tie_word_embeddings", True))
        self.cfg = HFConfig(text)
        self.spelling = SAVED

    spellings = (SAVED, PUBLISHED, CURRENT)

    def spelling_markers(self, spelling) -> list[str]:  # the tower's prefix tells SAVED and PUBLISHED apart
        lm, outer, inner = spelling
        return [f"{lm}embed_tokens.weight", f"{outer}{TOWER}{inner}post_layernorm.weight"]

    @property
    def hf_prefix(self) -> str:
        return self.spelling[0]

    # -- config ------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        raw = self.full_config
        return int(raw.get("image_token_index", raw.get("image_token_id", 262144)))

    @property
    def tokens_per_image(self) -> int:
        return int(self.full_config.get("mm_tokens_per_image", 256))

    def check_vision(self) -> None:
        """transformers' projector pools the ``p x p`` patches with kernel ``p // side`` (side =
        int(sqrt(mm_tokens_per_image))); where that does not give ``mm_tokens_per_image`` tokens,
        its own image/token count check fails on every image: refused here, before conversion."""
        v = resolved_configs(self.full_config).vision_config
        patches = v.image_size // v.patch_size
        side = int(self.tokens_per_image ** 0.5)
        pooled = (patches // (patches // side)) ** 2 if 0 < side <= patches else 0
        if pooled != self.tokens_per_image:
            raise UnsupportedConfig(f"mm_tokens_per_image={self.tokens_per_image}: the projector pools the "
                                    f"{patches} x {patches} patches of an image into {pooled} tokens (a square whose "
                                    f"side divides {patches} is needed)")

    def model_settings(self) -> dict:
        self.check_vision()
        s = super().model_settings()
        # the window goes into the attention masks (see the module docstring), not into megatron's config
        windows = self.layer_windows()
        s["config"].pop("window_size", None)
        s["config"].pop("window_attn_skip_freq", None)
        sizes = {w for w in windows if w is not None}
        s["model"].update(sliding_window=sizes.pop() if sizes else None,
                          sliding_layers=tuple(i for i, w in enumerate(windows) if w is not None),
                          image_token_id=self.image_token_id, tokens_per_image=self.tokens_per_image,
                          bidirectional_images=True, hf_config=self.full_config)
        return s

    def layer_spec(self, config, vp_stage, pp_rank):
        from .gemma_modules import layer_block_spec

        return layer_block_spec(config, vp_stage, pp_rank, arbitrary_mask=True)

    def megatron_model_class(self):
        from .gemma3_vl_model import Gemma3VLGPT

        return Gemma3VLGPT

    def check_lora(self) -> None:
        raise AdapterError(f"LoRA on vision-language models ({self.name}) is not supported yet: PEFT names their "
                           f"modules under model.language_model / model.vision_tower, which the adapter tables do "
                           f"not map; merge the adapter with PEFT first")

    # -- weights -----------------------------------------------------------------------------
    def vision_names(self) -> tuple[str, ...]:
        return _vision_names(json.dumps(self.full_config, sort_keys=True))

    def rules(self):
        _, outer, inner = self.spelling

        def on_disk(n: str) -> str:
            return outer + (TOWER + inner + n[len(TOWER):] if n.startswith(TOWER) else n)

        return super().rules() + [rule(VISION + n, on_disk(n), REPLICATED) for n in self.vision_names()]
