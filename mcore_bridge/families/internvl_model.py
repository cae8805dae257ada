"""The megatron-side InternVL model: megatron-core's ``GPTModel`` (plain RoPE) with transformers'
InternViT tower and projector (``internvl.InternVLVision``) on the first pipeline stage.

The vision side is kept whole and replicated across tensor-parallel ranks; its features replace
the token embeddings at image-token positions, in order, as transformers' ``masked_scatter`` does.
Under sequence parallelism the embedding is built for the whole sequence and scattered afterwards.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from ..errors import UsageError
from .internvl import InternVLVision, TileSettings


class TiledVisionGPT(GPTModel):
    """``GPTModel`` + ``visual`` (first stage). ``forward`` takes the GPT arguments plus
    ``pixel_values [tiles, 3, size, size]`` as transformers' InternVL processor produces them."""

    def __init__(self, config, transformer_layer_spec, *, vision: TileSettings, hf_config: dict, **kwargs):
        super().__init__(config, transformer_layer_spec, scatter_embedding_sequence_parallel=False, **kwargs)
        self.vision = vision
        if self.pre_process:
            self.visual = InternVLVision(hf_config).to(config.params_dtype)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, *args, pixel_values=None,
                **kwargs):
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, pixel_values)
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, *args, **kwargs)

    def embed(self, input_ids, pixel_values=None):
        """``decoder_input [S, B, H]``, sequence-scattered under sequence parallelism."""
        from megatron.core import tensor_parallel

        emb = self.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)  # [B, S, H], whole
        mask = input_ids == self.vision.image_token_id
        if pixel_values is None:
            if mask.any():
                raise UsageError(f"input_ids hold {int(mask.sum())} image tokens but no pixel_values were given")
        else:
            feats = self.visual(pixel_values.to(emb.device))  # [tiles, tokens_per_tile, H]
            feats = feats.reshape(-1, feats.shape[-1])
            if int(mask.sum()) != feats.shape[0]:
                raise UsageError(f"image tokens ({int(mask.sum())}) and image features ({feats.shape[0]}: "
                                 f"{self.vision.tokens_per_tile} per tile) do not match: the inputs were built "
                                 f"for another vision config")
            emb = emb.masked_scatter(mask[..., None].expand_as(emb), feats.to(emb.dtype))
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb
