"""The public API: ``Bridge(model_dir, layout)`` with ``build_model``, ``load_weights``,
``export_weights`` and ``save_weights``.

A guest in a trainer's process: with ``layout=ParallelLayout.from_parallel_state(models)`` the bridge
adopts the torch.distributed and megatron parallel state the trainer created (``setup`` keeps
them; a layout that does not match is an error) and communicates over megatron's groups (tp, pp,
ep, etp) plus, for ``receivers=[...]`` syncs, one group per receiver set that it creates once and
keeps. Every entry point runs inside ``runtime.compat.scope`` and leaves the process as it found it
(generators leave the scope while the caller holds an item).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from . import lora as lora_
from . import quant, stacked
from .bridge_parts.adapters import AdapterState
from .bridge_parts.loader import Loader, progress
from .bridge_parts.local import LocalPlan
from .bridge_parts.reader import CheckpointReader, resolve_source
from .bridge_parts.syncplan import SyncPlanner
from .bridge_parts.writer import Writer
from .errors import UsageError
from .layout import ParallelLayout
from .plan import check_names, inventory
from .runtime import compat
from .runtime import dist as rt

__all__ = ["Bridge", "DTYPES", "DEFAULT_BUCKET_BYTES", "DEFAULT_SHARD_BYTES", "progress", "resolve_source"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_SHARD_BYTES = 2 << 30


def _device_of(bridge, reinit: bool | None = False) -> str:
    """The device whose adaptations an entry point needs. With torch.distributed up and no
    ``setup`` yet, sets up first: adopts a matching parallel state (a mismatch is an error;
    ``reinit=None``, for ``build_model`` only: the process's policy, see ``dist.allow_reinit``)."""
    if bridge.device is None and dist.is_initialized():
        bridge.setup(reinit=reinit)
    return bridge.device or rt.resolve_device("auto")


def _scoped(method, reinit: bool | None = False):
    """Run a public method inside ``compat.scope`` (the process is unchanged afterwards)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with compat.scope(_device_of(self, reinit)):
            return method(self, *args, **kwargs)
    return run


def _scoped_iter(method):
    """Like ``_scoped`` for a generator: in the scope while it computes, out of it at each yield."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return compat.scoped_iter(method(self, *args, **kwargs), _device_of(self))
    return run



class Bridge:
    """Converts between one HF model and megatron-core models sharded by ``layout``.

    ``source`` is an HF directory (config + safetensors) or ``builtin:NAME``. The layout is
    validated against the model here, before any weight is read. MoE checkpoints that stack their
    experts (``experts.gate_up_proj [E, ...]``) are read through per-expert views and exported in
    the same storage unless told otherwise (``expert_storage``: ``stacked.IN_OUT``/``OUT_IN``, or
    None for one tensor per expert).

    A facade over its parts (``bridge_parts``), each public for the tools built on it:
    ``reader`` (the HF checkpoint and its views), ``local`` (this rank's parameters and plan items),
    ``adapters`` (the LoRA lifecycle), ``loader``, ``writer`` (export plans, HF and PEFT output)
    and ``syncplan`` (kept plans of RL weight syncs).
    """

    def __init__(self, source, layout: ParallelLayout = ParallelLayout(), *, hf_config: dict | None = None,
                 hf_tensors: dict | None = None, side_files: Path | None = None,
                 expert_storage: str | None = None, allow_pickle: bool = False):
        self.reader = CheckpointReader(source, hf_config=hf_config, hf_tensors=hf_tensors, side_files=side_files,
                                       expert_storage=expert_storage, allow_pickle=allow_pickle)
        family, hf_tensors = self.reader.family, self.reader.hf_tensors
        self.layout = layout
        layout.validate(**family.layout_dims())
        family.check_layout(layout)
        self.units = inventory(family, layout)
        if hf_tensors is not None:
            family.check_tensors(hf_tensors)
            check_names(self.units, set(hf_tensors), where=str(self.reader.source))
        self.device = None
        self.adapters = AdapterState(family, layout, hf_tensors)
        self.local = LocalPlan(family, layout, self.units, self.adapters)
        self.loader = Loader(self.local)
        self.writer = Writer(self.reader, layout, self.local, self.adapters)
        self.syncplan = SyncPlanner(layout, self.writer)

    # -- what the parts hold, under the names the API has always had --------------------------------
    source = property(lambda self: self.reader.source)
    hf = property(lambda self: self.reader.hf)  # the opened checkpoint (views included), or None
    family = property(lambda self: self.reader.family)
    hf_config = property(lambda self: self.reader.hf_config)
    hf_tensors = property(lambda self: self.reader.hf_tensors)  # name -> (shape, dtype): the export target
    expert_storage = property(lambda self: self.reader.expert_storage)  # how the source stores experts
    side_files = property(lambda self: self.reader.side_files)
    lora = property(lambda self: self.adapters.spec)  # the LoRA spec, set by apply_lora / load_adapter
    adapter_family = property(lambda self: self.adapters.family)
    lora_units = property(lambda self: self.adapters.units)
    lora_hf_tensors = property(lambda self: self.adapters.hf_tensors)
    lora_dtype = property(lambda self: self.adapters.dtype)

    def state(self, models, lora: bool = False) -> dict:
        """(chunk, name) -> tensor of this rank's chunks: the base weights, or with ``lora`` the LoRA factors."""
        return self.local.state(models, lora)

    # -- runtime -----------------------------------------------------------------------------
    def setup(self, device: str = "auto", *, reinit: bool | None = None) -> str:
        """Initialise torch.distributed and megatron's parallel state for this layout, or adopt
        the ones this process already has when they match it (``runtime.dist.setup``)."""
        self.device = rt.setup(self.layout, device, reinit=reinit)
        return self.device

    def source_dtype(self) -> torch.dtype:
        """The dtype in which a model built from this checkpoint holds every weight exactly: the one
        floating dtype of the tensors that become megatron parameters, fp32 where they mix (e.g. a
        router saved in fp32 beside bf16 weights: megatron casts the router to the model's dtype).
        Tensors megatron keeps in fp32 whatever the model's dtype (the family's ``fp32_in_megatron``) do
        not count: DeepSeek-V3's fp32 ``e_score_correction_bias`` beside bf16 weights gives a bf16 model,
        not an fp32 one of twice the memory."""
        fixed = {n for u in self.units if u.rule.mcore.endswith(self.family.fp32_in_megatron) for n in u.hf_names}
        dtypes = {d for n, (_, d) in (self.hf_tensors or {}).items() if d.is_floating_point and n not in fixed}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def fp8_plan(self, dtype, peft_format: bool = False):
        """``quant.export_plan`` for this checkpoint: a bf16 source exported as FP8 leaves the
        family's ``fp8_unquantized`` tensors (e.g. the copies of unquantised ones) as they are."""
        return quant.export_plan(self.hf, self.hf_tensors, self.hf_config, dtype, peft_format,
                                 keep=self.family.fp8_unquantized())

    @functools.partial(_scoped, reinit=None)
    def build_model(self, dtype: torch.dtype | str = torch.float32, parallel_output: bool = True,
                    grouped_experts: bool = False, training=None) -> list:
        """This rank's model chunks. ``grouped_experts``: MoE experts in one grouped-GEMM module
        per layer (megatron-core 0.16's legacy GroupedMLP) instead of SequentialMLP. ``training``:
        ``TrainOptions`` (recomputation, MoE training options, frozen parts)."""
        from .model import build_model

        if self.device is None:
            self.setup()
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        return build_model(self.family, self.layout, dtype, self.device, parallel_output, grouped_experts,
                           training)

    # -- LoRA --------------------------------------------------------------------------------
    @_scoped
    def apply_lora(self, models, spec: "lora_.LoraSpec", random_b: bool = False, freeze_base: bool = True):
        """Wrap the targeted linears of this rank's chunks in LoRA layers (``lora.LoraLinear``).
        The base weights keep their names for load/export; ``freeze_base``: only LoRA trains."""
        self.syncplan.forget()  # the model's modules change: plan anew
        return self.adapters.apply(self.local, models, spec, random_b, freeze_base)

    @_scoped
    def load_adapter(self, models, path):
        """Load a PEFT adapter directory into this rank's chunks (applying LoRA first if the model
        has none). q/k/v (gate/up) with different A matrices are kept exactly: stacked A and a
        block-structured B on the fused module."""
        spec, ckpt = self.adapters.open(path)
        if self.lora is None:
            self.apply_lora(models, spec)
        elif self.lora != spec:
            raise lora_.AdapterError(f"{path}: adapter {spec} does not match the model's LoRA {self.lora}")
        self.loader.load(models, ckpt, lora=True)

    # -- load --------------------------------------------------------------------------------
    @_scoped
    def load_weights(self, models, hf_dir=None, spliced: dict | None = None):
        """Fill this rank's model chunks from HF safetensors, reading only the needed slices.
        ``spliced`` (a dict, for a conversion that only writes the model out): the parameters that
        are whole rows of the source files are left unwritten and go there as ``splice.Runs``, which
        ``checkpoint.save_mcore(..., spliced=)`` copies file to file."""
        rt.maybe_fail("load")  # tests only: MCORE_BRIDGE_FAULT (runtime/faults.py)
        ckpt = self.hf if hf_dir is None else self.reader.open(hf_dir)
        if ckpt is None:
            raise UsageError("load_weights: this bridge has no HF checkpoint; pass hf_dir")
        self.loader.load(models, ckpt, spliced=spliced)

    # -- export ------------------------------------------------------------------------------
    @_scoped_iter
    def export_weights(self, models, dtype: torch.dtype | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       all_ranks: bool = True, expert_storage: str | None = "source", merge_lora: bool = True,
                       peft_format: bool = False, receivers=None, device=None, tensor_of=None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` with the checkpoint's names, shapes and (unless ``dtype``)
        dtypes -- what vLLM's ``model.load_weights`` takes. ``receivers`` (see ``sync``): "all"
        ranks, one rank per "node", one global "rank" (0, or an int) or a list of ranks; the
        others yield nothing. Without it, ``all_ranks=False`` makes each pipeline stage yield its
        own tensors. ``device``: move tensors there (e.g. "cpu"); default: the model's device.
        ``expert_storage``: see ``Writer.stacking`` (stacking needs every expert on the receiver).
        With a LoRA adapter: ``peft_format`` yields only the adapter's factors under HF module
        names (``...q_proj.lora_A.weight``); otherwise the weights, merged with the adapter in fp32
        unless ``merge_lora=False``. ``tensor_of(param)``: export that tensor of each parameter instead
        (e.g. its gradient: ``verify.grad``), through the same plan. ``dtype="fp8"``: blockwise FP8
        (``quant``) with ``_scale_inv`` tensors. Collective: all ranks must iterate it to the end."""
        dtype, fp8 = self.fp8_plan(dtype, peft_format)
        exporter, recv, buckets = self.syncplan.plan(models, dtype, bucket_bytes, all_ranks, merge_lora, peft_format,
                                                     receivers, tensor_of)
        stacking = None if peft_format else self.writer.stacking(expert_storage)
        if stacking and recv is None and self.layout.ep > 1:
            raise UsageError("stacked experts need every expert on the receiving rank: use all_ranks=True "
                             "or expert_storage='per_expert' with ep > 1")
        with torch.no_grad():
            stream = self.syncplan.stream(exporter, buckets, recv)
            if device is not None:
                from . import sync

                stream = sync.to_device(stream, device)
            stream = (nt for _, ts, _ in stream if ts for nt in ts)
            yield from quant.quantize_stream(stacked.restack(stream, *stacking) if stacking else stream, fp8)

    @_scoped_iter
    def export_buckets(self, models, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None,
                       receivers="all", device=None, merge_lora: bool = True, peft_format: bool = False):
        """Yield ``sync.Bucket`` (a flat uint8 buffer + names/shapes/dtypes/offsets) on the
        receiving ranks, for transport to an engine process (CUDA IPC, NCCL broadcast); there
        ``sync.unpack_bucket`` restores ``(name, tensor)``. Experts stay one tensor per expert.
        At most one bucket is in flight per rank. Collective: every rank iterates to the end."""
        from . import sync

        dtype, fp8 = self.fp8_plan(dtype, peft_format)
        exporter, recv, buckets = self.syncplan.plan(models, dtype, bucket_bytes, True, merge_lora, peft_format,
                                                     receivers)
        with torch.no_grad():
            stream = quant.quantize_buckets(self.syncplan.stream(exporter, buckets, recv), fp8)
            yield from sync.buckets_from(sync.to_device(stream, device) if device is not None else stream)

    @_scoped
    def save_weights(self, models, out_dir, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                     expert_storage: str | None = "source", merge_lora: bool = True, peft_format: bool = False,
                     peft_experts: str = "parameters", spliced: dict | None = None):
        """Write HF safetensors shards + index + config (+ tokenizer files) into ``out_dir``.

        With a LoRA adapter on the model: ``peft_format`` writes the adapter alone as a PEFT
        directory (``adapter_model.safetensors`` + ``adapter_config.json``; routed experts as
        ``peft_experts``: stacked "parameters" for transformers 5, or per-expert "modules"),
        otherwise the weights merged with it (fp32, in the export stream) unless ``merge_lora=False``.

        Each tensor is written by one rank holding it: TP (or expert-TP) ranks take turns, each
        expert-parallel rank writes its own experts, data-parallel replicas other than the first
        write nothing. Stacked experts (``expert_storage``, default: as the source) are assembled
        from every rank's experts, so that stream reaches every rank. Everything is assembled in a
        staging directory that is renamed into place only after every rank succeeded.

        ``spliced`` (from ``checkpoint.load_mcore(..., spliced=)``): parameters left unread, whose
        HF tensors are copied from the checkpoint's files where they are whole rows of them
        (``unsplice``; the rest are read first). Collective.
        """
        out_dir = Path(out_dir).absolute()
        dtype, fp8 = self.fp8_plan(dtype, peft_format)
        if peft_format:
            if spliced:
                from . import unsplice

                unsplice.materialize(self.state(models), spliced)
            return self.writer.save_adapter(models, out_dir, dtype, overwrite, bucket_bytes, peft_experts)
        return self.writer.save(models, out_dir, dtype, overwrite, max_shard_bytes, bucket_bytes, expert_storage,
                                merge_lora, fp8, spliced)
