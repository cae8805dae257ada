"""LoRA round trip through the command line on one GPU (the device tool's megatron-core wheels):
a PEFT adapter made by PEFT itself for a built-in model -> ``export --adapters --to-mcore`` (an
adapter-only torch_dist checkpoint, NCCL) -> ``export --adapter-load --to-hf
--test-convert-precision`` (HF + PeftModel against megatron with the adapter) -> the written PEFT
adapter compared byte for byte with PEFT's. Prints one JSON line; exit 1 on any failure.

    python bench/gpu_lora_cli.py --model qwen2_moe --work /tmp/lora-gpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_adapter(src: Path, out: Path, moe: bool) -> None:
    import peft
    import transformers

    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    params = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    if moe:
        params += ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
    cfg = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=params)
    peft.get_peft_model(hf, cfg).save_pretrained(out)


def cli(*args) -> tuple[int, str, float]:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "mcore_bridge.cli", *map(str, args)], capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr)[-2500:], time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2_moe")
    ap.add_argument("--work", default="/tmp/lora-gpu")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from mcore_bridge import zoo
    from mcore_bridge.hf_io import HFCheckpoint

    import megatron.core

    work = Path(a.work)
    src = zoo.materialize(a.model)
    adapter, mc, back = work / "peft", work / "mcore-adapter", work / "peft-back"
    make_adapter(src, adapter, a.model in zoo.MOE)
    res = {"model": a.model, "megatron_core": megatron.core.__version__, "device": a.device, "steps": {}}
    ok = True
    for step, args in (("to_mcore", ("export", "--model", src, "--adapters", adapter, "--to-mcore", "--merge-lora",
                                     "false", "--save", mc, "--device", a.device, "--overwrite")),
                       ("to_hf_checked", ("export", "--model", src, "--adapter-load", mc, "--to-hf", "--save", back,
                                          "--device", a.device, "--test-convert-precision", "--overwrite"))):
        rc, tail, secs = cli(*args)
        res["steps"][step] = {"rc": rc, "s": round(secs, 1),
                              "verdict_lines": [l for l in tail.splitlines() if "PASS" in l or "FAIL" in l][-4:]}
        if rc != 0:
            res["steps"][step]["tail"] = tail[-1500:]
            ok = False
            break
    if ok:
        x, y = HFCheckpoint(adapter, config={}), HFCheckpoint(back, config={})
        same_names = sorted(x.names()) == sorted(y.names())
        differ = [n for n in x.names() if n in y.tensors and not torch.equal(x.read(n), y.read(n))]
        res.update(adapter_tensors=len(x.names()), same_names=same_names, tensors_differ=differ[:5],
                   byte_exact=same_names and not differ)
        ok = res["byte_exact"] and "PASS" in " ".join(res["steps"]["to_hf_checked"]["verdict_lines"])
    res["ok"] = ok
    print(json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
