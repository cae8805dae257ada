"""The megatron-side vision-language model: megatron-core's ``GPTModel`` with multimodal RoPE, and
the real transformers vision tower on the first pipeline stage.

The vision tower (with its merger) is kept whole and replicated across tensor-parallel ranks; its
output replaces the token embeddings at image/video positions, exactly as transformers'
``masked_scatter`` does. Qwen3-VL's deepstack features (taken from intermediate vision blocks) are
added to the outputs of the first language layers at the same positions, passed to them through
the transformer block as a forward argument so that activation recomputation replays them
(``vl_train``); those layers must sit on the first pipeline stage, next to the vision tower.
Packed sequences (THD ``packed_seq_params``) keep each sample's own mRoPE positions. Under
sequence parallelism the embedding is built for the whole sequence and scattered afterwards, so
vision features land where they belong.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import (MultimodalRotaryEmbedding,
                                                                         get_pos_emb_on_this_cp_rank)
from megatron.core.models.gpt import GPTModel

from ..errors import UsageError
from .qwen_vl import VisionSettings, build_vision
from .vl_train import enable_packed_attention, make_deepstack_layer


class InterleavedMRoPE(MultimodalRotaryEmbedding):
    """Qwen3-VL's multimodal RoPE: frequencies interleave t/h/w (``thwthw...ttt``) instead of
    megatron's contiguous t|h|w sections. Frequency j uses h when ``j % 3 == 1 and j < 3*s_h``, w
    when ``j % 3 == 2 and j < 3*s_w``, t otherwise; both rotate halves use the same frequencies."""

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int], cp_group=None) -> torch.Tensor:
        seq = position_ids.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq / self.seq_len_interpolation_factor
        freqs = seq[..., None].float() * self.inv_freq  # [3, B, S, dim/2]
        picked = freqs[0].clone()
        for axis in (1, 2):
            idx = slice(axis, 3 * mrope_section[axis], 3)
            picked[..., idx] = freqs[axis][..., idx]
        emb = torch.cat((picked, picked), dim=-1)  # [B, S, dim]
        emb = emb[..., None, :].transpose(0, 1).contiguous()  # [S, B, 1, dim]
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb


class VisionLanguageGPT(GPTModel):
    """``GPTModel`` + ``visual`` (first stage). ``forward`` takes the GPT arguments plus
    ``pixel_values``/``image_grid_thw`` and ``pixel_values_videos``/``video_grid_thw`` as
    transformers' processors produce them; position ids are the 3-D mRoPE ids ``[3, B, S]``."""

    def __init__(self, config, transformer_layer_spec, *, vision: VisionSettings, hf_config: dict, **kwargs):
        super().__init__(config, transformer_layer_spec, scatter_embedding_sequence_parallel=False, **kwargs)
        if getattr(self, "embedding", None) is not None:
            # built without megatron's reduce-scatter (``embed`` merges the vision features into the
            # whole sequence, then scatters), but scattering by default: the MTP block embeds the
            # shifted tokens with it and adds them to sequence-scattered hidden states
            self.embedding.scatter_to_sequence_parallel = True
        self.embeds_whole_sequence = True  # (verify's probes: the embedding output is not sharded)
        self.vision = vision
        if vision.mrope_interleaved:
            # same module and state, another frequency selection (see InterleavedMRoPE)
            self.rotary_pos_emb.__class__ = InterleavedMRoPE
        # THD packed sequences through megatron's local attention, which asserts on them (see vl_train)
        enable_packed_attention(self.decoder)
        if not self.pre_process:
            return
        # deepstack layers sit on this (first) stage: ``Family.check_layout`` refused other layouts
        self.visual = build_vision(vision.model_type, vision.vision_class, hf_config).to(config.params_dtype)
        for k in range(vision.deepstack_layers):
            # the features reach these layers as a forward argument (the block's ``context``), so
            # activation recomputation replays them too (see vl_train)
            make_deepstack_layer(self.decoder.layers[k], k)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, *args,
                pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, **kwargs):
        """``packed_seq_params`` (THD): ``input_ids [1, T]`` holding several samples, their
        ``position_ids [3, 1, T]`` each sample's own (``vl_train.pack``), vision inputs in order."""
        if self.pre_process and decoder_input is None:
            decoder_input, deepstack = self.embed(input_ids, pixel_values, image_grid_thw,
                                                  pixel_values_videos, video_grid_thw)
            if deepstack is not None:
                block_kwargs = dict(kwargs.get("extra_block_kwargs") or {})
                if block_kwargs.get("context") is not None:
                    raise UsageError("extra_block_kwargs['context'] is taken by the deepstack features")
                block_kwargs["context"] = torch.stack(deepstack)
                kwargs["extra_block_kwargs"] = block_kwargs
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, *args, **kwargs)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None):
        """``(decoder_input [S, B, H], deepstack additions or None)``, both sequence-scattered
        under sequence parallelism."""
        from megatron.core import tensor_parallel

        self.embedding.scatter_to_sequence_parallel = False  # the whole sequence, scattered below
        try:
            emb = self.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)  # [B, S, H]
        finally:
            self.embedding.scatter_to_sequence_parallel = True
        deepstack = [torch.zeros_like(emb) for _ in range(self.vision.deepstack_layers)] or None
        for kind, pixels, grid, token in (("image", pixel_values, image_grid_thw, self.vision.image_token_id),
                                          ("video", pixel_values_videos, video_grid_thw, self.vision.video_token_id)):
            mask = input_ids == token
            if pixels is None:
                if mask.any():
                    raise UsageError(f"input_ids hold {int(mask.sum())} {kind} tokens but no {kind} pixels were given")
                continue
            out = self.visual(pixels.to(emb.device, self.visual.dtype), grid_thw=grid.to(emb.device),
                              return_dict=True)
            feats = out.pooler_output
            if int(mask.sum()) != feats.shape[0]:
                raise UsageError(f"{kind} tokens ({int(mask.sum())}) and {kind} features ({feats.shape[0]}) "
                                 f"do not match: the inputs were built for another vision config")
            where = mask[..., None].expand_as(emb)
            emb = emb.masked_scatter(where, feats.to(emb.dtype))
            for k, feat in enumerate(getattr(out, "deepstack_features", None) or []):
                if deepstack is not None:
                    deepstack[k] = deepstack[k].masked_scatter(where, feat.to(emb.dtype))
        emb = emb.transpose(0, 1).contiguous()
        if deepstack is not None:
            deepstack = [d.transpose(0, 1).contiguous() for d in deepstack]
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
            if deepstack is not None:
                deepstack = [tensor_parallel.scatter_to_sequence_parallel_region(d) for d in deepstack]
        return emb, deepstack


def mrope_position_ids(family, input_ids, image_grid_thw=None, video_grid_thw=None) -> torch.Tensor:
    """3-D position ids ``[3, B, S]`` for ``input_ids [B, S]``, computed by transformers' own
    ``get_rope_index`` of the model (built on the meta device; only its config is used)."""
    import importlib

    from .qwen_vl import hf_config

    inner = family.rope_model
    if inner is None:  # built once per family object, kept in its explicit attribute
        module, cls = family.model_class.rsplit(".", 1)
        cls = getattr(importlib.import_module(f"transformers.models.{module}"), cls)
        with torch.device("meta"):
            inner = family.rope_model = cls._from_config(hf_config(family.full_config))
    vision = family.vision_settings()
    mm_types = torch.zeros_like(input_ids, dtype=torch.int32)
    mm_types[input_ids == vision.image_token_id] = 1
    mm_types[input_ids == vision.video_token_id] = 2
    position_ids, _ = inner.get_rope_index(input_ids, mm_types, image_grid_thw=image_grid_thw,
                                           video_grid_thw=video_grid_thw,
                                           attention_mask=torch.ones_like(input_ids))
    return position_ids
