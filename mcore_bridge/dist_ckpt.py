"""Megatron distributed checkpoints (``torch_dist``) through megatron-core's own dist_checkpointing.

Written in Megatron-LM's resume layout, as a weights-only release (so a trainer neither expects
optimizer state nor checks iteration counters)::

    DIR/latest_checkpointed_iteration.txt    "release"
    DIR/release/                             metadata.json, common.pt*, .metadata, __<rank>_<n>.distcp
    DIR/mcore_bridge.json                    HF config, tensor shapes/dtypes, the layout it was written at
    DIR/hf/                                  the source's tokenizer / generation files

    * megatron-core 0.16 writes the non-tensor entries to ``common.pt``; 0.19 keeps them inside the
      torch_dist files (a ``common_state`` object) and still reads a ``common.pt`` if present.

The state dict is what Megatron-LM saves for a model: ``{"model": chunk.sharded_state_dict()}``
(``model0``..``modelN`` under virtual pipeline parallelism) plus ``checkpoint_version`` and
``iteration``. Because dist_checkpointing stores global tensors, a checkpoint written at one
layout loads at any other (TP/PP/VPP/EP/ETP). Checkpoints written by Megatron-LM itself load too
(``iter_NNNNNNN/`` or ``release/``; optimizer, RNG and other non-model entries are left unread and
listed in one line), given the HF directory for the config (``--model``). A tensor the model needs
that the checkpoint lacks, or a model tensor of the checkpoint that the model does not have, is an
error naming it.

Both directions go through megatron-core's ``dist_checkpointing`` with strategies of ours that move
each tensor's bytes once: ``dcp_writer.DirectWriter`` writes DCP's records from the tensors' own
memory, ``dcp_reader.DirectReader`` reads them straight into the parameters (same files; megatron's
own load reads ours and ours reads megatron's: tests/test_dcp_io.py).

Untrusted input: ``common.pt`` (and 0.19's ``common_state`` bytes) is read by ``torch.load`` with
torch's default ``weights_only=True`` (torch >= 2.6; checked below); the ``.metadata`` pickle and the
byte items that torch.distributed.checkpoint unpickles without restriction are first checked by
:func:`mcore_bridge.untrusted.check_dcp_metadata` (an explicit allow-list of classes), so none of
them can run code from the checkpoint.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import torch

from . import hf_io as hfio
from .errors import UsageError
from .runtime import dist as rt
from .untrusted import check_dcp_metadata, object_keys

FORMAT = "torch_dist"
LATEST = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0


def model_key(chunk: int, chunks: int) -> str:
    return "model" if chunks == 1 else f"model{chunk}"


# What of a model with a LoRA adapter a checkpoint holds: everything (base weights and factors),
# the factors alone (an adapter checkpoint, loaded next to base weights), or merged weights.
FULL, ADAPTER, MERGED = "full", "adapter", "merged"
CONTENTS = (FULL, ADAPTER, MERGED)


def sharded_state(models, content: str = FULL, spec: str = "local", block: bool = False) -> dict:
    """What Megatron-LM saves for ``models`` (local-spec chunks), in the key layout of megatron's
    ``spec`` ("local" or "te": see ``te_layout``; ``block``: built from the decoder block spec)."""
    from . import lora, te_layout

    if content not in CONTENTS:
        raise UsageError(f"checkpoint content {content!r}: choose {', '.join(CONTENTS)}")
    if spec not in te_layout.SPECS:
        raise UsageError(f"checkpoint spec {spec!r}: choose {', '.join(te_layout.SPECS)}")
    if spec == te_layout.TE and any(getattr(m, "mtp_process", False) for m in models):
        raise UsageError("checkpoint spec 'te' with multi-token-prediction layers is not supported yet: the TE key "
                         "layout of megatron's MTP block is not mapped; save with spec 'local'")
    with lora.merged_checkpoint(models) if content == MERGED else contextlib.nullcontext():
        state = {model_key(i, len(models)): m.sharded_state_dict() for i, m in enumerate(models)}
    state = in_spec(state, spec, block)
    if content == ADAPTER:
        return lora.only_factors(state)
    return lora.only_factors(state, keep=False) if content == MERGED else state


def in_spec(state: dict, spec: str, block: bool) -> dict:
    """``sharded_state``'s result (local-spec keys) in ``spec``'s key layout."""
    from . import te_layout

    if spec == te_layout.TE:
        return {k: te_layout.to_te(v, block) if isinstance(v, dict) else v for k, v in state.items()}
    return state


def is_torch_dist(path) -> bool:
    path = Path(path)
    return (path / LATEST).exists() or (path / "metadata.json").exists()


def resolve(path) -> Path:
    """The directory holding the distributed checkpoint: ``path`` itself, or the iteration that
    ``latest_checkpointed_iteration.txt`` names (``release`` or ``iter_%07d``)."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    latest = path / LATEST
    if not latest.exists():
        raise hfio.CheckpointError(f"{path}: no {LATEST} and no metadata.json: not a Megatron distributed "
                                   f"checkpoint")
    tag = latest.read_text().strip()
    target = path / (RELEASE if tag == RELEASE else f"iter_{int(tag):07d}")
    if not (target / "metadata.json").exists():
        raise hfio.CheckpointError(f"{path}: {LATEST} names {tag!r} but {target} holds no checkpoint")
    meta = hfio.read_json(target / "metadata.json")
    if meta.get("sharded_backend") != FORMAT:
        raise hfio.CheckpointError(f"{target}: sharded_backend {meta.get('sharded_backend')!r}, only "
                                   f"{FORMAT!r} is read")
    return target


