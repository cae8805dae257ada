"""Write a random-weight HF checkpoint with published shapes (Qwen3-8B, Qwen3-30B-A3B, Qwen3-VL-8B,
Qwen3-VL-30B-A3B) and fewer (language) layers.

    python bench/make_checkpoint.py --out /tmp/qwen3-8b-l4 --layers 4
    python bench/make_checkpoint.py --config qwen3-30b-a3b --out /tmp/qwen3-30b-a3b-l4 --layers 4

The full model is never built: transformers instantiates it on the ``meta`` device only to list
tensor names and shapes (exactly what ``save_pretrained`` would write, tied weights dropped), then
each shard file is filled with random bf16 tensors and written with ``safetensors.torch.save_file``
before the next one is generated, so peak memory is about one shard (``--max-shard-gb``).
Output: ``config.json`` (from ``Qwen3Config.save_pretrained``), ``model-0000i-of-0000N.safetensors``
and ``model.safetensors.index.json``, as HF's sharded ``save_pretrained`` lays them out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

# Published Qwen3-8B config.json (Qwen/Qwen3-8B), minus num_hidden_layers (36 there).
QWEN3_8B = dict(
    hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6,
    max_position_embeddings=40960, max_window_layers=36, use_sliding_window=False, sliding_window=None,
    attention_bias=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
)
# Published Qwen3-30B-A3B config.json (Qwen/Qwen3-30B-A3B), minus num_hidden_layers (48 there).
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
    use_sliding_window=False, sliding_window=None, attention_bias=False, hidden_act="silu",
    bos_token_id=151643, eos_token_id=151645, router_aux_loss_coef=0.001,
)
# Published Qwen3-VL-8B-Instruct / Qwen3-VL-30B-A3B-Instruct config.json, minus the language
# model's num_hidden_layers (36 / 48 there); the vision tower keeps its full depth (27 blocks).
_QWEN3_VL_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                        deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh", in_channels=3)
_QWEN3_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653, tie_word_embeddings=False)
_QWEN3_VL_ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                  "mrope_interleaved": True}
QWEN3_VL_8B = dict(
    text_config=dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=262144,
                     hidden_act="silu", attention_bias=False, rope_parameters=_QWEN3_VL_ROPE,
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(_QWEN3_VL_VISION, out_hidden_size=4096), **_QWEN3_VL_IDS)
QWEN3_VL_30B_A3B = dict(
    text_config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                     max_position_embeddings=262144, hidden_act="silu", attention_bias=False,
                     rope_parameters=_QWEN3_VL_ROPE, bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(_QWEN3_VL_VISION, out_hidden_size=2048), **_QWEN3_VL_IDS)
CONFIGS = {"qwen3-8b": ("Qwen3ForCausalLM", "qwen3", QWEN3_8B),
           "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", "qwen3_moe", QWEN3_30B_A3B),
           # vision-language: written as transformers 5.24 writes them (experts stacked [E, 2F, H])
           "qwen3-vl-8b": ("Qwen3VLForConditionalGeneration", "qwen3_vl", QWEN3_VL_8B),
           "qwen3-vl-30b-a3b": ("Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", QWEN3_VL_30B_A3B)}


def make_config(name: str, layers: int, experts: int | None = None, vision_depth: int | None = None):
    """``experts``: fewer routed experts (MoE); ``vision_depth``: fewer vision blocks, the deepstack
    taps spread over them as in the published tower (at most ``layers`` taps, one per language
    layer that receives them). Every matrix keeps its published shape."""
    import copy

    from transformers import AutoConfig

    arch, model_type, fields = CONFIGS[name]
    fields = copy.deepcopy(fields)
    text = fields.get("text_config", fields)
    if experts is not None:
        if "num_experts" not in text:
            sys.exit(f"--experts: {name} has no experts")
        text["num_experts"] = experts
    if "vision_config" in fields:
        v = fields["vision_config"]
        depth = vision_depth or v["depth"]
        taps = len(v["deepstack_visual_indexes"])
        taps = min(taps, layers)
        v["deepstack_visual_indexes"] = [round((i + 1) * depth / (taps + 1)) - 1 for i in range(taps)] \
            if (vision_depth or taps != 3) else v["deepstack_visual_indexes"]
        v["depth"] = depth
    elif vision_depth is not None:
        sys.exit(f"--vision-depth: {name} has no vision tower")
    if "text_config" in fields:
        fields["text_config"]["num_hidden_layers"] = layers
        cfg = AutoConfig.for_model(model_type, **fields)
    else:
        cfg = AutoConfig.for_model(model_type, num_hidden_layers=layers, **fields)
    cfg.dtype = torch.bfloat16
    cfg.architectures = [arch]
    return cfg


def tensor_shapes(cfg, stacked: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` would write, in its order. transformers 5
    keeps MoE experts stacked in memory (``experts.gate_up_proj [E, 2F, H]``, ``down_proj [E, H, F]``)
    and writes one tensor per expert; ``stacked`` keeps the in-memory form instead."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    multimodal = hasattr(cfg, "vision_config")
    stacked = stacked or multimodal
    with torch.device("meta"):
        model = (AutoModelForImageTextToText if multimodal else AutoModelForCausalLM).from_config(
            cfg, dtype=torch.bfloat16)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    skip = set(tied) if cfg.tie_word_embeddings else set()  # dict (transformers 5) or list (4.x)
    out = []
    for n, t in model.state_dict().items():
        if n in skip:
            continue
        shape = tuple(t.shape)
        if not stacked and n.endswith("mlp.experts.gate_up_proj"):
            prefix, (e, f2, h) = n[: -len("gate_up_proj")], shape
            out += [(f"{prefix}{i}.{p}_proj.weight", (f2 // 2, h)) for i in range(e) for p in ("gate", "up")]
        elif not stacked and n.endswith("mlp.experts.down_proj"):
            prefix, (e, h, f) = n[: -len("down_proj")], shape
            out += [(f"{prefix}{i}.down_proj.weight", (h, f)) for i in range(e)]
        else:
            out.append((n, shape))
    return out


def plan_files(shapes, max_bytes: int, itemsize: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in order, like transformers' ``shard_checkpoint``: start a new file when full."""
    files, current, size = [], [], 0
    for name, shape in shapes:
        n = itemsize
        for d in shape:
            n *= d
        if current and size + n > max_bytes:
            files.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    if current:
        files.append(current)
    return files


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """On the generator's device (``--device cuda``: 16 GB in seconds rather than minutes), returned on
    the CPU."""
    if len(shape) == 1:  # norm weights: around 1 like a trained model's
        return (1.0 + 0.02 * torch.randn(shape, generator=gen, device=gen.device)).to(torch.bfloat16).cpu()
    out = torch.empty(shape, dtype=torch.bfloat16, device=gen.device)
    # normal_ on bf16 directly keeps memory at one tensor (no fp32 temporary); MoE routers get a
    # trained router's spread of logits, so that routing is not decided by rounding noise
    return out.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.02, generator=gen).cpu()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (use /tmp, not the repo)")
    p.add_argument("--layers", type=int, default=4, help="num_hidden_layers (Qwen3-8B has 36)")
    p.add_argument("--config", default="qwen3-8b", choices=sorted(CONFIGS))
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size limit, 1e9 bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stacked", action="store_true", help="MoE: keep experts stacked [E, 2F, H] / [E, H, F]")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the random numbers are drawn (cuda: much faster for a full-depth model; the "
                        "values differ from cpu's for the same seed)")
    p.add_argument("--experts", type=int, default=None, help="MoE: fewer routed experts (shapes as published)")
    p.add_argument("--vision-depth", type=int, default=None, help="VL: fewer vision blocks (shapes as published)")
    p.add_argument("--tokenizer", action="store_true",
                   help="also write a word-level tokenizer with a chat template (zoo.tokenizer) and, for a "
                        "vision-language model, its image processor, so the checkpoint trains offline")
    args = p.parse_args(argv)

    from safetensors.torch import save_file

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            sys.exit(f"{out} exists and is not empty; pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = make_config(args.config, args.layers, args.experts, args.vision_depth)
    shapes = tensor_shapes(cfg, args.stacked)
    files = plan_files(shapes, int(args.max_shard_gb * 1e9))
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, entries in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, gen) for name, shape in entries}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        for name, _ in entries:
            weight_map[name] = fname
        total += size
        print(f"{fname}: {len(entries)} tensors, {size / 1e9:.2f} GB ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save_pretrained(out)  # writes config.json only (no weights)
    if args.tokenizer:
        from mcore_bridge import zoo

        zoo.tokenizer(cfg.get_text_config().vocab_size).save_pretrained(out)
        if hasattr(cfg, "vision_config"):
            zoo.image_processor(cfg).save_pretrained(out)
    print(f"wrote {out}: {len(shapes)} tensors, {total / 1e9:.2f} GB in {len(files)} files")


if __name__ == "__main__":
    main()
