"""The built-in zoo: tiny random HF models, one per family, built on the fly with transformers.

``builtin:NAME`` resolves to a directory under ``$MCORE_BRIDGE_CACHE`` (default
``~/.cache/mcore_bridge``), created once per zoo version, deterministically (seeded). The shapes are
chosen to exercise the hard cases: GQA, vocab that needs padding at every TP, head_dim unrelated to
hidden/heads (qwen3), Llama-3 RoPE scaling, tied and untied embeddings, multi-file checkpoints;
for MoE: 8 experts (splittable over ep 1/2/4/8), expert width splittable over etp 2, a dense layer
between sparse ones (qwen2_moe), shared expert with gate, both top-k normalisations.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .ckpt_edit import add_mtp, add_qwen_next_mtp, edit_shards, quantize_fp8_dir  # noqa: F401 (zoo.<name> too)

from .errors import UsageError

ZOO_VERSION = 4  # bump when an existing entry changes (new entries need no bump)

_COMMON = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
               rms_norm_eps=1e-6)

ZOO = {
    "llama": dict(model_type="llama", tie_word_embeddings=False, max_shard_size="300KB",
                  max_position_embeddings=16384,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
    # sliding windows shorter than the verification sequences: every layer (mistral), the layers
    # from max_window_layers on (qwen2)
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=20,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=24,
                  max_window_layers=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mixtral": dict(model_type="mixtral", tie_word_embeddings=False, sliding_window=None,
                    num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2_moe": dict(model_type="qwen2_moe", tie_word_embeddings=False, use_sliding_window=False,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[1],
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3_moe": dict(model_type="qwen3_moe", tie_word_embeddings=False, head_dim=32, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "deepseek_v3": dict(model_type="deepseek_v3", tie_word_embeddings=False, num_key_value_heads=8,
                        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=4,
                        n_group=4, topk_group=2, n_shared_experts=1, moe_intermediate_size=32,
                        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Gemma 3: sliding layers 0, 1, 3 (window 20 < the verification sequences) around a global one
    # with its own RoPE base and linear scaling; softmax scale from query_pre_attn_scalar != head_dim
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=20,
                        hidden_activation="gelu_pytorch_tanh", layer_types=[
                            "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1000000.0}}),
    # fused qkv_proj / gate_up_proj in the checkpoint; partial rotary as Phi-4-mini (0.75)
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, sliding_window=None, partial_rotary_factor=0.75,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}),
    # sandwich norms, q/k/v bias, interleaved partial rotary (0.5), fused gate_up_proj
    "glm4": dict(model_type="glm4", tie_word_embeddings=False, head_dim=16, attention_bias=True,
                 partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # gpt-oss: window 4 (verification sequences are longer), [sliding, full] x 2, yarn as published
    # (truncate false) at original length 32 so positions past it take the scaled frequencies;
    # gate_up scaled so the SwiGLU clamp (limit 7) bites on some tokens; sinks near 2, where a sink
    # takes a good share of a sliding layer's attention (a 1% error in one shows); router biases that
    # change which experts win.
    "gpt_oss": dict(model_type="gpt_oss", tie_word_embeddings=False, head_dim=16, num_local_experts=8,
                    max_position_embeddings=1024,
                    num_experts_per_tok=2, intermediate_size=32, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"] * 2, rms_norm_eps=1e-5,
                    swiglu_limit=7.0, qk_sharpen=True, scale={"experts.gate_up_proj": 25.0},
                    init={"sinks": (2.0, 0.5), "mlp.router.bias": (0.0, 2.0)},
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                     "original_max_position_embeddings": 32}),
    # V2-Lite's shape (no q_lora, yarn) with V2's group-limited softmax routing (top-2 of 2 groups)
    "deepseek_v2": dict(model_type="deepseek_v2", tie_word_embeddings=False, num_key_value_heads=8,
                        max_position_embeddings=2560,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=2,
                        moe_intermediate_size=32, routed_scaling_factor=2.0, norm_topk_prob=False,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                         "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # partial rotary over head_dim 16 (8 dims rotate), q/k/v bias, q/k norm, sigmoid group routing
    "glm4_moe": dict(model_type="glm4_moe", tie_word_embeddings=False, head_dim=16, attention_bias=True,
                     use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=4,
                     n_group=4, topk_group=2, n_shared_experts=1, moe_intermediate_size=32,
                     routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # q/k norms over the full projection width (GQA: k over 4 x 8), softmax top-2 not renormalised
    "olmoe": dict(model_type="olmoe", tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                  intermediate_size=32, norm_topk_prob=False, clip_qkv=None, eos_token_id=2, pad_token_id=1,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
# Qwen3-Next: delta-net layers 0, 2 and gated full attention 1, 3 (full_attention_interval 2), layer
# 2 dense (mlp_only_layers), the others MoE with a gated shared expert; 2 key / 4 value linear heads
# (split by tp 2); partial rotary 8 of 32 dims. Its q/k norms are sharpened (``build``).
ZOO["qwen3_next"] = dict(model_type="qwen3_next", tie_word_embeddings=False, head_dim=32, num_key_value_heads=2,
                         full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                         linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[2],
                         decoder_sparse_step=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})

# Text models whose attention is sharpened at build time (q/k scaled by QK_SHARPEN): positions then
# matter well above fp32 noise, so a wrong rotary split or swapped q/k rows shows in verification.
SHARPEN_QK = ("phi3", "phi3_window", "glm4")
# DeepSeek-V3 stored as DeepSeek publishes it: blockwise FP8 linear weights with float32
# ``weight_scale_inv`` (blocks of 32 x 48, so many tensors end in partial blocks and TP shards
# start mid-block); norms, embeddings, lm_head and the router stay unquantised.
ZOO["deepseek_v3_fp8"] = dict(ZOO["deepseek_v3"], fp8_block=[32, 48])

# Multi-token prediction: DeepSeek-V3 with its MTP layer stored as layer 4 (``add_mtp``)
ZOO["deepseek_v3_mtp"] = dict(ZOO["deepseek_v3"], num_nextn_predict_layers=1)
ZOO["glm4_moe_mtp"] = dict(ZOO["glm4_moe"], num_nextn_predict_layers=1)
# ...and in FP8 as DeepSeek-V3 publishes it (the MTP projection and its head/embedding copies bf16)
ZOO["deepseek_v3_mtp_fp8"] = dict(ZOO["deepseek_v3_mtp"], fp8_block=[32, 48])
# Qwen3-Next with one MTP layer stored as Qwen3-Next publishes it (mtp.*, ``add_qwen_next_mtp``)
ZOO["qwen3_next_mtp"] = dict(ZOO["qwen3_next"], qwen3_next_mtp=1)
# Phi-3 with Phi-3-mini-4k's kind of window (every layer), shorter than the verification sequences
ZOO["phi3_window"] = dict(ZOO["phi3"], sliding_window=20)

# Vision-language: text and vision towers small, 4 language layers (pp 2 keeps the deepstack
# layers on the first stage), 3 vision blocks; image/video ids inside the vocabulary; MoE experts
# of width 48 so neither 2F nor F equals the hidden size (a transposed stack would be ambiguous).
_VL_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, pad_token_id=2)
_VL_IDS = dict(image_token_id=996, video_token_id=997, vision_start_token_id=998, vision_end_token_id=999)
_VIT = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
_Q3_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [6, 5, 5],
            "mrope_interleaved": True}
ZOO.update({
    "qwen2_vl": dict(model_type="qwen2_vl", tie_word_embeddings=False, **_VL_IDS,
                     text_config=dict(_VL_TEXT, use_sliding_window=False, rope_parameters={
                         "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
                     vision_config=dict(depth=3, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=64,
                                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2)),
    "qwen2_5_vl": dict(model_type="qwen2_5_vl", tie_word_embeddings=True, **_VL_IDS,
                       text_config=dict(_VL_TEXT, use_sliding_window=False, rope_parameters={
                           "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
                       vision_config=dict(_VIT, patch_size=14, window_size=56, fullatt_block_indexes=[2],
                                          tokens_per_second=2)),
    "qwen3_vl": dict(model_type="qwen3_vl", tie_word_embeddings=False, **_VL_IDS,
                     text_config=dict(_VL_TEXT, head_dim=32, rope_parameters=_Q3_ROPE),
                     vision_config=dict(_VIT, patch_size=16, num_position_embeddings=64,
                                        deepstack_visual_indexes=[1, 2])),
    "qwen3_vl_moe": dict(model_type="qwen3_vl_moe", tie_word_embeddings=False, **_VL_IDS,
                         text_config=dict(_VL_TEXT, head_dim=32, rope_parameters=_Q3_ROPE, num_experts=8,
                                          num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[0]),
                         vision_config=dict(_VIT, patch_size=16, num_position_embeddings=64,
                                            deepstack_visual_indexes=[1, 2])),
})

# InternVL (InternViT + pixel shuffle + projector + a Qwen3 LM): 64 x 64 tiles of 8 x 8 patches,
# pixel-shuffled to 16 tokens per tile; q/k norms and qkv bias in the vision tower; its final norm
# kept (use_mean_pooling off); tied embeddings (the outer config decides); dynamic-NTK RoPE as
# InternVL3's configs declare it (the default frequencies below max_position_embeddings).
ZOO["internvl"] = dict(
    model_type="internvl", tie_word_embeddings=True, image_token_id=999, image_seq_length=16, downsample_ratio=0.5,
    text_config=dict(_VL_TEXT, model_type="qwen3", head_dim=32, use_sliding_window=False,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}),
    vision_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       image_size=64, patch_size=8, use_qk_norm=True, attention_bias=True, use_mean_pooling=False,
                       norm_type="layer_norm"),
    # transformers zeroes the CLS token and position embeddings and sets every layer scale to 0.1:
    # random values, so that a misplaced one shows, and layer scales near 1, so that each vision
    # block moves the features well above fp32 noise
    init={"embeddings.cls_token": (0.0, 0.5), "embeddings.position_embeddings": (0.0, 0.5),
          "lambda_1": (1.0, 0.2), "lambda_2": (1.0, 0.2)})

# InternVL3's shape (a Qwen2 language model with q/k/v bias; InternViT-300M's choices: no q/k norm,
# mean pooling, so no final vision norm) and InternVL3.5-MoE's (a Qwen3-MoE language model, untied)
ZOO["internvl_qwen2"] = dict(
    ZOO["internvl"], text_config=dict(ZOO["internvl"]["text_config"], model_type="qwen2"),
    vision_config=dict(ZOO["internvl"]["vision_config"], use_qk_norm=False, use_mean_pooling=True))
ZOO["internvl_moe"] = dict(
    ZOO["internvl"], tie_word_embeddings=False,
    text_config=dict(ZOO["internvl"]["text_config"], model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))

# Gemma 3 vision-language: the gemma3_text language model (sliding layers 0, 1, 3, window 20 <
# the verification sequences), a 3-block SigLIP (32 x 32 images, 8 x 8 patches) pooled to 16
# tokens per image; ids of the image tokens inside the vocabulary; the projector (zeros in
# transformers' init) seeded so images matter.
ZOO["gemma3"] = dict(
    model_type="gemma3", tie_word_embeddings=True, image_token_index=996, boi_token_index=997, eoi_token_index=998,
    mm_tokens_per_image=16, init={"mm_input_projection_weight": (0.0, 0.05)},
    text_config=dict({k: v for k, v in ZOO["gemma3_text"].items() if k != "model_type"},
                     model_type="gemma3_text", **_COMMON, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, image_size=32, patch_size=4, vision_use_head=False))
# Qwen3.5: hybrid language model (gated delta-net layers 0 and 2, gated attention layers 1 and 3),
# partial rotary 0.25 of head_dim 32 with an interleaved mRoPE section, Qwen3-VL's vision tower
# without deepstack; the MoE variant has 8 stacked experts and a gated shared expert on every layer.
_Q35_TEXT = dict(_VL_TEXT, head_dim=32, layer_types=["linear_attention", "full_attention"] * 2,
                 linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [2, 1, 1],
                                  "mrope_interleaved": True, "partial_rotary_factor": 0.25})
_Q35_VIT = dict(_VIT, patch_size=16, num_position_embeddings=64)
ZOO.update({
    "qwen3_5": dict(model_type="qwen3_5", tie_word_embeddings=False, **_VL_IDS, text_config=_Q35_TEXT,
                    vision_config=_Q35_VIT),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", tie_word_embeddings=False, **_VL_IDS,
                        text_config=dict(_Q35_TEXT, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=64),
                        vision_config=_Q35_VIT),
})
# Qwen3.5 with one MTP layer stored as the published checkpoints hold it (top-level mtp.*: ``add_qwen_next_mtp``)
ZOO["qwen3_5_mtp"] = dict(ZOO["qwen3_5"], text_config=dict(_Q35_TEXT, mtp_num_hidden_layers=1))
ZOO["qwen3_5_moe_mtp"] = dict(ZOO["qwen3_5_moe"], text_config=dict(ZOO["qwen3_5_moe"]["text_config"],
                                                                mtp_num_hidden_layers=1))

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "glm4_moe", "olmoe", "gpt_oss"]
MTP = ["deepseek_v3_mtp", "glm4_moe_mtp", "deepseek_v3_mtp_fp8"]  # MoE with MTP layers (tests/test_mtp.py, test_fp8_model.py), kept out of the MoE matrix
MULTIMODAL = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3"]
TILED_VL = ["internvl", "internvl_qwen2", "internvl_moe"]  # vision-language with fixed-size image tiles and 1-D RoPE (tests/test_internvl.py)
QUANTIZED = ["deepseek_v3_fp8", "deepseek_v3_mtp_fp8"]  # tested against their dequantised weights (tests/test_fp8_model.py)
VARIANTS = ["phi3_window", "qwen3_next_mtp"]  # a family's other setting, tested where it matters (test_sliding_window.py, test_qwen3_next_mtp.py)
VARIANTS += ["qwen3_5_mtp", "qwen3_5_moe_mtp"]  # Qwen3.5 with its MTP layer (tests/test_qwen3_5_mtp.py, test_qwen3_5_moe_mtp.py)
HYBRID = ["qwen3_next"]  # linear-attention hybrids (tests/test_qwen3_next.py), kept out of the MoE matrix
HYBRID += ["qwen3_5", "qwen3_5_moe"]  # hybrids with a vision tower (tests/test_qwen3_5.py)
DENSE = [n for n in ZOO if n not in MOE + MTP + MULTIMODAL + QUANTIZED + VARIANTS + TILED_VL + HYBRID]
TEXT = DENSE + MOE


def names() -> list[str]:
    return list(ZOO)


def cache_root() -> Path:
    return Path(os.environ.get("MCORE_BRIDGE_CACHE", Path.home() / ".cache" / "mcore_bridge"))


def materialize(name: str) -> Path:
    """Path of the built-in model ``name``, building it on first use."""
    if name not in ZOO:
        raise UsageError(f"unknown built-in model {name!r}; choose from: {', '.join(ZOO)}")
    dest = cache_root() / "zoo" / f"{name}-v{ZOO_VERSION}"
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and test workers may ask at the same time
        if not (dest / "config.json").exists():
            shutil.rmtree(dest, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
            try:
                _build_isolated(name, tmp)
                tmp.rename(dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _build_isolated(name: str, out: Path):
    """Build in this process, or in a fresh one when torch.distributed is initialised here:
    transformers' save_pretrained then writes only on rank 0 (and megatron's CPU adaptations are
    active), which must not leak into the reference model."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        code = f"from mcore_bridge import zoo; zoo.build({name!r}, __import__('pathlib').Path({str(out)!r}))"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    else:
        build(name, out)
    if not (out / "config.json").exists() or not list(out.glob("*.safetensors")):
        raise RuntimeError(f"building built-in model {name!r} in {out} left no config/weights")


