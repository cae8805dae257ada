"""Stacked expert tensors: checkpoints that keep all experts of a layer in one ``[E, ...]`` tensor.

Most MoE checkpoints store one tensor per expert (``experts.{e}.gate_proj.weight``); some store
``experts.gate_up_proj`` ``[E, H, 2F]`` and ``experts.down_proj`` ``[E, F, H]`` (Qwen3-VL-MoE,
Llama-4 on disk; transformers keeps ``[E, 2F, H]`` / ``[E, H, F]`` in memory). Rather than a
second set of family rules, a stacked checkpoint is *viewed* as the per-expert one: each
per-expert name maps to a region of the stack, so loading reads only the rows of the experts (and
expert-TP slice) a rank holds; on export the per-expert tensors are stacked back as they stream.

Two properties of a stack are declared by the family (never inferred from its name): how gate and
up share the ``2F`` axis (``stacked_gate_up``: ``CONCATENATED`` ``[gate; up]`` or ``INTERLEAVED``,
gate on even and up on odd positions), and whether the experts' biases are stacked too
(``stacked_bias_hf``: ``[E, 2F]`` and ``[E, H]``, viewed as the per-expert ``expert_bias_hf``). An
interleaved part is read as the contiguous span that holds its rows, then every other row kept.
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
CONCATENATED = "concatenated"  # gate_up's 2F axis is [gate (F); up (F)]
INTERLEAVED = "interleaved"  # gate_up's 2F axis is gate, up, gate, up, ... (gate = even positions)
ARRANGEMENTS = (CONCATENATED, INTERLEAVED)


@dataclasses.dataclass(frozen=True)
class ExpertView:
    """Per-expert tensor ``[rows, cols]`` (nn.Linear orientation) or bias ``[rows]`` inside a
    stacked tensor. Row ``r`` of this part is row ``offset + r * stride`` of the expert's slot."""

    stacked: str
    expert: int
    num_experts: int
    offset: int  # first row of this part in the per-expert ``[2F or H, ...]`` frame
    shape: tuple[int, ...]  # the per-expert tensor's shape: (rows, cols), or (rows,) for a bias
    orientation: str
    parts: int  # per-expert tensors sharing one expert's slot: 2 (gate, up) or 1 (down)
    stride: int = 1  # 2 where gate and up interleave

    def _span(self, rows: slice) -> slice:
        """The contiguous stacked rows that hold this part's ``rows``."""
        if rows.stop <= rows.start:
            return slice(self.offset, self.offset)
        return slice(self.offset + rows.start * self.stride, self.offset + (rows.stop - 1) * self.stride + 1)

    def stacked_region(self, region) -> tuple:
        e = slice(self.expert, self.expert + 1)
        if len(self.shape) == 1:
            return e, self._span(_resolve(region, self.shape)[0])
        rows, cols = _resolve(region, self.shape)
        rows = self._span(rows)
        return (e, rows, cols) if self.orientation == OUT_IN else (e, cols, rows)

    def from_stacked(self, piece: torch.Tensor) -> torch.Tensor:
        piece = piece[0]
        if len(self.shape) == 1:
            return piece[::self.stride]
        if self.orientation != OUT_IN:
            piece = piece.t()
        return piece[::self.stride]

    def slot_rows(self) -> slice:
        """This part's rows in the expert's slot of the stack (for writing it back)."""
        return slice(self.offset, self.offset + self.shape[0] * self.stride, self.stride)


def _resolve(region, shape) -> list[slice]:
    region = tuple(region or ()) + (slice(None),) * (len(shape) - len(region or ()))
    out = []
    for s, n in zip(region, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("stacked expert views support contiguous regions only")
        out.append(slice(start, stop))
    return out


def view_table(family, orientation: str) -> dict[str, ExpertView]:
    """Per-expert HF name (the family's spelling) -> its place in the stacked tensors."""
    s = family.architecture.config
    hidden, ffn, experts = s["hidden_size"], s["moe_ffn_hidden_size"], family.num_experts
    arrangement = getattr(family, "stacked_gate_up", CONCATENATED)
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"{family.name}.stacked_gate_up={arrangement!r}: choose {', '.join(ARRANGEMENTS)}")
    # (offset, stride) of gate and up along the 2F axis
    gate_at, up_at = ((0, 1), (ffn, 1)) if arrangement == CONCATENATED else ((0, 2), (1, 2))
    stacks = [(family.expert_hf, family.stacked_hf, (ffn, hidden), (hidden, ffn))]
    if getattr(family, "stacked_bias_hf", None):
        stacks.append((family.expert_bias_hf, family.stacked_bias_hf, (ffn,), (hidden,)))
    prefixes = [family.hf_layer_prefix.format(L=layer) for layer in range(family.num_layers)
                if family.is_moe_layer(layer)]
    for k in range(getattr(family, "mtp_layers", 0)):  # MoE MTP layers stack their experts too (Qwen3.5-MoE's mtp.*)
        if family.is_moe_layer(family.mtp_rule_layer(k)):
            prefixes.append(family.mtp_hf_prefix(k))
    out = {}
    for p in prefixes:
        for (gate, up, down), (gate_up, down_stacked), fc1_shape, fc2_shape in stacks:
            for e in range(experts):
                for name, (offset, stride) in ((gate, gate_at), (up, up_at)):
                    out[p + name.format(E=e)] = ExpertView(p + gate_up, e, experts, offset, fc1_shape,
                                                           orientation, 2, stride)
                out[p + down.format(E=e)] = ExpertView(p + down_stacked, e, experts, 0, fc2_shape,
                                                       orientation, 1)
    return out


def stacked_shapes(family, orientation: str) -> dict[str, tuple[int, ...]]:
    """Stacked tensor name -> shape, for every MoE layer."""
    out = {}
    for v in view_table(family, orientation).values():
        rows = v.shape[0] * v.parts  # 2F for gate_up, H for down
        if len(v.shape) == 1:
            out[v.stacked] = (v.num_experts, rows)
        else:
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

    def row_range(self, name: str, region=None):
        """A stored tensor's byte range (``splice``); an expert's view of a stack has none."""
        return None if name in self.views else self.ckpt.row_range(name, region)

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
        rows = v.slot_rows()
        (dst[rows] if v.orientation == OUT_IN or dst.dim() == 1 else dst[:, rows].t()).copy_(tensor)
        seen.add((v.expert, v.offset))
        if len(seen) == v.num_experts * v.parts:
            del filling[v.stacked]
            yield v.stacked, buf
    if filling:
        raise RuntimeError(f"stacked expert tensors left incomplete: {sorted(filling)}")
