"""The megatron-side Gemma 3 vision-language model: ``Gemma3GPT`` (the text model's subclass) with
transformers' SigLIP tower + multimodal projector on the first pipeline stage, and the attention
masks transformers builds for Gemma 3 (see ``gemma3_vl.py``).

Masks are ``[B, 2, S, S]`` booleans (True: masked), channel 0 for full-attention layers, channel 1
for sliding ones; every attention picks its channel (``GemmaSelfAttention.mask_channel``). Being a
forward argument, the mask also survives activation recomputation and reaches every pipeline stage
(each builds it from the ``input_ids`` and ``token_type_ids`` it is given).
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from .gemma_modules import Gemma3GPT


class Gemma3Vision(torch.nn.Module):
    """transformers' vision tower and ``Gemma3MultiModalProjector``, under their HF names."""

    def __init__(self, raw: dict):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        from .qwen_vl import hf_config

        cfg = hf_config(raw)
        self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, tokens_per_image, hidden]``, as ``Gemma3Model.get_image_features``."""
        hidden = self.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return self.multi_modal_projector(hidden)


def build_vision(raw: dict) -> Gemma3Vision:
    """Parameters left uninitialised (the checkpoint fills them)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        return Gemma3Vision(raw)


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """``[B, S]``: the index of the image a token belongs to (consecutive image tokens form one),
    -1 for text tokens."""
    is_image = token_type_ids == 1
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    group = torch.cumsum((is_image & ~previous).int(), dim=1) - 1
    return torch.where(is_image, group, torch.full_like(group, -1))


def attention_masks(batch: int, seq: int, window: int | None, token_type_ids=None, device=None) -> torch.Tensor:
    """``[B, 2, S, S]``, True where a query (row) may NOT see a key (column): channel 0 causal OR
    same image, channel 1 the same AND within the window (key > query - window)."""
    q = torch.arange(seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None, :]
    allowed = (k <= q)[None].expand(batch, seq, seq)
    if token_type_ids is not None:
        blocks = image_blocks(token_type_ids.to(device))
        same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        allowed = allowed | same
    sliding = allowed & (k > q - window)[None] if window is not None else allowed
    return torch.stack([~allowed, ~sliding], dim=1)


class Gemma3VLGPT(Gemma3GPT):
    """``Gemma3GPT`` + ``visual`` (first stage). ``forward`` takes the GPT arguments plus
    ``pixel_values [images, 3, H, W]`` and ``token_type_ids [B, S]`` as transformers' processor
    produces them; ``attention_mask`` (if given, True = masked) is combined with the model's."""

    def __init__(self, config, transformer_layer_spec, *args, sliding_window, sliding_layers: tuple,
                 image_token_id: int, tokens_per_image: int, hf_config: dict, bidirectional_images: bool = True,
                 **kwargs):
        super().__init__(config, transformer_layer_spec, *args, scatter_embedding_sequence_parallel=False, **kwargs)
        self.sliding_window = sliding_window
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.bidirectional_images = bidirectional_images  # False: causal over images (a negative control)
        for layer in self.decoder.layers:
            layer.self_attention.mask_channel = 1 if layer.layer_number - 1 in sliding_layers else 0
        if self.pre_process:
            self.visual = build_vision(hf_config).to(config.params_dtype)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, *args,
                pixel_values=None, token_type_ids=None, **kwargs):
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, pixel_values)
        masks = attention_masks(input_ids.shape[0], input_ids.shape[1], self.sliding_window,
                                token_type_ids if self.bidirectional_images else None, input_ids.device)
        if attention_mask is not None:
            masks = masks | attention_mask.to(torch.bool)
        return super().forward(input_ids, position_ids, masks, decoder_input, *args, **kwargs)

    def embed(self, input_ids, pixel_values=None):
        """``decoder_input [S, B, H]`` (sequence-scattered under sequence parallelism)."""
        from megatron.core import tensor_parallel

        mask = input_ids == self.image_token_id
        ids = input_ids
        if self.image_token_id >= self.vocab_size:  # transformers embeds an out-of-vocabulary image token as 0
            ids = input_ids.masked_fill(mask, 0)
        emb = self.embedding(input_ids=ids, position_ids=None).transpose(0, 1)  # [B, S, H], scaled
        if pixel_values is None:
            if mask.any():
                raise UsageError(f"input_ids hold {int(mask.sum())} image tokens but no pixel_values were given")
        else:
            dtype = self.visual.multi_modal_projector.mm_input_projection_weight.dtype
            feats = self.visual(pixel_values.to(emb.device, dtype))
            if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
                raise UsageError(f"image tokens ({int(mask.sum())}) and image features ({feats.shape[0]} images x "
                                 f"{feats.shape[1]}) do not match: the inputs were built for another config")
            emb = emb.masked_scatter(mask[..., None].expand_as(emb), feats.to(emb.dtype))  # unscaled, as in HF
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb
