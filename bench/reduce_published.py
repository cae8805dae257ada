"""A random-weight HF checkpoint with a published model's real per-matrix shapes at reduced depth
(and expert count where one GPU's memory needs it), written by transformers' own ``save_pretrained``.

    python bench/reduce_published.py tests/published/deepseek-ai__DeepSeek-V3.json --out /tmp/dsv3 \
        --layers 2 --experts 16

Every field of the published ``config.json`` is kept except: ``num_hidden_layers`` (and the
per-layer lists that follow it: ``layer_types``, ``mlp_only_layers``), the routed expert count with
what must divide it (``n_group`` / ``topk_group``, top-k), dense-first-layer counts clipped to the
new depth, MTP layers (``num_nextn_predict_layers``: transformers builds none, so the reduced model
has none either) and ``quantization_config`` (the weights are written in bf16; ``--fp8`` below also
writes the FP8 checkpoint as published). The config actually used is
written next to the weights and printed.

``--mtp``: keep the published multi-token-prediction layer too, stored as the checkpoint publishes it
(DeepSeek-V3 / Kimi-K2 / GLM-4.5: ``model.layers.N.*`` with ``enorm``, ``hnorm``, ``eh_proj``, the
embedding and head copies; Qwen3-Next / Qwen3.5: top-level ``mtp.*``): transformers builds the MTP
layer's decoder layer as layer N (a full-attention layer), which is then renamed and given its
seeded MTP-only weights (``mcore_bridge.ckpt_edit``, also used by the tiny zoo models).

``--mxfp4 OUT2`` (a published config with ``quant_method: mxfp4``, i.e. gpt-oss): also write the
checkpoint as gpt-oss publishes it -- every stacked expert tensor ``P`` (``[E, in, out]``) replaced by
random ``P_blocks`` (uint8 ``[E, out, in/32, 16]``, two FP4 codes each) and ``P_scales`` (uint8
``[E, out, in/32]``, exponents 2^-8..2^-6), and the published ``quantization_config`` put back. Its
bf16 view (``mcore_bridge.quant``) is what a conversion must reproduce.

``--fp8 OUT2`` (a published config with ``quant_method: fp8``: DeepSeek-V3 / V3.1, Kimi-K2, GLM-4.5-FP8):
also write the checkpoint as it is published -- the tensors an FP8 export quantises stored as blockwise
FP8 with ``weight_scale_inv``, quantised with the published ``quantization_config`` (its block size and
``scale_fmt``: V3.1's power-of-two ``ue8m0`` scales), which is put back verbatim.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
DENSE_FIRST_KEYS = ("first_k_dense_replace",)
# model types transformers does not know, built with the class of the architecture they share
SAME_AS = {"kimi_k2": "deepseek_v3"}


def mtp_layers(raw: dict) -> tuple[int, str]:
    """The published MTP layer count and its storage style (``"deepseek"`` or ``"qwen_next"``)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    if text.get("num_nextn_predict_layers"):
        return int(text["num_nextn_predict_layers"]), "deepseek"
    if text.get("mtp_num_hidden_layers") or text.get("model_type", raw.get("model_type")) == "qwen3_next":
        return int(text.get("mtp_num_hidden_layers") or 1), "qwen_next"
    return 0, ""


def reduce_config(raw: dict, layers: int, experts: int | None, mtp: bool = False) -> dict:
    cfg = json.loads(json.dumps(raw))
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    text["num_hidden_layers"] = layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:layers]
    if isinstance(text.get("mlp_only_layers"), list):
        text["mlp_only_layers"] = [i for i in text["mlp_only_layers"] if i < layers]
    for k in DENSE_FIRST_KEYS:
        if text.get(k):
            text[k] = min(int(text[k]), max(layers - 1, 0))  # keep at least one MoE layer
    for k in EXPERT_KEYS:
        if experts and text.get(k) and int(text[k]) > experts:
            text[k] = experts
            groups = int(text.get("n_group") or 1)
            if groups > 1:
                text["n_group"] = math.gcd(groups, experts)
                text["topk_group"] = min(int(text.get("topk_group") or 1), text["n_group"])
            topk = int(text.get("num_experts_per_tok") or 1)
            text["num_experts_per_tok"] = min(topk, experts)
    n_mtp, style = mtp_layers(raw) if mtp else (0, "")
    if n_mtp:  # transformers builds the MTP layers' decoder layers as layers N .. N+k-1
        if style == "qwen_next":  # full-attention layers, after the main model's own types
            interval = int(text.get("full_attention_interval") or 4)
            types = text.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                                for i in range(layers)]
            text["layer_types"] = list(types[:layers]) + ["full_attention"] * n_mtp
        text["num_hidden_layers"] = layers + n_mtp
    else:
        text.pop("num_nextn_predict_layers", None)
    cfg.pop("quantization_config", None)
    text.pop("quantization_config", None)
    cfg.pop("auto_map", None)
    if cfg.get("model_type") in SAME_AS:
        cfg["model_type"] = SAME_AS[cfg["model_type"]]
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a published config.json (tests/published/*.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=None, help="at most this many routed experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where transformers initialises the random weights "
                   "(cuda: much faster for multi-GB models; the files are the same kind either way)")
    p.add_argument("--mtp", action="store_true", help="keep the published MTP layer (see above)")
    p.add_argument("--mxfp4", default=None, metavar="OUT2",
                   help="also write an MXFP4 copy here (configs whose quant_method is mxfp4)")
    p.add_argument("--fp8", default=None, metavar="OUT2",
                   help="also write the blockwise-FP8 copy here, quantised as the published "
                        "quantization_config says (configs whose quant_method is fp8)")
    args = p.parse_args(argv)

    import transformers

    raw = json.loads(Path(args.config).read_text())
    cfg_dict = reduce_config(raw, args.layers, args.experts, args.mtp)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(args.seed)
    model_type = cfg_dict.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    auto = transformers.AutoModelForImageTextToText if hasattr(cfg, "vision_config") else \
        transformers.AutoModelForCausalLM
    with torch.device(args.device):
        model = auto.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # routers with a trained router's spread, so routing is not rounding noise
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_(0.0, 0.5)
    model.save_pretrained(out, max_shard_size="4GB")
    n = sum(t.numel() for t in model.state_dict().values())
    n_mtp, style = mtp_layers(raw) if args.mtp else (0, "")
    if n_mtp:
        from mcore_bridge import ckpt_edit

        if style == "deepseek":
            ckpt_edit.add_mtp(out, args.layers, n_mtp, args.seed)
        else:
            text = "text_config" if isinstance(raw.get("text_config"), dict) else None
            prefix = "model.language_model." if text else "model."
            ckpt_edit.add_qwen_next_mtp(out, args.layers, n_mtp, args.seed, prefix=prefix, text=text)
    if args.mxfp4:
        write_mxfp4(out, Path(args.mxfp4), raw.get("quantization_config") or {}, args.seed)
    if args.fp8:
        write_fp8(out, Path(args.fp8), raw.get("quantization_config") or {}, args.device)
    print(json.dumps({"out": str(out), "model_type": model_type, "params": n,
                      "config": {k: v for k, v in cfg_dict.items() if not isinstance(v, dict)}}))
    return 0


def write_fp8(src: Path, dst: Path, qconfig: dict, device: str) -> None:
    """``src`` (bf16) copied to ``dst`` and quantised to blockwise FP8 as ``qconfig`` (published) says."""
    from mcore_bridge import ckpt_edit

    if qconfig.get("quant_method") != "fp8":
        raise SystemExit(f"--fp8: the published config's quant_method is {qconfig.get('quant_method')!r}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    ckpt_edit.quantize_fp8_dir(dst, qconfig=qconfig, device=device)
    print(json.dumps({"fp8": str(dst), "quantization_config": qconfig}))


def write_mxfp4(src: Path, dst: Path, qconfig: dict, seed: int) -> None:
    """``src`` (bf16, stacked experts) rewritten with MXFP4 experts, as gpt-oss is published."""
    from safetensors.torch import load_file, save_file

    if qconfig.get("quant_method") != "mxfp4":
        raise SystemExit(f"--mxfp4: the published config's quant_method is {qconfig.get('quant_method')!r}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed + 1)
    index = dst / "model.safetensors.index.json"
    files = sorted(dst.glob("*.safetensors"))
    weight_map = {}
    for f in files:
        tensors, out = load_file(f), {}
        for name, t in tensors.items():
            if ".mlp.experts." in name and name.endswith(("gate_up_proj", "down_proj")) and t.dim() == 3:
                e, n_in, n_out = t.shape
                g = n_in // 32
                out[name + "_blocks"] = torch.randint(0, 256, (e, n_out, g, 16), dtype=torch.uint8, generator=gen)
                out[name + "_scales"] = torch.randint(119, 122, (e, n_out, g), dtype=torch.uint8, generator=gen)
            else:
                out[name] = t
        save_file(out, f, metadata={"format": "pt"})
        weight_map.update({n: f.name for n in out})
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(idx, indent=2))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    print(json.dumps({"mxfp4": str(dst), "quantised": sum(n.endswith("_blocks") for n in weight_map)}))


if __name__ == "__main__":
    sys.exit(main())
