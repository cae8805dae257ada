"""Padded batches through a megatron hybrid model, run inside ``verify.pool.Pool`` ranks (used by
tests/test_gdn_padding.py). One rank, no pipeline: the model's own forward is called directly with
a padding-aware attention mask, as a training loop that pads its batches would call it."""

from __future__ import annotations

import torch


def mask(real: torch.Tensor) -> torch.Tensor:
    """megatron's ``attention_mask`` ``[B, 1, S, S]`` (True: masked) for ``real [B, S]`` (True: a
    real token): causal, and no query attends to a padding key; a padding query, which would see no
    key at all, attends to itself (no row left empty)."""
    s = real.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & real[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool)[None] & ~real[:, :, None]
    return ~allowed[:, None]


def padded_logits(source: str, batches: dict) -> dict:
    """Per batch ``{name: (input_ids [B, S], real [B, S] or None)}``: ``{"logits": [B, S, vocab],
    "mixer0": [B, S, H]}`` -- the output of layer 0's token mixer (a delta-net layer) included.
    With ``real``, the forward gets ``mask(real)``; without, it runs through verify's own megatron
    forward (``verify.forward.megatron_logits``: no mask, one sample per micro-batch)."""
    from tests.cases import _loaded
    from verify.forward import megatron_logits

    bridge, models = _loaded(source, {})
    vocab = int(bridge.family.cfg.require("vocab_size"))
    (model,) = models
    seen = []
    hook = model.decoder.layers[0].self_attention.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0].transpose(0, 1).detach().clone()))
    out = {}
    try:
        with torch.no_grad():
            for name, (ids, real) in batches.items():
                seen.clear()
                if real is None:
                    logits = megatron_logits(models, ids, vocab)
                else:
                    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
                    logits = model(ids, pos, mask(real))[..., :vocab].float()
                out[name] = {"logits": logits, "mixer0": torch.cat(seen)}
    finally:
        hook.remove()
    return out
