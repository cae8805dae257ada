"""GPU only: the gated delta rule of Qwen3-Next / Qwen3.5 as megatron-core runs it on a GPU (the
``fla`` Triton kernel ``chunk_gated_delta_rule``) against the plain-torch chunked rules of
transformers and of megatron-core itself, at Qwen3-Next-80B-A3B's per-layer shapes (32 value heads,
16 key heads repeated to 32, head dims 128).

    PYTHONPATH=<megatron-core site with fla>:. python bench/gpu_deltanet_check.py [--json out.json]

Prints, per sequence length and input dtype, the relative error ``|a - b|_mean / |b|_mean`` and the
largest absolute difference of each pair; the reference is transformers' torch rule on float32 inputs
(both torch rules compute in float32 whatever the input dtype). It asserts nothing; the numbers go
into the GPU report next to the full-model verification.
"""

from __future__ import annotations

import argparse
import json

import torch


def megatron_torch_rule():
    for name in ("megatron.core.ssm.gated_delta_net.common", "megatron.core.ssm.gated_delta_net"):
        try:
            mod = __import__(name, fromlist=["torch_chunk_gated_delta_rule"])
            return getattr(mod, "torch_chunk_gated_delta_rule")
        except (ImportError, AttributeError):
            continue
    raise SystemExit("megatron-core has no torch_chunk_gated_delta_rule")


def inputs(t: int, seed: int, heads: int = 32, dk: int = 128, dv: int = 128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, t, heads, dk, device="cuda", generator=g)
    k = torch.randn(1, t, heads, dk, device="cuda", generator=g)
    v = torch.randn(1, t, heads, dv, device="cuda", generator=g)
    # log decay as the model makes it: -exp(A_log) * softplus(a + dt_bias) < 0; beta = sigmoid(b)
    decay = -torch.nn.functional.softplus(torch.randn(1, t, heads, device="cuda", generator=g)) * 0.5
    beta = torch.sigmoid(torch.randn(1, t, heads, device="cuda", generator=g))
    return q, k, v, decay, beta


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="384,2048")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_rule
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as hf_dispatch

    from verify.forward import _torch_original

    # transformers 5.x dispatches its "torch" rule to fla when fla is importable (the first GPU run of
    # this script compared fla with itself: 0.0); its own torch rule is the decorated function's original
    hf_rule = _torch_original(hf_dispatch) or hf_dispatch

    import megatron.core

    mg_rule = megatron_torch_rule()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).abs().mean() / b.abs().mean()).item(), (a - b).abs().max().item()

    for t in (int(x) for x in args.lengths.split(",")):
        q, k, v, decay, beta = inputs(t, seed=t)
        # q/k L2-normalised here, as megatron's GatedDeltaNet does before its rule (megatron's torch rule
        # calls fla's l2norm with a `dim` keyword that fla 0.6 does not take, when asked to normalise)
        q, k = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
        ref, _ = hf_rule(q, k, v, decay, beta)
        for dtype in (torch.float32, torch.bfloat16):
            x = [a.to(dtype) for a in (q, k, v, decay, beta)]
            outs = {
                "fla (megatron's GPU path)": fla_rule(*x[:3], g=x[3], beta=x[4])[0],
                "transformers torch rule": hf_rule(*x)[0],
                "transformers as it dispatches": hf_dispatch(*x)[0],
                "megatron torch rule": mg_rule(*x)[0],
            }
            names = list(outs)
            for i, a in enumerate(names):
                r, m = rel(outs[a], ref)
                rows.append({"T": t, "dtype": str(dtype).split(".")[-1], "a": a, "b": "transformers torch rule, fp32 inputs",
                             "rel_mean": r, "max_abs": m})
                for b in names[i + 1:]:
                    r, m = rel(outs[a], outs[b])
                    rows.append({"T": t, "dtype": str(dtype).split(".")[-1], "a": a, "b": b, "rel_mean": r,
                                 "max_abs": m})
    head = f"megatron-core {megatron.core.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}"
    print(head)
    print("| T | dtype | a | b | rel mean | max abs |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['dtype']} | {r['a']} | {r['b']} | {r['rel_mean']:.2e} | {r['max_abs']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": head, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
