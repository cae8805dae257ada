"""Pool cases: ``mcore-bridge export ... --test-convert-precision`` run inside a pool rank with a
fault in a writer, so that what is written differs from the converted model by one tensor scaled.
The precision check must judge what was written, so it must fail."""

from __future__ import annotations

import contextlib
import dataclasses


@contextlib.contextmanager
def _scaled_torch_dist_write(name: str, factor: float):
    """megatron's dist_checkpointing.save writes the model's ``name`` (state-dict name) times
    ``factor``; the model itself is untouched."""
    from megatron.core import dist_checkpointing

    original = dist_checkpointing.save
    hits = []

    def save(state, checkpoint_dir, *args, **kwargs):
        model = dict(state["model"])
        if name in model:
            sh = model[name]
            model[name] = dataclasses.replace(sh, data=sh.data * factor)
            hits.append(name)
        return original({**state, "model": model}, checkpoint_dir, *args, **kwargs)

    dist_checkpointing.save = save
    try:
        yield hits
    finally:
        dist_checkpointing.save = original


@contextlib.contextmanager
def _scaled_hf_write(name: str, factor: float):
    """The HF writer (``io.write_shard``) writes tensor ``name`` times ``factor``."""
    from mcore_bridge import hf_io as hfio

    original = hfio.write_shard
    hits = []

    def write_shard(path, tensors):
        if name in tensors:
            from mcore_bridge.splice import Runs

            t = tensors[name]
            tensors = {**tensors, name: (t.read() if isinstance(t, Runs) else t) * factor}  # spliced: its bytes
            hits.append(name)
        return original(path, tensors)

    hfio.write_shard = write_shard
    try:
        yield hits
    finally:
        hfio.write_shard = original


def export_with_writer_fault(argv: list[str], fault: str | None, name: str, factor: float = 1.01) -> dict:
    """``cmd_export(argv)`` in this rank (the pool's process group serves as torchrun's); ``fault``:
    None, "torch_dist" or "hf"."""
    from mcore_bridge import cli

    args = cli.build_parser().parse_args(argv)
    patch = {None: contextlib.nullcontext, "torch_dist": _scaled_torch_dist_write,
             "hf": _scaled_hf_write}[fault]
    with (patch(name, factor) if fault else patch([])) as hits:
        code = cli.cmd_export(args, argv)
    return {"code": code, "faulted": list(hits)}