# ---- untrusted pickles: see untrusted.py ---------------------------------------------------------
check_metadata = check_dcp_metadata


def _check_torch_load_default() -> None:

    if torch.__version__ < hfio.MIN_TORCH_FOR_PICKLE:  # the same bar as for HF pickles
        raise RuntimeError(f"torch {torch.__version__}: dist_checkpointing would unpickle common.pt without "
                           f"weights_only; use torch >= 2.6")


# ---- save / load -----------------------------------------------------------------------------------
def save(models, out_dir, overwrite: bool = False, finalize_extra=None, content: str = FULL,
         spec: str = "local", block: bool = False, windows=None):
    """Collective: write ``models`` as a torch_dist release checkpoint (staged, renamed when every
    rank succeeded; ``finalize_extra(stage)`` adds files on rank 0 before that). ``content``: see
    ``CONTENTS`` (models with a LoRA adapter); ``spec``/``block``: see ``sharded_state``.
    ``windows`` (``splice.Windows``): spliced parameters, written from their source files; every rank
    raises ``splice.Unsafe`` before writing when the sharded state holds what they cannot give."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir).absolute()

    def finalize(stage: Path):
        (stage / LATEST).write_text(RELEASE + "\n")
        if finalize_extra is not None:
            finalize_extra(stage)

    with hfio.collective_output(out_dir, overwrite, finalize) as stage:
        target = stage / RELEASE
        if rt.rank() == 0:
            target.mkdir()
        if dist.is_initialized():
            dist.barrier()
        state = in_spec(sharded_state(models, content), spec, block)
        state.update(checkpoint_version=CHECKPOINT_VERSION, iteration=0)
        dist_checkpointing.save(state, str(target), sharded_strategy=direct_save_strategy(windows=windows))
    return out_dir


def direct_save_strategy(thread_count: int = 2, windows=None):
    """megatron-core's torch_dist save strategy, writing through ``dcp_writer.DirectWriter`` (DCP's
    ``FileSystemWriter`` writing each tensor record from the tensor's own memory; DCP's writer itself
    where torch lacks ``serialization.skip_data``; ``thread_count`` threads and files per rank)
    instead of megatron's ``FileSystemWriterAsync``, which starts a spawned ``multiprocessing`` manager process (0.16.1
    and 0.19.2) and, on 0.16.1, forks one writer process per file: a fixed cost of seconds for any
    save and a slower write. Same files, same format: megatron's own translation of its sharded
    tensors (``mcore_to_pyt_state_dict``) and its planner (``MCoreSavePlanner``) produce them, and
    megatron's loader reads them (tests/test_torch_dist.py). A subclass of megatron's strategy, used
    only for the saves mcore-bridge makes: nothing of megatron is patched. ``windows``: see ``save``."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    from .dcp_writer import writer_for

    class DirectWrite(mtorch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            if windows is not None:  # what megatron's factories built, before anything is written
                _check_spliceable(sharded_state_dict, windows)
            state, _, _ = mtorch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                            self.keep_only_main_replica)
            dcp.save(mtorch.mcore_to_pyt_state_dict(state, False),
                     storage_writer=writer_for(str(checkpoint_dir), self.thread_count, windows),
                     planner=mtorch.MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                                     flatten_state_dict=False))

    return DirectWrite(FORMAT, 1, thread_count=thread_count)


