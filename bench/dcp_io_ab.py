"""The torch_dist writer and reader alone, A/B in one process (issue 21 item 1).

    python bench/dcp_io_ab.py --source /tmp/io_floor/qwen3-8b-l4 --reps 3

Loads the HF checkpoint into a TP1 model once, then per repetition, alternating which goes first:
* save: ``dist_ckpt.save`` through mcore-bridge's ``DirectWriter`` vs torch DCP's ``FileSystemWriter``
  (the same megatron save strategy otherwise), each followed by ``sync`` inside its timing;
* load: ``dist_ckpt.load`` through mcore-bridge's ``DirectReader`` strategy vs megatron-core's own
  default load strategy (DCP's ``FileSystemReader``), into the same model, after dropping nothing
  from the page cache (both read the same, just written files).
Every load is checked bit for bit against the model's weights before it. Prints medians, all runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True)
    p.add_argument("--work", default="/tmp/io_floor/dcp_ab")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mcore_bridge import Bridge, ParallelLayout, dcp_writer, dist_ckpt

    bridge = Bridge(args.source, ParallelLayout())
    bridge.setup("cpu")
    models = bridge.build_model(torch.bfloat16)
    bridge.load_weights(models)
    ref = {n: p.detach().clone() for m in models for n, p in m.named_parameters()}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    @contextlib.contextmanager
    def stock_writer():
        real = dcp_writer.available
        dcp_writer.available = lambda: False  # this bench process only
        try:
            yield
        finally:
            dcp_writer.available = real

    def megatron_load(ms, path):  # megatron's default strategy, as dist_ckpt.load fills the model
        state = dist_ckpt.sharded_state(ms)
        loaded = dist_checkpointing.load(state, str(dist_ckpt.resolve(path)))
        for i, m in enumerate(ms):
            m.load_state_dict(loaded[dist_ckpt.model_key(i, len(ms))], strict=False)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        os.sync()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {}
    for rep in range(args.reps):
        order = ["direct", "dcp"] if rep % 2 == 0 else ["dcp", "direct"]
        for kind in order:
            out = work / kind
            ctx = contextlib.nullcontext() if kind == "direct" else stock_writer()
            with ctx:
                times.setdefault(f"save {kind}", []).append(
                    timed(lambda: dist_ckpt.save(models, out, overwrite=True)))
        for kind in order:
            with torch.no_grad():
                for m in models:
                    for q in m.parameters():
                        q.fill_(float("nan"))
            src = work / "direct"  # both read the same files (the direct writer's)
            fn = (lambda: dist_ckpt.load(models, src)) if kind == "direct" else (lambda: megatron_load(models, src))
            times.setdefault(f"load {kind}", []).append(timed(fn))
            got = {n: p.detach() for m in models for n, p in m.named_parameters()}
            bad = [n for n in ref if not torch.equal(ref[n].view(-1).view(torch.uint8), got[n].view(-1).view(torch.uint8))]
            if bad:
                raise SystemExit(f"load {kind}: {len(bad)} tensors differ, e.g. {bad[:3]}")
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    gb = sum(t.numel() * t.element_size() for t in ref.values()) / 1e9
    print(f"\n{gb:.2f} GB of parameters, {args.reps} repetitions, load average {os.getloadavg()[0]:.1f}")
    print("| step | median s | runs s | GB/s (median) |\n|---|---|---|---|")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k} | {med:.2f} | {' / '.join(f'{t:.2f}' for t in v)} | {gb / med:.2f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