def build(name: str, out: Path, seed: int = 0):
    """Create the tiny HF model ``name`` (random weights, non-trivial norms) in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    spec = dict(ZOO[name])
    shard = spec.pop("max_shard_size", "50GB")
    fp8_block = spec.pop("fp8_block", None)
    sharpen = spec.pop("qk_sharpen", False)  # text models whose RoPE/window must show: sharp attention
    scale = spec.pop("scale", {})  # parameter-name suffix -> factor on its initial values
    init = spec.pop("init", {})  # parameter-name suffix -> (mean, std) of its values
    multimodal = "vision_config" in spec
    mtp = int(spec.get("num_nextn_predict_layers", 0))
    main_layers = _COMMON["num_hidden_layers"]
    next_mtp = spec.pop("qwen3_next_mtp", 0)
    if next_mtp:  # built as full-attention layers N .. N+k-1 by transformers, then stored as mtp.*
        interval = spec["full_attention_interval"]
        spec["num_hidden_layers"] = main_layers + next_mtp
        spec["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                               for i in range(main_layers)] + ["full_attention"] * next_mtp
    q35_mtp = int(spec.get("text_config", {}).get("mtp_num_hidden_layers", 0)) if multimodal else 0
    if q35_mtp:  # Qwen3.5: the same, in the language model (text_config)
        text = spec["text_config"] = dict(spec["text_config"])
        text["num_hidden_layers"] = main_layers + q35_mtp
        text["layer_types"] = list(text["layer_types"]) + ["full_attention"] * q35_mtp
    if mtp:  # transformers builds no MTP: build the MTP layers' decoder layers as layers N .. N+k-1
        spec["num_hidden_layers"] = main_layers + mtp
    cfg = AutoConfig.for_model(**(spec if multimodal else {**_COMMON, **spec}))
    torch.manual_seed(seed)
    if multimodal:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):  # not all ones/zeros: a swap must show
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.1 * torch.randn_like(p))
            elif _is_router(pname):  # clear routing margins: fp32 noise must not flip a top-k choice
                p.mul_(5.0 if cfg.model_type in SIGMOID_ROUTERS else 25.0)  # sigmoid scores saturate sooner
            if cfg.model_type in ("gemma3_text", "qwen3_next") and pname.endswith(("q_norm.weight", "k_norm.weight")):
                # (1 + w) norms: sharpen the effective scale (see below), keep w an offset
                p.copy_(QK_SHARPEN ** 0.5 * (1.0 + p) - 1.0)
            if name in SHARPEN_QK:
                _sharpen_text_qk(pname, p, cfg)
            for suffix, factor in scale.items():
                if pname.endswith(suffix):
                    p.mul_(factor)
            for suffix, (mean, std) in init.items():
                if pname.endswith(suffix):
                    p.copy_(mean + std * torch.randn_like(p))
            if sharpen and any(k in pname for k in ("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SHARPEN)
            if (multimodal or cfg.model_type in SHARPEN_TEXT) and _is_query_key(pname, multimodal):
                # Sharp attention: with the default init, attention is near uniform and positions
                # barely matter, so a wrong multimodal RoPE split would hide below fp32 noise.
                # (q/k norms scale both factors of every score already: a milder factor.)
                p.mul_(QK_SHARPEN ** 0.5 if "_norm" in pname else QK_SHARPEN)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # a routing bias that changes choices
                b.copy_(0.05 * torch.randn_like(b))
    model.save_pretrained(out, max_shard_size=shard)
    if mtp:
        add_mtp(out, main_layers, mtp, seed)
    if next_mtp:
        add_qwen_next_mtp(out, main_layers, next_mtp, seed)
    if q35_mtp:
        add_qwen_next_mtp(out, main_layers, q35_mtp, seed, prefix="model.language_model.", text="text_config")
    if fp8_block:
        quantize_fp8_dir(out, fp8_block)
    tokenizer(cfg.get_text_config().vocab_size).save_pretrained(out)
    if multimodal:
        image_processor(cfg).save_pretrained(out)


def image_processor(cfg):
    """The model's real image processor (PIL backend: no torchvision needed): InternVL's tiling one
    (GotOcr2: up to 4 tiles + a thumbnail), else Qwen-VL's."""
    if cfg.model_type == "internvl":
        from transformers import GotOcr2ImageProcessorPil

        side = cfg.vision_config.image_size[0]
        return GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
                                        max_patches=4)
    return _qwen_image_processor(cfg)


