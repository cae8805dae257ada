"""Training pieces of the vision-language model (``vl_model.VisionLanguageGPT``): deepstack
features passed through the transformer block, and packed (THD) sequences.

Deepstack through the block. Qwen3-VL adds vision features to the outputs of the first language
layers. They travel as the block's ``context`` argument, stacked ``[k, S, B, H]``: megatron's
``TransformerBlock`` hands ``context`` to every layer and gets it back from each (``hidden, context
= layer(...)``), and its activation checkpointing (full recompute, uniform or block) passes it as an
*input* of every checkpointed chunk -- so a recomputed layer adds exactly the features of the
forward it replays. A decoder-only GPT layer has no cross-attention (``IdentityOp``), so the slot
carries nothing else; ``DeepstackLayer`` keeps ``context`` away from the layer's own forward and
adds its slice to the layer's output.

Packed sequences. megatron-core's local ``DotProductAttention`` (the core attention of the local
spec the bridge builds with, on CPU and GPU) asserts ``packed_seq_params is None`` (0.16.1 and
0.19.2 measured). ``PackedLocalAttention`` is a scoped adaptation, installed on this model's own
attention modules only (no global patch): a THD call ([T, heads, dim] with ``cu_seqlens``) runs as
one batch row with a block-diagonal causal mask, which is what THD attention computes (dense
[T, T] scores: memory grows with the square of the packed length; a fused THD kernel needs
TransformerEngine's attention). Everything
around it is megatron's own THD path: the RoPE of each packed sample is applied by
``apply_rotary_pos_emb`` with ``cu_seqlens`` over the whole packed frequency table, so each sample
keeps the 3-D mRoPE positions transformers' ``get_rope_index`` gave it. An attention module that is
not the local one (TransformerEngine's, which takes THD natively) is left alone.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.enums import AttnMaskType

from ..errors import UsageError


# ---- deepstack -----------------------------------------------------------------------------------
class DeepstackLayer:
    """Mixin for the first ``k`` language layers: ``context`` is the stacked deepstack additions
    ``[k, S, B, H]`` (or None); layer ``deepstack_index`` adds its slice to its output. The layer's
    own output passes ``before_deepstack`` (an identity, no weights) first: a probe there sees what
    transformers' decoder layer returns (its deepstack addition follows the layer too)."""

    deepstack_index = 0

    def forward(self, *args, context=None, **kwargs):
        hidden, _ = super().forward(*args, context=None, **kwargs)
        hidden = self.before_deepstack(hidden)
        if context is not None:
            hidden = hidden + context[self.deepstack_index]
        return hidden, context


_DEEPSTACK_CLASSES: dict = {}


def make_deepstack_layer(layer, index: int) -> None:
    """Turn ``layer`` (a megatron TransformerLayer, any subclass) into a deepstack layer in place."""
    cls = type(layer)
    if cls not in _DEEPSTACK_CLASSES:
        _DEEPSTACK_CLASSES[cls] = type(f"Deepstack{cls.__name__}", (DeepstackLayer, cls), {})
    layer.__class__ = _DEEPSTACK_CLASSES[cls]
    layer.deepstack_index = index
    layer.before_deepstack = torch.nn.Identity()


# ---- packed sequences ------------------------------------------------------------------------------
def _local_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def packed_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """``[1, 1, T, T]`` bool, True where attention is masked: another sample, or the future.
    Tokens past ``cu_seqlens[-1]`` (padding) form one more segment of their own."""
    seg = torch.searchsorted(cu_seqlens[1:].to(device).long(), torch.arange(total, device=device), right=True)
    pos = torch.arange(total, device=device)
    masked = (seg[:, None] != seg[None, :]) | (pos[None, :] > pos[:, None])
    return masked[None, None]


