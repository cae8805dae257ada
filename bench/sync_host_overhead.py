"""Host-side cost of the weight-sync stream on one GPU (no communication): how long a full
``export_weights`` takes with its plan made on the call, with the plan cached (an RL loop's
later steps), and the planning alone, for the MoE and dense shapes of sync_bench.py.

    torchrun --nproc-per-node 1 bench/sync_host_overhead.py OUT.json
"""
import sys, time, torch, json
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
from make_checkpoint import make_config, tensor_shapes
from mcore_bridge import Bridge, ParallelLayout
out = {}
for name, layers in (("qwen3-30b-a3b", 48), ("qwen3-8b", 36)):
    cfg = make_config(name, layers)
    hf = {n: (s, torch.bfloat16) for n, s in tensor_shapes(cfg)}
    b = Bridge(None, ParallelLayout(), hf_config=cfg.to_dict(), hf_tensors=hf)
    b.setup("cuda"); models = b.build_model(torch.bfloat16)
    def run(**kw):
        torch.cuda.synchronize(); t = time.perf_counter()
        n = sum(1 for _ in b.export_weights(models, **kw)); torch.cuda.synchronize()
        return time.perf_counter() - t, n
    first = run(); again = [run()[0] for _ in range(3)]
    b.__dict__.pop("_plans", None)
    t0 = time.perf_counter(); b._sync_plan(models, None, 256 << 20, True, True, False, None); plan = time.perf_counter() - t0
    out[name] = {"tensors": first[1], "first_s": first[0], "cached_plan_s": min(again), "plan_s": plan}
    print(name, out[name], flush=True)
    del models, b; torch.cuda.empty_cache()
open(sys.argv[1], "w").write(json.dumps(out, indent=1) + "\n")