def _check_spliceable(sharded_state_dict, windows) -> None:
    """Collective: ``splice.Unsafe`` on every rank when any rank's sharded tensors are not all
    contiguous windows of spliced parameters or views of loaded ones."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from .runtime.faults import InjectedFault, maybe_fail
    from .splice import Unsafe

    why = windows.check((v.key, v.data) for v in nested_values(sharded_state_dict) if isinstance(v, ShardedTensor))
    try:
        maybe_fail("splice")  # tests only: MCORE_BRIDGE_FAULT (runtime/faults.py)
    except InjectedFault as e:
        why = str(e)
    if not rt.all_ok(why is None):
        raise Unsafe(why or "another rank's sharded state cannot be written from spliced parameters")


def load(models, path, content: str = FULL, defer=None) -> str | None:
    """Collective: fill ``models`` (any layout) from a torch_dist checkpoint, ours or Megatron-LM's.

    Every tensor the model needs must be in the checkpoint, and every model tensor of the
    checkpoint must be one the model has; entries that are not model weights (optimizer state,
    RNG state, Megatron-LM's ``args``/scheduler/counters in ``common.pt``) are not read, and the
    returned line lists them (None when there are none). ``content=ADAPTER``: only the LoRA
    factors are read (and required); a full checkpoint's base weights are left unread. ``defer``
    (an ``unsplice.Deferred``): records that are exactly a window of its tensors are noted there,
    not read (the caller's ``defer.finish`` then decides)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    from .dcp_reader import direct_load_strategy
    from .plan import MappingError

    _check_torch_load_default()
    ckpt_dir = resolve(path)
    error = None
    try:
        check_metadata(ckpt_dir, object_keys(sharded_state(models, content)))
    except Exception as e:
        error = e
    if not rt.all_ok(error is None):
        raise error or hfio.CheckpointError("another rank rejected the checkpoint metadata")
    state = sharded_state(models, content)
    _merge_in_place(state)
    keys = [model_key(i, len(models)) for i in range(len(models))]
    note = None
    try:
        _follow_layout(state, keys, ckpt_dir)
        try:
            # megatron's names (validation.py): "unexpected" = asked for by this rank's sharded state
            # dict but absent from the checkpoint; "missing" = in the checkpoint, asked for by no rank
            loaded, unasked, absent = dist_checkpointing.load(state, str(ckpt_dir), strict=StrictHandling.RETURN_ALL,
                                                                sharded_strategy=direct_load_strategy(defer))
        except CheckpointingException as e:
            raise MappingError(f"{ckpt_dir}: {e}") from None
        except CheckpointException as e:  # torch's (a BaseException): e.g. a tensor of another shape
            rank, (first, _) = next(iter(e.failures.items()))
            raise MappingError(f"{ckpt_dir}: {first} (rank {rank}; built for another model? check --model)") from None
        except pickle.UnpicklingError as e:  # common.pt holding objects beyond torch's weights-only set
            why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e)[:300])
            raise hfio.CheckpointError(f"{ckpt_dir / 'common.pt'}: refused by torch.load(weights_only=True), "
                                       f"which builds only tensors, containers and classes megatron-core "
                                       f"registers as safe: {why[:300]}") from None
        needed = sorted(k for k in absent if not _is_extra_state(k))
        groups, extra = _classify_unasked(unasked, content)
        if needed:
            instead = (f"; it holds {len(extra)} this model does not know instead (neither megatron's local "
                       f"nor its TransformerEngine key layout): {_few(extra)}") if extra else ""
            raise MappingError(f"{ckpt_dir}: the checkpoint lacks {len(needed)} tensor(s) this model needs: "
                               f"{_few(needed)}{instead} (written for another model or configuration, e.g. "
                               f"tied vs untied embeddings? check --model)")
        if extra:
            raise MappingError(f"{ckpt_dir}: the checkpoint holds {len(extra)} model tensor(s) this model does "
                               f"not have: {_few(extra)} (written for another model or configuration? check "
                               f"--model)")
        common = sorted(k for k in loaded if not re.fullmatch(r"model\d*", k) and k not in _OWN_COMMON
                        and k not in groups)  # model<i> of another virtual-pipeline split: no entry
        if groups or common:
            count = sum(groups.values()) + len(common)
            listed = [f"{g} ({n})" for g, n in sorted(groups.items())] + common
            note = f"ignored {count} non-model entries of {ckpt_dir.name}: {', '.join(listed)}"
        for i, m in enumerate(models):
            _fill(m, loaded.get(keys[i], {}), content, ckpt_dir, keys[i])
    except Exception as e:
        error = e
    if not rt.all_ok(error is None):  # fail together: the export that follows is collective
        raise error or hfio.CheckpointError("another rank could not load its part of the checkpoint")
    return note


def _follow_layout(state: dict, keys, ckpt_dir: Path) -> None:
    """Point this rank's (local-spec) sharded state at the key layout the checkpoint was written in
    (TransformerEngine or local spec), told from the checkpoint's own ``.metadata`` keys."""
    from . import te_layout
    from .plan import MappingError

    written = te_layout.checkpoint_keys(ckpt_dir)
    for k in keys:
        try:
            if te_layout.detect(state[k], written) == te_layout.TE:
                te_layout.rename(state[k])
        except te_layout.LayoutMismatch as e:
            raise MappingError(f"{ckpt_dir}: {e}: written by neither megatron's local nor its "
                               f"TransformerEngine layer spec") from None


