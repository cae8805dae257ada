"""Engine side: buckets received from a ``Sender`` and loaded into a transformers model (or
handed to a ``load_weights``-style callback), with strict accounting per step.

Accounting: every expected tensor (by default: every parameter and persistent buffer of the
engine model, tied ones once, stacked experts as their per-expert checkpoint names) must arrive
exactly once per step. Each bucket is checked before any of it is loaded (a name the engine does
not have, one that arrived already, a shape that differs, an FP8 weight without its scale: the
step fails naming it, with that bucket unloaded); a tensor that never arrived is named at the end
of the step. After a failed step ``complete`` is False: the model may hold a mix of two steps'
weights and must not serve until a step completes.

No megatron import here: an engine process needs torch, transformers and this package.
"""

from __future__ import annotations

import time

import torch

from ..errors import UsageError
from ..stacked import OUT_IN
from ..sync import unpack_bucket
from .sender import ABORT, BEGIN, BUCKET, END

PEFT_PREFIX = "base_model.model."
SCALE = "_scale_inv"
FP8_MODES = ("dequantize", "keep")


class SyncError(RuntimeError):
    """A step's tensors did not add up: the message names the tensor(s) or bucket."""


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class ModelTargets:
    """HF checkpoint name -> where it goes in a transformers (or PEFT) model. ``lora``: the LoRA
    factors of a PEFT model under their saved names (``...q_proj.lora_A.weight``)."""

    def __init__(self, model, lora: bool = False, adapter: str = "default"):
        self.model, self.lora = model, lora
        self.plain: dict[str, torch.Tensor] = {}
        self.experts: dict[str, tuple] = {}  # per-expert name -> (stacked parameter, stacked.ExpertView)
        if lora:
            for name, p in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    self.plain[self.hf_name(name.replace(f".{adapter}.", "."))] = p
            if not self.plain:
                raise UsageError("Receiver(lora=True): the engine model has no LoRA factors (wrap it with "
                                 "peft.get_peft_model first)")
            return
        params = dict(model.named_parameters())  # tied parameters once, under their first name
        every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        state = model.state_dict(keep_vars=True)
        self.plain = dict(params)
        self.plain.update({n: b for n, b in state.items() if n not in every})  # persistent buffers
        for name, (param, view) in self._expert_views(model, params).items():
            self.experts[name] = (param, view)
        for param, view in self.experts.values():
            self.plain.pop(view.stacked, None)

    @staticmethod
    def hf_name(name: str) -> str:
        return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name

    @staticmethod
    def _expert_views(model, params) -> dict:
        """Per-expert checkpoint names of the model's stacked expert parameters, in the orientation
        whose shapes they have (transformers 5: ``[E, 2F, H]`` / ``[E, H, F]`` for most families)."""
        config = getattr(model, "config", None)
        if config is None:
            return {}
        from .. import stacked
        from ..families import family_for

        family = family_for(config.to_dict())
        if not family.num_experts or not getattr(family, "stacked_hf", None):
            return {}
        stacked_names = sorted(set(stacked.stacked_shapes(family, OUT_IN)) & set(params))
        if not stacked_names:  # one module per expert: the checkpoint's names as they are
            return {}
        for orientation in stacked.ORIENTATIONS:
            shapes = stacked.stacked_shapes(family, orientation)
            if shapes and all(n in params and tuple(params[n].shape) == tuple(s) for n, s in shapes.items()):
                return {name: (params[v.stacked], v) for name, v in stacked.view_table(family, orientation).items()}
        raise UsageError(f"engine model: stacked expert parameters ({_short(stacked_names)}) match neither "
                         f"orientation of the {family.name} expert layout; pass expected= and load= to the Receiver")

    def expected(self) -> set[str]:
        return set(self.plain) | set(self.experts)

    def shape(self, name: str) -> tuple | None:
        if name in self.plain:
            return tuple(self.plain[name].shape)
        if name in self.experts:
            return tuple(self.experts[name][1].shape)
        return None

    @torch.no_grad()
    def load(self, named: list[tuple[str, torch.Tensor]]):
        for name, t in named:
            if name in self.plain:
                self.plain[name].copy_(t)
            else:
                param, v = self.experts[name]
                dst, rows = param[v.expert], v.slot_rows()  # as stacked.restack writes a stack
                (dst[rows] if v.orientation == OUT_IN or dst.dim() == 1 else dst[:, rows].t()).copy_(t)