def _qwen_image_processor(cfg):
    """The real Qwen-VL image processor (PIL backend: no torchvision needed) for a vision config;
    it accepts any image whose sides are multiples of patch x merge up to 16 x 16 such tiles.
    Gemma 3: its own processor, resizing to the tower's square ``image_size``."""
    from transformers import Qwen2VLImageProcessorPil

    v = cfg.vision_config
    if cfg.model_type == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        return Gemma3ImageProcessorPil(size={"height": v.image_size, "width": v.image_size}, do_pan_and_scan=False,
                                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    tile = v.patch_size * v.spatial_merge_size
    kw = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
              size={"shortest_edge": tile * tile, "longest_edge": 256 * tile * tile})
    if cfg.model_type.startswith("qwen3"):
        kw.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen2VLImageProcessorPil(**kw)


QK_SHARPEN = 4.0
SIGMOID_ROUTERS = ("deepseek_v3", "glm4_moe")
SHARPEN_TEXT = ("glm4_moe", "olmoe")  # partial rotary / full-width q/k norms: wrong ones must show


def _is_query_key(pname: str, multimodal: bool = True) -> bool:
    """Language-model query/key scales: the q/k norms where the model has them, else q/k_proj."""
    if (multimodal and "language_model" not in pname) or "self_attn" not in pname:
        return False
    return any(k in pname for k in ("q_norm", "k_norm", "q_proj", "k_proj"))


