"""Sliding-window attention (issue 19 item 4): HF's ``sliding_window`` against megatron-core's
``window_size`` / ``window_attn_skip_freq``, measured on both sides; Mistral (every layer) and Qwen2
(layers from ``max_window_layers`` on) verified fp32 against transformers at sequence lengths longer
than the window, and an off-by-one window caught at the first sliding layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge.families import UnsupportedConfig, family_for
from mcore_bridge.families.llama import window_settings
from tests import verify_cases

transformers = pytest.importorskip("transformers")
PUBLISHED = Path(__file__).parent / "published"
TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def hf_visible_keys(model_type: str, query: int, **kw) -> list[list[int]]:
    """Per layer: the keys HF's eager attention gives weight to, for one query position."""
    cfg = transformers.AutoConfig.for_model(model_type, **TINY, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        out = model(torch.arange(query + 1)[None], output_attentions=True)
    return [(a[0, 0, query] > 0).nonzero().flatten().tolist() for a in out.attentions]


def megatron_visible_keys(window_size, query: int) -> list[int]:
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    from mcore_bridge.runtime import compat

    with compat.scope("cpu"):  # megatron builds the mask with device="cuda"
        masked = get_sliding_window_causal_mask(query + 1, query + 1, window_size)
    return (~masked[query]).nonzero().flatten().tolist()


@pytest.mark.parametrize("window", [1, 3, 5])
def test_hf_window_counts_the_token_itself_and_megatron_is_one_less(window):
    hf = hf_visible_keys("mistral", 9, sliding_window=window)
    assert hf == [list(range(10 - window, 10))] * 2  # the `window` latest tokens, itself included
    ws = window_settings([window, window])["window_size"]
    assert ws == (window - 1, 0)
    assert megatron_visible_keys(ws, 9) == hf[0]
    assert megatron_visible_keys((window, 0), 9) != hf[0]  # negative control: HF's number as is


def test_qwen2_windows_only_from_max_window_layers_on():
    hf = hf_visible_keys("qwen2", 9, sliding_window=3, use_sliding_window=True, max_window_layers=1)
    assert hf == [list(range(10)), [7, 8, 9]]
    raw = transformers.AutoConfig.for_model("qwen2", **TINY, sliding_window=3, use_sliding_window=True,
                                            max_window_layers=1).to_dict()
    c = family_for(raw).architecture.config
    assert c["window_size"] == (2, 0) and c["window_attn_skip_freq"] == [0, 1]
    # the same from a 4.x-style config without layer_types
    raw.pop("layer_types")
    assert family_for(raw).architecture.config["window_attn_skip_freq"] == [0, 1]


def test_mistral_published_config_maps_its_window():
    raw = json.loads((PUBLISHED / "mistralai__Mistral-7B-v0.1.json").read_text())
    c = family_for(raw).architecture.config
    assert c["window_size"] == (4095, 0) and "window_attn_skip_freq" not in c


def test_llama_has_no_window_in_transformers_and_none_here():
    hf = hf_visible_keys("llama", 9, sliding_window=3)
    assert hf == [list(range(10))] * 2  # transformers' Llama ignores the field
    raw = transformers.AutoConfig.for_model("llama", **TINY, sliding_window=3).to_dict()
    assert raw.get("sliding_window") == 3 and "window_size" not in family_for(raw).architecture.config


def test_window_refusals():
    base = transformers.AutoConfig.for_model("mistral", **TINY, sliding_window=8).to_dict()
    with pytest.raises(UnsupportedConfig, match="chunked_attention"):
        family_for({**base, "layer_types": ["sliding_attention", "chunked_attention"]}).model_settings()
    with pytest.raises(UnsupportedConfig, match="layer_types has 1 entries"):
        family_for({**base, "layer_types": ["sliding_attention"]}).model_settings()
    with pytest.raises(UnsupportedConfig, match="several sizes"):
        window_settings([4, 8])
    assert window_settings([None, None]) == {}


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reference-cache"))


def run(pools, zoo_model, ref_cache, model, layout, **kw) -> dict:
    out = pools.get(layout.model_parallel_size).run(
        verify_cases.verify, timeout=300, source=str(zoo_model(model)), layout=layout.to_dict(),
        reference_cache=ref_cache, **kw)
    return [r for r in out if r is not None][0]


@pytest.mark.parametrize("model,layout", [
    pytest.param("mistral", L(), id="mistral-ws1", marks=pytest.mark.world(1)),
    pytest.param("qwen2", L(tp=2, sp=True), id="qwen2-tp2-sp", marks=pytest.mark.world(2)),
    pytest.param("mistral", L(pp=2), id="mistral-pp2", marks=pytest.mark.world(2)),
    pytest.param("phi3_window", L(tp=2, sp=True), id="phi3-tp2-sp", marks=pytest.mark.world(2)),
])
def test_windowed_models_pass_fp32_past_the_window(model, layout, pools, zoo_model, ref_cache):
    cfg = json.loads((zoo_model(model) / "config.json").read_text())
    assert cfg["sliding_window"] < 32  # the verification sequences (32 and 384 tokens) are longer
    r = run(pools, zoo_model, ref_cache, model, layout)
    assert r["verdict"] == "pass", r["failures"]
    assert r["metrics"]["max_diff"] < 1e-4 and r["metrics"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("model,layout,where", [
    pytest.param("mistral", L(), "layer.0", id="mistral-ws1", marks=pytest.mark.world(1)),
    pytest.param("qwen2", L(pp=2), "layer.2", id="qwen2-pp2", marks=pytest.mark.world(2)),
    pytest.param("phi3_window", L(), "layer.0", id="phi3-ws1", marks=pytest.mark.world(1)),
])
def test_off_by_one_window_is_caught_at_the_first_sliding_layer(model, layout, where, pools, zoo_model, ref_cache):
    r = run(pools, zoo_model, ref_cache, model, layout, control="window:1")
    assert r["verdict"] == "fail"
    assert r["first_diverging"]["probe"] == where
    before = r["layers"][: [p["probe"] for p in r["layers"]].index(where)]
    assert before and all(p["ok"] for p in before)
