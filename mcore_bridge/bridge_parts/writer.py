"""The writer: export plans (``Exporter``), HF safetensors directories and PEFT adapter directories."""

from __future__ import annotations

from pathlib import Path

from .. import hf_io as hfio
from .. import quant, stacked
from ..errors import UsageError
from ..export import Exporter, ExportUnit, balanced_writers, make_buckets, nbytes
from ..runtime import dist as rt
from ..shard_writer import BackgroundWriter
from ..splice import Runs
from .loader import progress


class Writer:
    """Exports this rank's chunks in HF names, shapes and dtypes. ``reader``: the bridge's
    ``CheckpointReader`` (tensor table, expert storage, side files); ``local``: its ``LocalPlan``;
    ``adapters``: its ``AdapterState``."""

    def __init__(self, reader, layout, local, adapters):
        self.reader, self.layout, self.local, self.adapters = reader, layout, local, adapters

    def exporter(self, models, dtype=None, lora: bool = False, merge: bool = False, tensor_of=None,
                 spliced: dict | None = None, as_runs: bool = False):
        """(``export.Exporter``, ``export.Groups``) over every exported unit of the model.
        ``lora``: the LoRA factors (PEFT names); ``merge``: the base weights with the LoRA delta
        added in fp32, shard by shard, leaving the model untouched. ``tensor_of``: exports
        ``tensor_of(param)`` (same shape) instead of each parameter, e.g. its gradient.
        ``spliced``, ``as_runs``: see ``export.Exporter``."""
        from .. import lora as lora_

        if self.reader.hf_tensors is None:
            raise UsageError("export needs the HF tensor shapes: build the Bridge from an HF source")
        if lora:
            self.adapters.require()
        state = self.local.state(models, lora)
        if tensor_of is not None:
            state = {k: tensor_of(t) for k, t in state.items()}
        g = self.local.groups()
        mine = {it.unit.key: it for it in self.local.items(models, state, lora)}
        hf_tensors = self.adapters.hf_tensors if lora else self.reader.hf_tensors
        if lora:
            dtype = dtype or self.adapters.dtype
        if merge and self.adapters.spec is not None:
            state = lora_.MergedState(state, models, dtype)
        units = []
        for u in self.local.table(lora)[1]:
            if not u.rule.export:
                continue
            shapes = [tuple(hf_tensors[n][0]) for n in u.hf_names]
            dtypes = [dtype or hf_tensors[n][1] for n in u.hf_names]
            units.append(ExportUnit(u, len(units), shapes, dtypes, mine.get(u.key)))
        device = next(iter(state.values())).device
        return Exporter(units, state, g, device, spliced, as_runs), g

    def stacking(self, expert_storage: str | None):
        """(views, stacked shapes) when exporting stacked experts, else None. ``expert_storage``:
        "source" (as the checkpoint stored them), "per_expert", or a ``stacked`` orientation."""
        family = self.reader.family
        storage = self.reader.expert_storage if expert_storage == "source" else expert_storage
        if storage in (None, "per_expert") and family.num_experts and not getattr(family, "per_expert_storage", True):
            raise UsageError(f"expert_storage={expert_storage!r}: {family.name} checkpoints hold their experts "
                             f"only stacked ({family.stacked_hf[0]}, ...), which transformers expects; "
                             f"one tensor per expert would not load: use source, "
                             f"{', '.join(stacked.ORIENTATIONS)}")
        if storage in (None, "per_expert"):
            return None
        if storage not in stacked.ORIENTATIONS:
            raise UsageError(f"expert_storage={expert_storage!r}: choose source, per_expert, "
                             f"{', '.join(stacked.ORIENTATIONS)}")
        if not family.num_experts:
            raise UsageError(f"expert_storage={storage!r}: {family.name} has no experts to stack")
        return stacked.view_table(family, storage), stacked.stacked_shapes(family, storage)

    def save(self, models, out_dir: Path, dtype, overwrite: bool, max_shard_bytes: int, bucket_bytes: int,
             expert_storage: str | None, merge_lora: bool, fp8=None, spliced: dict | None = None):
        """HF safetensors shards + index + config (+ side files) in ``out_dir`` (see ``Bridge.save_weights``);
        ``fp8``: the blockwise FP8 plan of ``quant.export_plan`` (None: as the dtypes say); ``spliced``:
        see ``export.Exporter`` (tensors written from the checkpoint's files where they can be)."""
        stacking = self.stacking(expert_storage)
        as_runs = spliced is not None and not stacking and fp8 is None and self.adapters.spec is None
        exporter, g = self.exporter(models, dtype, merge=merge_lora, spliced=spliced, as_runs=as_runs)
        world = rt.world_size()
        tp_writer = balanced_writers(exporter.units, g)

        def writer(u: ExportUnit) -> int:  # global rank of the first replica's writing rank
            stage, ep_owner = u.unit.owner
            if ep_owner is None:
                return self.layout.stage_rank(world, stage, tp=tp_writer[u.index])
            return self.layout.expert_rank(world, stage, etp=tp_writer[u.index], ep=ep_owner)

        outputs = {}  # output name -> (bytes, writer), in export order
        for u in exporter.units:
            for n, s, d in zip(u.unit.hf_names, u.hf_shapes, u.out_dtypes):
                view = stacking[0].get(n) if stacking else None
                if view is None:
                    for n_, s_, d_ in quant.output_entries(n, s, fp8) or [(n, s, d)]:
                        outputs[n_] = (nbytes(s_, d_), writer(u))
                elif view.stacked not in outputs:
                    outputs[view.stacked] = (nbytes(stacking[1][view.stacked], d), writer(u))
        sizes = {n: b for n, (b, _) in outputs.items()}
        files = hfio.plan_shards(((n, b, w) for n, (b, w) in outputs.items()), max_shard_bytes)
        mine = [f for f in files if f["writer"] == rt.rank()]

        def finalize(stage: Path):
            hfio.write_index(stage, files, sizes)
            hfio.copy_side_files(self.reader.side_files, stage, quant.export_config(self.reader.hf_config, fp8))

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
            stream = quant.quantize_stream(stream, fp8)
            with BackgroundWriter() as background:  # a finished shard is written while the next one fills
                for name, tensor in progress(stream, "save", total=sum(len(f["names"]) for f in mine)):
                    f = pending.get(name)
                    if f is None:
                        continue
                    filled[f["file"]][name] = tensor if isinstance(tensor, Runs) else tensor.cpu()
                    if len(filled[f["file"]]) == len(f["names"]):
                        background.submit(hfio.write_shard, stage / f["file"], filled.pop(f["file"]))
                if filled:
                    raise RuntimeError(f"rank {rt.rank()}: shards never completed: {sorted(filled)}")
        return out_dir

    def save_adapter(self, models, out_dir: Path, dtype, overwrite: bool, bucket_bytes: int, experts: str):
        """The adapter reaches rank 0 (it is small), which writes the PEFT directory."""
        from ..lora import peft_io

        exporter, g = self.exporter(models, dtype, lora=True)
        with hfio.collective_output(out_dir, overwrite) as stage:
            tensors = {}
            for name, t in exporter.iterate(make_buckets(exporter.units, bucket_bytes), all_stages=True):
                if rt.rank() == 0:
                    tensors[name] = t.cpu()
            if rt.rank() == 0:
                source = self.reader.source
                peft_io.write_adapter(stage, tensors, self.adapters.family, str(source) if source else None,
                                      experts)
        return out_dir