class Receiver:
    """An engine rank of ``group``. ``receive()`` takes one step (blocking) and returns its stats.

    ``model``: the engine's transformers model (a PEFT model for ``lora=True``), loaded in place;
    or ``load(named)``, a ``load_weights``-style callback taking a list of ``(name, tensor)``
    (views into the receive buffer, valid during the call) with ``expected``, the set of names a
    step must deliver. ``fp8``: "dequantize" (FP8 weights arrive as bf16 ``q * scale`` per block)
    or "keep" (the FP8 tensor and its ``_scale_inv`` go to ``load`` as they are; needs ``load``)."""

    def __init__(self, group, model=None, *, load=None, expected=None, fp8: str = "dequantize",
                 lora: bool = False, adapter: str = "default"):
        if group.rank == 0:
            raise UsageError("Receiver: rank 0 of the transport group is the trainer's sender; engines are ranks >= 1")
        if fp8 not in FP8_MODES:
            raise UsageError(f"fp8={fp8!r}: choose {', '.join(FP8_MODES)}")
        if (model is None) == (load is None):
            raise UsageError("Receiver: pass either model= (loaded in place) or load= with expected=")
        if load is not None and expected is None:
            raise UsageError("Receiver(load=...): pass expected=, the names every step must deliver")
        if fp8 == "keep" and load is None:
            raise UsageError("Receiver(fp8='keep'): a transformers model cannot hold FP8 weights in place; pass "
                             "load= (the engine's FP8 loader) or fp8='dequantize'")
        self.group, self.fp8, self.lora = group, fp8, lora
        self.targets = ModelTargets(model, lora, adapter) if model is not None else None
        self.expected = {ModelTargets.hf_name(n) for n in expected} if expected is not None else \
            self.targets.expected()
        self._load = load or self.targets.load
        self.complete = False
        self.step = 0

    def receive(self) -> dict:
        g = self.group
        t0 = time.perf_counter()
        self.complete = False
        kind, step, info, _ = g.recv_message()
        if kind != BEGIN:
            raise SyncError(f"transport out of step: expected the start of a step, got message kind {kind}")
        fmt, block = info["format"], info.get("fp8_block")
        kind_of_step = f"{fmt}/{'fp8' if block else 'as-exported'}"
        if (fmt == "lora") != self.lora:
            raise SyncError(f"step {step} carries {fmt!r} tensors but this Receiver was made with lora={self.lora}")
        seen: set[str] = set()
        count = total = 0
        error = None
        while True:
            kind, index, info, buf = g.recv_message()
            if kind == END:
                break
            if kind == ABORT:
                raise SyncError(f"step {step}: the trainer failed after {index} bucket(s) ({info['error']}); the "
                                f"model holds a mix of two steps' weights until a step completes")
            if kind != BUCKET:
                raise SyncError(f"step {step}: unexpected message kind {kind}")
            if info is not None:
                g.metas[(kind_of_step, index)] = info
            meta = g.metas.get((kind_of_step, index))
            count += 1
            if meta is None and error is None:
                error = SyncError(f"step {step}, bucket {index}: no metadata (the sender assumed it was kept)")
            if error is None:  # after a failure: drain the step (the transport stays in step), load nothing
                total += meta["nbytes"]
                try:
                    named = self._checked(unpack_bucket(buf, meta), seen, step, index, block)
                    self._load(named)
                except Exception as e:  # noqa: BLE001 -- raised once the step is drained
                    error = e
            g.release()  # the buffer may be refilled (colocated: the trainer's slot)
        if error is not None:
            raise error
        if info["buckets"] != count:
            raise SyncError(f"step {step}: {count} buckets arrived, the sender sent {info['buckets']}")
        missing = self.expected - seen
        if missing:
            raise SyncError(f"step {step}: {len(missing)} expected tensor(s) never arrived: {_short(missing)} "
                            f"(a bucket was dropped or the trainer exports other names)")
        if g.device.type == "cuda":
            torch.cuda.current_stream(g.device).synchronize()
        self.complete = True
        self.step = step
        return {"step": step, "buckets": count, "bytes": total, "tensors": len(seen),
                "seconds": time.perf_counter() - t0}

    def _checked(self, named, seen: set, step: int, index: int, block) -> list:
        """The bucket's tensors to load (FP8 dequantised unless kept); raises before loading any."""
        where = f"step {step}, bucket {index}"
        names = [ModelTargets.hf_name(n) for n, _ in named]
        tensors = dict(zip(names, (t for _, t in named)))
        scales = {n for n in names if n.endswith(SCALE)}
        for n in scales:
            base = n[:-len(SCALE)]
            if base not in tensors or tensors[base].dtype != torch.float8_e4m3fn:
                raise SyncError(f"{where}: scale {n} arrived without its FP8 tensor {base} in the same bucket")
        out = []
        for n in names:
            if n in scales:
                if self.fp8 == "keep":
                    out.append((n, tensors[n]))
                continue
            t = tensors[n]
            if n in seen:
                raise SyncError(f"{where}: {n} arrived twice in one step")
            if n not in self.expected:
                raise SyncError(f"{where}: {n} is not a tensor of the engine model (expected names like "
                                f"{_short(list(self.expected)[:3])}); the trainer and engine models differ")
            if t.dtype == torch.float8_e4m3fn:
                if n + SCALE not in tensors:
                    raise SyncError(f"{where}: FP8 tensor {n} arrived without {n + SCALE}")
                if self.fp8 == "dequantize":
                    if not block:
                        raise SyncError(f"{where}: FP8 tensor {n} but the step declared no fp8_block")
                    from ..quant import dequantize_fp8

                    t = dequantize_fp8(t, tensors[n + SCALE], tuple(block))
            want = self.targets.shape(n) if self.targets is not None else None
            if want is not None and tuple(t.shape) != want:
                raise SyncError(f"{where}: {n} has shape {tuple(t.shape)}, the engine model's is {want}")
            seen.add(n)
            out.append((n, t))
        return out