# ---- what a checkpoint holds besides the model --------------------------------------------------
# Top-level entries of common.pt that mcore-bridge itself writes (not reported as ignored).
_OWN_COMMON = ("checkpoint_version", "iteration")
# Sharded entries of a Megatron-LM checkpoint that are not model weights, by megatron's key:
# optimizer state ("optimizer.state.exp_avg.<param>", the distributed optimizer's
# "optimizer.distributed.*", "chained_<i>.optimizer.*" from a ChainedOptimizer written without
# chained_optim_avoid_prefix), RNG state ("[prefix]rng_state") and the rerun state machine.
_NON_MODEL = (("optimizer", re.compile(r"^(chained_\d+\.)?optimizer\.")),
              ("rng_state", re.compile(r"^[^./]*rng_state$")),
              ("rerun_state_machine", re.compile(r"^rerun_state_machine_state$")))


def _merge_in_place(state: dict) -> None:
    """Megatron's factories (e.g. SwiGLU's gate/up halves of ``linear_fc1``) split a model tensor
    into views, the checkpoint is read into those views, and the merge then ``cat``s them into a new
    tensor that ``load_state_dict`` copies back. When the loaded parts still tile the model tensor
    (views, in order, nothing re-allocated), the merge here returns the model tensor itself: one
    full-size allocation and two copies fewer (on CPU, 1 s of a 4 GB torch_dist -> HF). Anything
    else goes through megatron's own merge."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    def tiles(parts, whole) -> bool:
        if not (isinstance(whole, torch.Tensor) and whole.is_contiguous() and isinstance(parts, (list, tuple))):
            return False
        at = whole.data_ptr()
        for p in parts:
            if not (isinstance(p, torch.Tensor) and p.is_contiguous() and p.dtype == whole.dtype
                    and p.device == whole.device and p.data_ptr() == at):
                return False
            at += p.numel() * p.element_size()
        return at == whole.data_ptr() + whole.numel() * whole.element_size()

    for f in nested_values(state):
        if isinstance(f, ShardedTensorFactory) and not getattr(f.merge_fn, "_in_place", False):
            def merge(parts, _whole=f.data, _merge=f.merge_fn):
                return _whole if tiles(parts, _whole) else _merge(parts)
            merge._in_place = True
            f.merge_fn = merge


def _is_extra_state(key: str) -> bool:
    """megatron's per-module ``_extra_state`` (TransformerEngine's FP8 metadata; None for local
    layers): no weight, so neither required nor refused."""
    return key.rsplit(".", 1)[-1] == "_extra_state"


def _classify_unasked(unasked, content: str) -> tuple[dict, list]:
    """Checkpoint keys no rank asked for -> ({non-model group: count}, [model keys the model lacks])."""
    from . import lora

    groups, extra = {}, []
    for key in sorted(unasked):
        group = next((g for g, pattern in _NON_MODEL if pattern.search(key)), None)
        if group is None and content == ADAPTER and not lora.is_lora_param(key):
            continue  # a full checkpoint read as an adapter: its base weights are not read
        if group is None and _is_extra_state(key):
            group = "_extra_state"
        if group is None:
            extra.append(key)
        else:
            groups[group] = groups.get(group, 0) + 1
    return groups, extra


def _few(names, n: int = 8) -> str:
    names = list(names)
    return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _fill(chunk, got: dict, content: str, ckpt_dir: Path, key: str) -> None:
    """Copy the loaded tensors into ``chunk`` and check that every tensor it needs was filled
    (models are built without initialisation: an unfilled tensor would be garbage)."""
    from . import lora
    from .plan import MappingError

    sd = chunk.state_dict(keep_vars=True)
    if not any(".base_layer." in n for n in sd):  # no LoRA wrappers: torch's own load, strict but
        result = chunk.load_state_dict(got, strict=False)  # for _extra_state (no weight)
        unfilled = [k for k in result.missing_keys if not _is_extra_state(k)]
        if unfilled or result.unexpected_keys:
            raise MappingError(f"{ckpt_dir}: {key}: not filled from the checkpoint: {_few(unfilled)}; "
                               f"not in the model: {_few(result.unexpected_keys)}")
        return
    unfilled = []  # wrapped linears are saved under their unwrapped names
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor) or _is_extra_state(name):
            continue
        if content == ADAPTER and not lora.is_lora_param(name):
            continue  # base weights come from elsewhere
        plain = name.replace(".base_layer.", ".")
        if isinstance(got.get(plain), torch.Tensor):
            t.detach().copy_(got[plain])
        else:
            unfilled.append(plain)
    if unfilled:
        raise MappingError(f"{ckpt_dir}: {key}: {len(unfilled)} tensor(s) of the model were not filled from "
                           f"the checkpoint: {_few(unfilled)}")
