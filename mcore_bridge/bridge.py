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
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import hf_io as hfio
from . import lora as lora_
from . import stacked
from .errors import UsageError
from .export import Exporter, ExportUnit, Groups, balanced_writers, make_buckets, nbytes
from .families import family_for
from .layout import ParallelLayout
from .plan import MappingError, check_names, inventory, local_items
from .runtime import compat
from .runtime import dist as rt
from .transforms import ShapeMismatch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_SHARD_BYTES = 2 << 30


def progress(iterable, desc: str, total: Optional[int] = None):
    """A tqdm bar on rank 0 (stderr), silent elsewhere and when MCORE_BRIDGE_QUIET is set."""
    if rt.rank() != 0 or os.environ.get("MCORE_BRIDGE_QUIET"):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None)  # None: no bar when stderr is not a terminal


def resolve_source(model: str | os.PathLike) -> Path:
    """An HF directory, or ``builtin:NAME`` for a tiny model of the built-in zoo."""
    model = str(model)
    if model.startswith("builtin:"):
        from . import zoo

        return zoo.materialize(model.split(":", 1)[1])
    return Path(model)


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
    """

    def __init__(self, source, layout: ParallelLayout = ParallelLayout(), *, hf_config: dict | None = None,
                 hf_tensors: dict | None = None, side_files: Path | None = None,
                 expert_storage: str | None = None, allow_pickle: bool = False):
        if hf_config is None:
            self.source = resolve_source(source)
            self.hf = hfio.HFCheckpoint(self.source, allow_pickle=allow_pickle)
            hf_config = self.hf.config
            hf_tensors = {n: (i.shape, i.dtype) for n, i in self.hf.tensors.items()}
            side_files = self.source
        else:
            self.source, self.hf = Path(source) if source else None, None
        self.family = family_for(hf_config)
        if hf_tensors is not None:  # the checkpoint's naming, where a family allows several
            self.family.adapt(hf_tensors)
        if self.hf is not None:  # stacked experts: from here on seen as one tensor per expert
            self.hf, expert_storage = stacked.open_checkpoint(self.hf, self.family)
            hf_tensors = {n: (i.shape, i.dtype) for n, i in self.hf.tensors.items()}
        elif expert_storage is None and not getattr(self.family, "per_expert_storage", True):
            expert_storage = stacked.IN_OUT  # experts exist only stacked: as transformers saves them
        self.hf_config = hf_config
        self.hf_tensors = hf_tensors  # name -> (shape, dtype), per-expert names: the export target
        self.expert_storage = expert_storage  # how the source stores experts; export default
        self.side_files = side_files
        self.layout = layout
        layout.validate(**self.family.layout_dims())
        self.family.check_layout(layout)
        self.units = inventory(self.family, layout)
        if hf_tensors is not None:
            self.family.check_tensors(hf_tensors)
            check_names(self.units, set(hf_tensors), where=str(self.source))
        self.device = None
        self.lora: lora_.LoraSpec | None = None  # set by apply_lora / load_adapter
        self.adapter_family = self.lora_units = self.lora_hf_tensors = None

    # -- runtime -----------------------------------------------------------------------------
    def setup(self, device: str = "auto", *, reinit: bool | None = None) -> str:
        """Initialise torch.distributed and megatron's parallel state for this layout, or adopt
        the ones this process already has when they match it (``runtime.dist.setup``)."""
        self.device = rt.setup(self.layout, device, reinit=reinit)
        return self.device

    @functools.partial(_scoped, reinit=None)
    def build_model(self, dtype: torch.dtype | str = torch.float32, parallel_output: bool = True,
                    grouped_experts: bool = False) -> list:
        """This rank's model chunks. ``grouped_experts``: MoE experts in one grouped-GEMM module
        per layer (megatron-core 0.16's legacy GroupedMLP) instead of SequentialMLP."""
        from .model import build_model

        if self.device is None:
            self.setup()
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        return build_model(self.family, self.layout, dtype, self.device, parallel_output, grouped_experts)

    def _groups(self) -> Groups:
        if not dist.is_initialized():
            return Groups()
        from megatron.core import parallel_state as ps

        ep_group = ps.get_expert_model_parallel_group()
        pp_group = ps.get_pipeline_model_parallel_group()
        return Groups(
            pp_rank=ps.get_pipeline_model_parallel_rank(), tp=self.layout.tp,
            # replicas of the dense weights: the dp ranks and, within each, the context-parallel ranks
            tp_rank=ps.get_tensor_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            etp=self.layout.etp, etp_rank=ps.get_expert_tensor_parallel_rank(), ep=self.layout.ep,
            ep_rank=ps.get_expert_model_parallel_rank(), edp_rank=ps.get_expert_data_parallel_rank(),
            tp_group=ps.get_tensor_model_parallel_group(), etp_group=ps.get_expert_tensor_parallel_group(),
            ep_group=ep_group, pp_group=pp_group, pp_ranks=dist.get_process_group_ranks(pp_group),
            ep_ranks=dist.get_process_group_ranks(ep_group))

    def _state(self, models, lora: bool = False) -> dict:
        """(chunk, name) -> tensor: the base weights, or with ``lora`` the LoRA factors."""
        from .model import param_views

        return param_views(models, self.family, self.layout, lora)

    def _items(self, models, state, lora: bool = False):
        g = self._groups()
        names = [[n for (c, n) in state if c == chunk] for chunk in range(len(models))]
        if len(models) != self.layout.vpp:
            raise UsageError(f"expected {self.layout.vpp} model chunks (vpp), got {len(models)}")
        family, units = (self.adapter_family, self.lora_units) if lora else (self.family, self.units)
        items = local_items(family, self.layout, g.pp_rank, names, g.ep_rank)
        have = {it.unit.key for it in items}
        lacking = [u for u in units if g.holds(u.owner) and u.key not in have]
        if lacking:  # a model built for another layout or config: its HF tensors would go unused
            raise MappingError(f"the model on pp rank {g.pp_rank} has no parameter for "
                               f"{len(lacking)} unit(s) this layout gives it, e.g. {lacking[0].rule.mcore} "
                               f"(layer {lacking[0].layer}); was it built for this layout"
                               f"{' and with this LoRA' if lora else ''}?")
        return items

    # -- LoRA --------------------------------------------------------------------------------
    def _check_lora_support(self):
        if self.family.multimodal:
            raise lora_.AdapterError(f"LoRA on vision-language models ({self.family.name}) is not supported yet: "
                                     f"PEFT names their modules under model.language_model / model.visual, which "
                                     f"the adapter tables do not map; merge the adapter with PEFT first")

    def _set_lora(self, spec: "lora_.LoraSpec"):
        self.__dict__.pop("_plans", None)  # the model's modules change: plan anew
        self.lora = spec
        self.adapter_family = lora_.AdapterFamily(self.family, spec)
        self.lora_units = inventory(self.adapter_family, self.layout)
        self.lora_hf_tensors = {}
        for u in self.lora_units:
            for n in u.hf_names:
                shape, dtype = self.hf_tensors[lora_.base_hf_name(n)]
                self.lora_hf_tensors[n] = (lora_.factor_hf_shapes(n, spec.r, shape), dtype)

    @_scoped
    def apply_lora(self, models, spec: "lora_.LoraSpec", random_b: bool = False, freeze_base: bool = True):
        """Wrap the targeted linears of this rank's chunks in LoRA layers (``lora.LoraLinear``).
        The base weights keep their names for load/export; ``freeze_base``: only LoRA trains."""
        self._check_lora_support()
        if self.lora is not None:
            raise lora_.AdapterError("this model already has a LoRA adapter")
        if self.hf_tensors is None:
            raise UsageError("apply_lora needs the HF tensor shapes: build the Bridge from an HF source")
        self._set_lora(spec)
        self.lora_dtype = next(models[0].parameters()).dtype
        items = self._items(models, self._state(models))
        lora_.apply_lora(models, self.family, items, self._groups(), self.hf_tensors, spec, random_b, freeze_base)
        self._items(models, self._state(models, lora=True), lora=True)  # every factor has its parameter
        return models

    @_scoped
    def load_adapter(self, models, path):
        """Load a PEFT adapter directory into this rank's chunks (applying LoRA first if the model
        has none). q/k/v (gate/up) with different A matrices are kept exactly: stacked A and a
        block-structured B on the fused module."""
        from dataclasses import replace

        from .lora import peft_io

        self._check_lora_support()
        spec, ckpt = peft_io.open_adapter(path, self.family)
        spec = replace(spec, per_projection=self._distinct_a(ckpt, spec))
        if self.lora is None:
            self.apply_lora(models, spec)
        elif self.lora != spec:
            raise lora_.AdapterError(f"{path}: adapter {spec} does not match the model's LoRA {self.lora}")
        self._load(models, ckpt, lora=True)

    def _distinct_a(self, ckpt, spec) -> bool:
        """Whether any fused module's projections carry different A matrices in ``ckpt``."""
        names = set(ckpt.names())
        for u in inventory(lora_.AdapterFamily(self.family, spec), self.layout):
            if u.rule.transform.identical_sources and all(n in names for n in u.hf_names):
                first = ckpt.read(u.hf_names[0])
                if any(ckpt.info(n).shape != ckpt.info(u.hf_names[0]).shape or not torch.equal(ckpt.read(n), first)
                       for n in u.hf_names[1:]):
                    return True
        return False

    # -- load --------------------------------------------------------------------------------
    @_scoped
    def load_weights(self, models, hf_dir=None):
        """Fill this rank's model chunks from HF safetensors, reading only the needed slices."""
        rt.maybe_fail("load")  # tests only: MCORE_BRIDGE_FAULT (runtime/faults.py)
        ckpt = self.hf
        if hf_dir is not None:
            ckpt = stacked.open_checkpoint(hfio.HFCheckpoint(resolve_source(hf_dir)), self.family)[0]
        if ckpt is None:
            raise UsageError("load_weights: this bridge has no HF checkpoint; pass hf_dir")
        self._load(models, ckpt)

    def _load(self, models, ckpt, lora: bool = False):
        state = self._state(models, lora)
        g = self._groups()
        jobs, error = [], None
        try:
            check_names(self.lora_units if lora else self.units, set(ckpt.names()), where=str(ckpt.path))
            for item in self._items(models, state, lora):
                target = state[(item.chunk, item.param)]
                names = item.unit.hf_names
                shapes = [ckpt.info(n).shape for n in names]
                transform = item.unit.rule.transform
                _, tp, tp_rank = g.split(item.unit.rule)
                try:
                    expect = transform.local_shape(shapes, tp)
                    if expect is not None and tuple(expect) != tuple(target.shape):
                        raise ShapeMismatch(f"gives a shard of {tuple(expect)}, the model holds "
                                            f"{tuple(target.shape)}")
                    regions = transform.slices(shapes, tuple(target.shape), tp, tp_rank)
                except ShapeMismatch as e:
                    raise MappingError(f"{', '.join(names)} {shapes} -> {item.param}: {e}") from None
                jobs.append((item, target, names, regions, tp, tp_rank))
        except Exception as e:  # make every rank fail together, before any weight is read
            error = e
        if not rt.all_ok(error is None):
            raise error or RuntimeError("another rank rejected the checkpoint (see its error)")
        with torch.no_grad():
            for item, target, names, regions, tp, tp_rank in progress(jobs, "load"):
                pieces = [ckpt.read(n, r) for n, r in zip(names, regions)]
                item.unit.rule.transform.to_mcore_into(pieces, target, tp, tp_rank)
                del pieces  # let the mapped source pages go before the next read
        ckpt.close()

    # -- export ------------------------------------------------------------------------------
    def _exporter(self, models, dtype, lora: bool = False, merge: bool = False, tensor_of=None):
        """``lora``: export the LoRA factors (PEFT names); ``merge``: the base weights with the
        LoRA delta added in fp32, shard by shard, leaving the model untouched. ``tensor_of``:
        exports ``tensor_of(param)`` (same shape) instead of each parameter, e.g. its gradient."""
        if self.hf_tensors is None:
            raise UsageError("export needs the HF tensor shapes: build the Bridge from an HF source")
        if lora and self.lora is None:
            raise lora_.AdapterError("the model has no LoRA adapter to export (apply_lora / load_adapter)")
        state = self._state(models, lora)
        if tensor_of is not None:
            state = {k: tensor_of(t) for k, t in state.items()}
        g = self._groups()
        mine = {it.unit.key: it for it in self._items(models, state, lora)}
        hf_tensors = self.lora_hf_tensors if lora else self.hf_tensors
        if lora:
            dtype = dtype or self.lora_dtype
        if merge and self.lora is not None:
            state = lora_.MergedState(state, models, dtype)
        units = []
        for u in self.lora_units if lora else self.units:
            if not u.rule.export:
                continue
            shapes = [tuple(hf_tensors[n][0]) for n in u.hf_names]
            dtypes = [dtype or hf_tensors[n][1] for n in u.hf_names]
            units.append(ExportUnit(u, len(units), shapes, dtypes, mine.get(u.key)))
        device = next(iter(state.values())).device
        return Exporter(units, state, g, device), g

    def _stacking(self, expert_storage: str | None):
        """(views, stacked shapes) when exporting stacked experts, else None. ``expert_storage``:
        "source" (as the checkpoint stored them), "per_expert", or a ``stacked`` orientation."""
        storage = self.expert_storage if expert_storage == "source" else expert_storage
        if storage in (None, "per_expert") and self.family.num_experts and \
                not getattr(self.family, "per_expert_storage", True):
            raise UsageError(f"expert_storage={expert_storage!r}: {self.family.name} checkpoints hold their experts "
                             f"only stacked ({self.family.stacked_hf[0]}, ...), which transformers expects; "
                             f"one tensor per expert would not load: use source, "
                             f"{', '.join(stacked.ORIENTATIONS)}")
        if storage in (None, "per_expert"):
            return None
        if storage not in stacked.ORIENTATIONS:
            raise UsageError(f"expert_storage={expert_storage!r}: choose source, per_expert, "
                             f"{', '.join(stacked.ORIENTATIONS)}")
        if not self.family.num_experts:
            raise UsageError(f"expert_storage={storage!r}: {self.family.name} has no experts to stack")
        return stacked.view_table(self.family, storage), stacked.stacked_shapes(self.family, storage)

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
        ``expert_storage``: see ``_stacking`` (stacking needs every expert on the receiver).
        With a LoRA adapter: ``peft_format`` yields only the adapter's factors under HF module
        names (``...q_proj.lora_A.weight``); otherwise the weights, merged with the adapter in fp32
        unless ``merge_lora=False``. ``tensor_of(param)``: export that tensor of each parameter instead
        (e.g. its gradient: ``verify.grad``), through the same plan. Collective: all ranks must
        iterate it to the end."""
        exporter, recv, buckets = self._sync_plan(models, dtype, bucket_bytes, all_ranks, merge_lora, peft_format,
                                                  receivers, tensor_of)
        stacking = None if peft_format else self._stacking(expert_storage)
        if stacking and recv is None and self.layout.ep > 1:
            raise UsageError("stacked experts need every expert on the receiving rank: use all_ranks=True "
                             "or expert_storage='per_expert' with ep > 1")
        with torch.no_grad():
            stream = self._bucket_stream(exporter, buckets, recv)
            if device is not None:
                from . import sync

                stream = sync.to_device(stream, device)
            stream = (nt for _, ts, _ in stream if ts for nt in ts)
            yield from stacked.restack(stream, *stacking) if stacking else stream

    @_scoped_iter
    def export_buckets(self, models, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None,
                       receivers="all", device=None, merge_lora: bool = True, peft_format: bool = False):
        """Yield ``sync.Bucket`` (a flat uint8 buffer + names/shapes/dtypes/offsets) on the
        receiving ranks, for transport to an engine process (CUDA IPC, NCCL broadcast); there
        ``sync.unpack_bucket`` restores ``(name, tensor)``. Experts stay one tensor per expert.
        At most one bucket is in flight per rank. Collective: every rank iterates to the end."""
        from . import sync

        exporter, recv, buckets = self._sync_plan(models, dtype, bucket_bytes, True, merge_lora, peft_format,
                                                  receivers)
        with torch.no_grad():
            stream = self._bucket_stream(exporter, buckets, recv)
            yield from sync.buckets_from(sync.to_device(stream, device) if device is not None else stream)

    def _sync_plan(self, models, dtype, bucket_bytes, all_ranks, merge_lora, peft_format, receivers, tensor_of=None):
        """(exporter, receivers, buckets), planned once per model and options: an RL loop syncing
        every step pays for the plan only on its first step."""
        from . import sync

        recv = sync.resolve_receivers(receivers, rt.world_size()) if receivers is not None else (
            "all" if all_ranks else None)
        merge = merge_lora and not peft_format and tensor_of is None
        key = (tuple(id(m) for m in models), dtype, peft_format, merge, bucket_bytes)
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans or tensor_of is not None:  # other tensors: planned afresh, not kept
            exporter, _ = self._exporter(models, dtype, lora=peft_format, merge=merge, tensor_of=tensor_of)
            if tensor_of is not None:
                return exporter, recv, make_buckets(exporter.units, bucket_bytes)
            plans.clear()  # one plan kept: models are rebuilt rarely, options change rarely
            plans[key] = exporter, make_buckets(exporter.units, bucket_bytes)
        exporter, buckets = plans[key]
        return exporter, recv, buckets

    def _bucket_stream(self, exporter, buckets, recv):
        world = rt.world_size()
        if isinstance(recv, list) and world == 1:
            recv = "all"

        def owner_rank(owner):
            stage, ep_owner = owner
            if ep_owner is None:
                return self.layout.stage_rank(world, stage)
            return self.layout.expert_rank(world, stage, ep=ep_owner)

        leaders = None
        if isinstance(recv, list) and len(recv) > 1:
            groups = self.__dict__.setdefault("_leader_groups", {})
            if tuple(recv) not in groups:  # collective: every rank creates it, once per set
                groups[tuple(recv)] = dist.new_group(recv)
            leaders = groups[tuple(recv)]
        return exporter.iterate_buckets(buckets, recv, owner_rank=owner_rank, leaders=leaders)

    @_scoped
    def save_weights(self, models, out_dir, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                     expert_storage: str | None = "source", merge_lora: bool = True, peft_format: bool = False,
                     peft_experts: str = "parameters"):
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
        """
        out_dir = Path(out_dir).absolute()
        if peft_format:
            return self._save_adapter(models, out_dir, dtype, overwrite, bucket_bytes, peft_experts)
        exporter, g = self._exporter(models, dtype, merge=merge_lora)
        world = rt.world_size()
        tp_writer = balanced_writers(exporter.units, g)

        def writer(u: ExportUnit) -> int:  # global rank of the first replica's writing rank
            stage, ep_owner = u.unit.owner
            if ep_owner is None:
                return self.layout.stage_rank(world, stage, tp=tp_writer[u.index])
            return self.layout.expert_rank(world, stage, etp=tp_writer[u.index], ep=ep_owner)

        stacking = self._stacking(expert_storage)
        outputs = {}  # output name -> (bytes, writer), in export order
        for u in exporter.units:
            for n, s, d in zip(u.unit.hf_names, u.hf_shapes, u.out_dtypes):
                view = stacking[0].get(n) if stacking else None
                if view is None:
                    outputs[n] = (nbytes(s, d), writer(u))
                elif view.stacked not in outputs:
                    outputs[view.stacked] = (nbytes(stacking[1][view.stacked], d), writer(u))
        sizes = {n: b for n, (b, _) in outputs.items()}
        files = hfio.plan_shards(((n, b, w) for n, (b, w) in outputs.items()), max_shard_bytes)
        mine = [f for f in files if f["writer"] == rt.rank()]

        def finalize(stage: Path):
            hfio.write_index(stage, files, sizes)
            hfio.copy_side_files(self.side_files, stage, self.hf_config)

        with hfio.collective_output(out_dir, overwrite, finalize) as stage:
            rt.maybe_fail("save")  # tests only: MCORE_BRIDGE_FAULT (runtime/faults.py)
            pending = {n: f for f in mine for n in f["names"]}
            filled: dict[str, dict] = {f["file"]: {} for f in mine}
            if stacking:
                stream = stacked.restack(exporter.iterate(make_buckets(exporter.units, bucket_bytes), True),
                                         *stacking)
            else:
                stream = exporter.iterate(make_buckets(exporter.units, bucket_bytes, tp_writer), all_stages=False,
                                          writer=tp_writer)
            for name, tensor in progress(stream, "save", total=sum(len(f["names"]) for f in mine)):
                f = pending.get(name)
                if f is None:
                    continue
                filled[f["file"]][name] = tensor.cpu()
                if len(filled[f["file"]]) == len(f["names"]):
                    hfio.write_shard(stage / f["file"], filled.pop(f["file"]))
            if filled:
                raise RuntimeError(f"rank {rt.rank()}: shards never completed: {sorted(filled)}")
        return out_dir


    def _save_adapter(self, models, out_dir: Path, dtype, overwrite: bool, bucket_bytes: int, experts: str):
        """The adapter reaches rank 0 (it is small), which writes the PEFT directory."""
        from .lora import peft_io

        exporter, g = self._exporter(models, dtype, lora=True)
        with hfio.collective_output(out_dir, overwrite) as stage:
            tensors = {}
            for name, t in exporter.iterate(make_buckets(exporter.units, bucket_bytes), all_stages=True):
                if rt.rank() == 0:
                    tensors[name] = t.cpu()
            if rt.rank() == 0:
                peft_io.write_adapter(stage, tensors, self.adapter_family, str(self.source) if self.source else None,
                                      experts)
        return out_dir
