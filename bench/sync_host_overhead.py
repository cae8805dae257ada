"""Host-side cost of the weight-sync stream on one GPU (no communication): how long a full
``export_weights`` takes with its plan made on the call, with the plan cached (an RL loop's
later steps), and the planning alone, for the MoE and dense shapes of sync_bench.py.

    torchrun --nproc-per-node 1 bench/sync_host_overhead.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_checkpoint import make_config, tensor_shapes  # noqa: E402

from mcore_bridge import Bridge, ParallelLayout  # noqa: E402


def timed_export(bridge, models) -> tuple[float, int]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = sum(1 for _ in bridge.export_weights(models))
    torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def measure(name: str, layers: int) -> dict:
    cfg = make_config(name, layers)
    hf = {n: (s, torch.bfloat16) for n, s in tensor_shapes(cfg)}
    bridge = Bridge(None, ParallelLayout(), hf_config=cfg.to_dict(), hf_tensors=hf)
    bridge.setup("cuda")
    models = bridge.build_model(torch.bfloat16)
    first, tensors = timed_export(bridge, models)
    cached = min(timed_export(bridge, models)[0] for _ in range(3))
    bridge.syncplan.forget()
    t0 = time.perf_counter()
    bridge.syncplan.plan(models, None, 256 << 20, True, True, False, None)
    return {"tensors": tensors, "first_s": first, "cached_plan_s": cached, "plan_s": time.perf_counter() - t0}


def main():
    out = {}
    for name, layers in (("qwen3-30b-a3b", 48), ("qwen3-8b", 36)):
        out[name] = measure(name, layers)
        print(name, out[name], flush=True)
        torch.cuda.empty_cache()
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