def _sharpen_text_qk(pname: str, p, cfg):
    """Scale a text model's query/key projections (separate, or the q and k rows of a fused qkv_proj)."""
    if ".self_attn." not in pname:
        return
    if "qkv_proj" in pname:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p[: (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim].mul_(QK_SHARPEN)
    elif "q_proj" in pname or "k_proj" in pname:
        p.mul_(QK_SHARPEN)


def _is_router(pname: str) -> bool:
    if pname.endswith("mlp.router.weight"):  # gpt-oss
        return True
    return pname.endswith("gate.weight") and "proj" not in pname and "shared_expert_gate" not in pname


def tokenizer(vocab_size: int):
    """A small word-level tokenizer with a chat template, so chat-formatted samples work offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = _WORDS + [f"w{i}" for i in range(vocab_size)]
    vocab = {t: i for i, t in enumerate(special)}
    for w in words:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(special)  # matched whole, before the whitespace split
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                          "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
                          "{% endif %}")
    return fast


_WORDS = ("system user assistant the a an of to in and is it that for on with as was by at be this "
          "from are or have not but what all were when we there can more if no out so said up its "
          "about into than them only other new some could time these two may then do first any my "
          "now such like our over man me even most made after also did many before must through "
          "back years where much your way well down should because each just those people how too "
          "little state good very make world still own see men work long get here between both life "
          "being under never day same another know while last might us great old year off come "
          "since against go came right used take three . , ? ! : ; ' \" ( ) 0 1 2 3 4 5 6 7 8 9 "
          "model weight tensor layer parallel pipeline expert convert check token").split()
