"""Stacked expert tensors: checkpoints that keep all experts of a layer in one ``[E, ...]`` tensor.

Most MoE checkpoints store one tensor per expert (``experts.{e}.gate_proj.weight``); some store
``experts.gate_up_proj`` ``[E, H, 2F]`` and ``experts.down_proj`` ``[E, F, H]`` (Qwen3-VL-MoE,
Llama-4 on disk; transformers keeps ``[E, 2F, H]`` / ``[E, H, F]`` in memory). Rather than a
second set of family rules, a stacked checkpoint is *viewed* as the per-expert one: each
per-expert name maps to a region of the stack, so loading reads only the rows of the experts (and
expert-TP slice) a rank holds; on export the per-expert tensors are stacked back as they stream.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator, Optional

import torch

from .hf_io import CheckpointError, TensorInfo

IN_OUT = "in_out"  # gate_up [E, H, 2F], down [E, F, H]  (Qwen3-VL-MoE / Llama-4 files)
OUT_IN = "out_in"  # gate_up [E, 2F, H], down [E, H, F]  (nn.Linear orientation)
ORIENTATIONS = (IN_OUT, OUT_IN)


@dataclasses.dataclass(frozen=True)
class ExpertView:
    """Per-expert tensor ``[rows, cols]`` (nn.Linear orientation) inside a stacked tensor."""

    stacked: str
    expert: int
    num_experts: int
    offset: int  # first row of this part (gate 0, up F) in the per-expert ``[2F or H, ...]`` frame
    shape: tuple[int, int]  # the per-expert tensor's shape
    orientation: str
    parts: int  # per-expert tensors sharing one expert's slot: 2 (gate, up) or 1 (down)

    def stacked_region(self, region) -> tuple:
        rows, cols = _resolve(region, self.shape)
        rows = slice(rows.start + self.offset, rows.stop + self.offset)
        e = slice(self.expert, self.expert + 1)
        return (e, rows, cols) if self.orientation == OUT_IN else (e, cols, rows)

    def from_stacked(self, piece: torch.Tensor) -> torch.Tensor:
        piece = piece[0]
        return piece if self.orientation == OUT_IN else piece.t()


def _resolve(region, shape) -> tuple[slice, slice]:
    region = tuple(region or ()) + (slice(None),) * (2 - len(region or ()))
    out = []
    for s, n in zip(region, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("stacked expert views support contiguous regions only")
        out.append(slice(start, stop))
    return out[0], out[1]


def view_table(family, orientation: str) -> dict[str, ExpertView]:
    """Per-expert HF name (the family's spelling) -> its place in the stacked tensors."""
    s = family.architecture.config
    hidden, ffn, experts = s["hidden_size"], s["moe_ffn_hidden_size"], family.num_experts
    gate, up, down = family.expert_hf
    gate_up, down_stacked = family.stacked_hf
    prefix = family.hf_layer_prefix
    out = {}
    for layer in range(family.num_layers):
        if not family.is_moe_layer(layer):
            continue
        p = prefix.format(L=layer)
        for e in range(experts):
            for name, offset in ((gate, 0), (up, ffn)):
                out[p + name.format(E=e)] = ExpertView(p + gate_up, e, experts, offset, (ffn, hidden),
                                                       orientation, 2)
            out[p + down.format(E=e)] = ExpertView(p + down_stacked, e, experts, 0, (hidden, ffn),
                                                   orientation, 1)
    return out


def stacked_shapes(family, orientation: str) -> dict[str, tuple[int, ...]]:
    """Stacked tensor name -> shape, for every MoE layer."""
    out = {}
    for v in view_table(family, orientation).values():
        rows = v.shape[0] * v.parts  # 2F for gate_up, H for down
        out[v.stacked] = (v.num_experts, rows, v.shape[1]) if orientation == OUT_IN else \
            (v.num_experts, v.shape[1], rows)
    return out


def detect(family, tensors: dict) -> Optional[str]:
    """The orientation of the stacked experts in ``tensors`` (name -> (shape, dtype)), or None
    when the checkpoint stores one tensor per expert."""
    if not getattr(family, "stacked_hf", None) or not family.num_experts:
        return None
    pattern = re.compile(re.escape(family.stacked_hf[0]) + "$")
    if not any(pattern.search(n) for n in tensors):
        return None
    for orientation in ORIENTATIONS:
        want = stacked_shapes(family, orientation)
        if all(n in tensors and tuple(tensors[n][0]) == shape for n, shape in want.items()):
            return orientation
    sample = next(n for n in tensors if pattern.search(n))
    raise CheckpointError(f"{sample}: stacked experts of shape {tuple(tensors[sample][0])} fit neither "
                          f"[E, H, 2F] nor [E, 2F, H] for this config (or some layers lack them)")


def open_checkpoint(ckpt, family):
    """``(checkpoint, orientation)``: ``ckpt`` itself for per-expert storage, else its per-expert view."""
    orientation = detect(family, {n: (i.shape, i.dtype) for n, i in ckpt.tensors.items()})
    if orientation is None:
        return ckpt, None
    return StackedCheckpoint(ckpt, view_table(family, orientation)), orientation


class StackedCheckpoint:
    """An HF checkpoint with stacked experts, presented under per-expert names (read-only)."""

    def __init__(self, ckpt, views: dict[str, ExpertView]):
        self.ckpt, self.views, self.path = ckpt, views, ckpt.path
        stacked = {v.stacked for v in views.values()}
        self.tensors = {n: i for n, i in ckpt.tensors.items() if n not in stacked}
        for name, v in views.items():
            info = ckpt.tensors[v.stacked]
            self.tensors[name] = TensorInfo(name, info.file, info.dtype, v.shape,
                                            info.nbytes // (v.num_experts * v.parts))

    def names(self):
        return list(self.tensors)

    def info(self, name):
        return self.tensors[name]

    def read(self, name: str, region=None) -> torch.Tensor:
        v = self.views.get(name)
        if v is None:
            return self.ckpt.read(name, region)
        return v.from_stacked(self.ckpt.read(v.stacked, v.stacked_region(region)))

    def close(self):
        self.ckpt.close()


def restack(stream: Iterable[tuple[str, torch.Tensor]], views: dict[str, ExpertView], shapes: dict
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-expert tensors in, stacked tensors out (each yielded once all its experts arrived);
    everything else passes through. Holds at most the stacks being filled (one layer's experts)."""
    filling: dict[str, tuple[torch.Tensor, set]] = {}
    for name, tensor in stream:
        v = views.get(name)
        if v is None:
            yield name, tensor
            continue
        if v.stacked not in filling:
            filling[v.stacked] = (tensor.new_empty(shapes[v.stacked]), set())
        buf, seen = filling[v.stacked]
        dst = buf[v.expert]
        rows = slice(v.offset, v.offset + v.shape[0])
        (dst[rows] if v.orientation == OUT_IN else dst[:, rows].t()).copy_(tensor)
        seen.add((v.expert, v.offset))
        if len(seen) == v.num_experts * v.parts:
            del filling[v.stacked]
            yield v.stacked, buf
    if filling:
        raise RuntimeError(f"stacked expert tensors left incomplete: {sorted(filling)}")
