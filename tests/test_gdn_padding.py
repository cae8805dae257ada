"""Padding and the gated delta-net (Qwen3-Next, Qwen3.5): what each side does with ``attention_mask``.

transformers' Qwen3-Next / Qwen3.5 delta-net layers multiply their input by the 2-D padding mask
(``apply_mask_to_padding_states``, the mask from ``create_recurrent_attention_mask``) before the
projections: a padded position enters the causal conv and the recurrent state as zeros (q = k = v
= 0 leaves the state at 0), so a left-padded sequence's real tokens come out as the unpadded
sequence's. megatron-core's ``GatedDeltaNet`` ignores ``attention_mask`` (0.16.1: "TODO: Deal with
attention_mask"; 0.19.2: the argument is unused; only packed sequences (THD ``cu_seqlens``) separate
samples there, and 0.16.1 refuses those): the padding tokens' embeddings reach the conv and the
recurrent state of every later real token. So for a left-padded batch the two differ on the real
tokens; right padding (after the real tokens) is harmless to both (causal). Shown here on the real
models (transformers', and megatron's through the bridge on CPU).

verify feeds each sample alone, unpadded, with no attention mask on either side (``verify.forward``):
padding never reaches a hybrid's delta-net there. The last test pins that verify's megatron forward
treats a padded sequence exactly as transformers does without a mask (padding as ordinary tokens)."""

from __future__ import annotations

import pytest
import torch

from tests import padding_cases

MODEL = "qwen3_next"  # layers: delta-net, attention, delta-net, attention
REAL, PAD = 24, 8


def _batches(vocab: int) -> dict:
    ids = torch.randint(5, vocab, (1, REAL), generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(1, PAD, dtype=torch.long)  # token 0 as padding
    real = torch.ones(1, REAL, dtype=torch.bool)
    left_real = torch.cat([~real[:, :PAD], real], 1)
    return {"plain": (ids, real), "left": (torch.cat([pad, ids], 1), left_real),
            "right": (torch.cat([ids, pad], 1), left_real.flip(1)), "left_no_mask": (torch.cat([pad, ids], 1), None)}


def _hf(model, batches: dict) -> dict:
    out, seen = {}, []
    hook = model.model.layers[0].linear_attn.register_forward_hook(lambda _m, _i, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            for name, (ids, real) in batches.items():
                seen.clear()
                kw = {} if real is None else {"attention_mask": real.long()}
                out[name] = {"logits": model(input_ids=ids, use_cache=False, **kw).logits.float(), "mixer0": seen[0]}
    finally:
        hook.remove()
    return out


def _diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def both(pools, zoo_model):
    from verify.forward import hf_model

    src = zoo_model(MODEL)
    hf = hf_model(src)
    batches = _batches(hf.config.vocab_size)
    (mg,) = pools.get(1).run(padding_cases.padded_logits, source=str(src), batches=batches)
    return _hf(hf, batches), mg


@pytest.mark.world(1)
def test_transformers_zeroes_left_padding_before_the_delta_net(both):
    hf, _ = both
    plain = hf["plain"]
    for key in ("mixer0", "logits"):  # layer 0's delta-net output, then the logits: the real tokens as unpadded
        assert _diff(hf["left"][key][:, PAD:], plain[key]) < 1e-4, key  # measured 5.8e-6 (logits)
        assert _diff(hf["right"][key][:, :REAL], plain[key]) < 1e-4, key
    # negative control: the same left-padded batch without its mask -- the padding then counts (measured 1.3)
    assert _diff(hf["left_no_mask"]["logits"][:, PAD:], plain["logits"]) > 0.1


@pytest.mark.world(1)
def test_megatron_delta_net_ignores_the_padding_mask(both):
    hf, mg = both
    assert _diff(mg["plain"]["logits"], hf["plain"]["logits"]) < 1e-4  # the same model, unpadded
    # left padding with its mask: layer 0 (a delta-net, its input the embeddings) already differs on
    # the real tokens, and so do the logits (measured 1.1), from megatron's own unpadded run and from HF's
    assert _diff(mg["left"]["mixer0"][:, PAD:], mg["plain"]["mixer0"]) > 1e-2
    assert _diff(mg["left"]["logits"][:, PAD:], mg["plain"]["logits"]) > 0.1
    assert _diff(mg["left"]["logits"][:, PAD:], hf["left"]["logits"][:, PAD:]) > 0.1
    # right padding: causal on both sides, the real tokens agree
    assert _diff(mg["right"]["logits"][:, :REAL], mg["plain"]["logits"]) < 1e-4
    assert _diff(mg["right"]["logits"][:, :REAL], hf["right"]["logits"][:, :REAL]) < 1e-4


@pytest.mark.world(1)
def test_verify_forward_treats_padding_as_tokens_on_both_sides(both):
    """verify's megatron forward (no mask) on a left-padded sequence equals transformers' forward
    without a mask at every position: both sides see the same tokens, so verification compares like
    with like whatever tokens a sample holds."""
    hf, mg = both
    assert _diff(mg["left_no_mask"]["logits"], hf["left_no_mask"]["logits"]) < 1e-4
    assert _diff(mg["left_no_mask"]["mixer0"], hf["left_no_mask"]["mixer0"]) < 1e-4


def test_qwen3_5_delta_net_zeroes_padding_too():
    """Qwen3.5's transformers delta-net (``Qwen3_5GatedDeltaNet``, the same megatron module on the
    other side) masks its input the same way: left-padded with its 2-D mask, the real positions come
    out as the unpadded sequence's; without the mask they do not."""
    from transformers import AutoConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    from mcore_bridge.zoo import ZOO

    cfg = AutoConfig.for_model(**ZOO["qwen3_5"]).text_config
    torch.manual_seed(0)
    net = Qwen3_5GatedDeltaNet(cfg, 0).eval()
    x = torch.randn(1, REAL, cfg.hidden_size)
    padded = torch.cat([torch.randn(1, PAD, cfg.hidden_size), x], 1)  # whatever the padding's hidden states are
    real = torch.cat([torch.zeros(1, PAD), torch.ones(1, REAL)], 1).long()
    with torch.no_grad():
        plain, masked, unmasked = net(x), net(padded, attention_mask=real), net(padded)
    assert _diff(masked[:, PAD:], plain) < 1e-5
    assert _diff(unmasked[:, PAD:], plain) > 1e-2
