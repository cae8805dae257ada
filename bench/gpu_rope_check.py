"""GPU only: do megatron-core's and transformers' yarn RoPE tables for gpt-oss agree on a CUDA device?

    PYTHONPATH=<megatron-core site>:. python bench/gpu_rope_check.py

A suspect for gpt-oss-20b's fp32 gap on an H200 (reports/gpu-h200/published-and-startup.md): megatron
builds ``inv_freq`` on the current CUDA device (unless ``use_cpu_initialization``), transformers on
CPU and moves it. Prints the largest |cos| differences (mscale included) over 384 positions, for
each combination; it asserts nothing.
"""
import json, torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
raw = json.load(open("tests/published/openai__gpt-oss-20b.json")); raw.pop("quantization_config")
cfg = GptOssConfig(**raw)
S = 384
pos = torch.arange(S)[None]
x = torch.zeros(1, S, 64)
def hf(dev_init, dev_run):
    r = GptOssRotaryEmbedding(cfg, device=dev_init).to(dev_run)
    c, s = r(x.to(dev_run), pos.to(dev_run)); return c[0].double().cpu(), r.inv_freq.double().cpu()
hc_cpu, if_cpu = hf("cpu", "cpu"); hc_cg, _ = hf("cpu", "cuda"); hc_gg, if_gg = hf("cuda", "cuda")
print("hf inv_freq cpu vs cuda-init max rel", ((if_cpu - if_gg).abs() / if_cpu).max().item())
print("hf cos: cpu vs (cpu-init, cuda-run)", (hc_cpu - hc_cg).abs().max().item(), " vs cuda-init", (hc_cpu - hc_gg).abs().max().item())
rope = cfg.rope_parameters
for cpu_init in (False, True):
    m = YarnRotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=rope["rope_theta"], scaling_factor=rope["factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"], beta_fast=rope["beta_fast"],
        beta_slow=rope["beta_slow"], correction_range_round_to_int=bool(rope.get("truncate", True)), use_cpu_initialization=cpu_init)
    emb, mscale = m(S)  # [S, 1, 1, dim], dim = cat(freqs, freqs)
    half = hc_cpu.shape[-1]  # gpt-oss's transformers rotary returns cos of the first half only
    emb = emb[:, 0, 0, :half].float()  # the angles as megatron computes them on the GPU (fp32)
    mc = (torch.cos(emb) * mscale).double().cpu()
    inv = m.inv_freq.double().cpu()
    print(f"megatron cpu_init={cpu_init}: inv_freq vs hf max rel {((inv - if_cpu).abs() / if_cpu).max().item():.3e}; "
          f"mscale {mscale}; cos vs hf (cpu) max {(mc - hc_cpu).abs().max().item():.3e}; "
          f"vs hf (cuda run) max {(mc - hc_cg).abs().max().item():.3e}")