class PackedLocalAttention:
    """Mixin over megatron's local ``DotProductAttention`` that accepts THD ``packed_seq_params``
    (see the module docstring). Unpacked calls are megatron's own, with the causal mask built on
    the CPU when the model runs there: megatron's ``get_default_causal_mask`` hard-codes
    ``device="cuda"``, which ``runtime.compat``'s CUDA-to-CPU mode redirects during a forward but
    not inside ``backward`` (torch disables a ``TorchFunctionMode`` while it handles a call, and
    ``torch.autograd.backward`` is one), where activation recomputation replays the attention."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            causal = (attn_mask_type if attn_mask_type is not None else self.attn_mask_type) == AttnMaskType.causal
            if attention_mask is None and causal and query.device.type == "cpu":
                # the mask megatron's softmax would build with device="cuda" (transformer/utils.py);
                # compat's CUDA-to-CPU redirection is off inside backward, where recomputation runs
                attention_mask = torch.triu(torch.ones(query.shape[0], key.shape[0], dtype=torch.bool), 1)
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise UsageError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}: the packed path "
                             f"of the local attention takes 'thd' only")
        cu_q = _cu(packed_seq_params, "q")
        cu_kv = _cu(packed_seq_params, "kv")
        if not torch.equal(cu_q.cpu(), cu_kv.cpu()):
            raise UsageError("packed_seq_params: cu_seqlens_q and cu_seqlens_kv differ; self-attention packs "
                             "queries and keys alike")
        mask = packed_mask(cu_q, query.shape[0], query.device)
        out = super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask,
                              attn_mask_type=attn_mask_type, attention_bias=attention_bias)
        return out  # [T, 1, heads*dim]; megatron's Attention reshapes THD output to this anyway


def _cu(params, which: str) -> torch.Tensor:
    padded = getattr(params, f"cu_seqlens_{which}_padded")
    return padded if padded is not None else getattr(params, f"cu_seqlens_{which}")


_PACKED_CLASSES: dict = {}


def enable_packed_attention(decoder) -> int:
    """Let the local core attention of ``decoder``'s layers take THD packed sequences (class swap on
    these module instances only). Attention that is not megatron's local ``DotProductAttention``
    (TransformerEngine's) is left alone. Returns how many modules were adapted."""
    local = _local_attention_class()
    n = 0
    for layer in decoder.layers:
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if core is None or not isinstance(core, local) or isinstance(core, PackedLocalAttention):
            continue
        cls = type(core)
        if cls not in _PACKED_CLASSES:
            _PACKED_CLASSES[cls] = type(f"Packed{cls.__name__}", (PackedLocalAttention, cls), {})
        core.__class__ = _PACKED_CLASSES[cls]
        n += 1
    return n


@dataclasses.dataclass
class PackedBatch:
    """Several samples in one row: ``input_ids [1, T]``, ``position_ids [3, 1, T]`` (each sample's
    own mRoPE positions), ``labels [T]``, the vision inputs concatenated in sample order, and the
    ``PackedSeqParams`` (THD). ``bounds[i]`` is sample ``i``'s ``(start, end)``; a padding tail (to a
    multiple of ``align``, labels -100) is one more segment."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    vision: dict
    packed_seq_params: object
    bounds: list


def pack(samples, align: int = 1, pad_id: int = 0, bad_offset: tuple[int, int] | None = None) -> PackedBatch:
    """Pack ``samples`` (``verify.inputs.Sample``: input_ids [S], labels [S], position_ids [3, S],
    vision dict) into one THD row; each keeps its own positions. ``bad_offset=(i, k)`` is a negative
    control: a per-sample position offset ``k`` applied to sample ``i`` one token late (an
    off-by-one sample boundary). A constant offset over a whole sample would be invisible: RoPE is
    relative and the sample attends only to itself."""
    from megatron.core.packed_seq_params import PackedSeqParams

    ids, pos, labels, bounds = [], [], [], []
    start = 0
    for s in samples:
        n = s.input_ids.numel()
        ids.append(s.input_ids)
        pos.append(s.position_ids)
        labels.append(s.labels)
        bounds.append((start, start + n))
        start += n
    pad = -start % align
    if pad:
        ids.append(torch.full((pad,), pad_id, dtype=samples[0].input_ids.dtype))
        labels.append(torch.full((pad,), -100, dtype=samples[0].labels.dtype))
        pos.append(torch.arange(pad).expand(3, pad))
    position_ids = torch.cat(pos, dim=1)
    if bad_offset is not None:
        i, k = bad_offset
        lo, hi = bounds[i]
        position_ids = position_ids.clone()
        position_ids[:, lo + 1:hi] += k
    cu = torch.tensor([0] + [b for _, b in bounds] + ([start + pad] if pad else []), dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
    vision = {}
    for key, dim in (("pixel_values", 0), ("image_grid_thw", 0), ("pixel_values_videos", 0), ("video_grid_thw", 0)):
        parts = [s.vision[key] for s in samples if key in s.vision]
        if parts:
            vision[key] = torch.cat(parts, dim=dim)
    return PackedBatch(torch.cat(ids)[None], position_ids[:, None], torch.cat(labels), vision, params, bounds)
