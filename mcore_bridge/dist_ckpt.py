"""Megatron distributed checkpoints (``torch_dist``) through megatron-core's own dist_checkpointing.

Written in Megatron-LM's resume layout, as a weights-only release (so a trainer neither expects
optimizer state nor checks iteration counters)::

    DIR/latest_checkpointed_iteration.txt    "release"
    DIR/release/                             metadata.json, common.pt, .metadata, __<rank>_<n>.distcp
    DIR/mcore_bridge.json                    HF config, tensor shapes/dtypes, the layout it was written at
    DIR/hf/                                  the source's tokenizer / generation files

The state dict is what Megatron-LM saves for a model: ``{"model": chunk.sharded_state_dict()}``
(``model0``..``modelN`` under virtual pipeline parallelism) plus ``checkpoint_version`` and
``iteration``. Because dist_checkpointing stores global tensors, a checkpoint written at one
layout loads at any other (TP/PP/VPP/EP/ETP). Checkpoints written by Megatron-LM itself load too
(``iter_NNNNNNN/`` or ``release/``; optimizer and RNG entries are left unread), given the HF
directory for the config (``--model``).

Untrusted input: ``common.pt`` is read by ``torch.load`` with torch's default ``weights_only=True``
(torch >= 2.6; checked below); the ``.metadata`` pickle and the byte items that
torch.distributed.checkpoint unpickles without restriction are first checked by
:func:`mcore_bridge.untrusted.check_dcp_metadata` (an explicit allow-list of classes), so none of
them can run code from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from . import io as hfio
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


def sharded_state(models, content: str = FULL) -> dict:
    from . import lora

    if content not in CONTENTS:
        raise ValueError(f"checkpoint content {content!r}: choose {', '.join(CONTENTS)}")
    with lora.merged_checkpoint(models) if content == MERGED else contextlib.nullcontext():
        state = {model_key(i, len(models)): m.sharded_state_dict() for i, m in enumerate(models)}
    if content == ADAPTER:
        return lora.only_factors(state)
    return lora.only_factors(state, keep=False) if content == MERGED else state


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
    meta = json.loads((target / "metadata.json").read_text())
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
def save(models, out_dir, overwrite: bool = False, finalize_extra=None, content: str = FULL):
    """Collective: write ``models`` as a torch_dist release checkpoint (staged, renamed when every
    rank succeeded; ``finalize_extra(stage)`` adds files on rank 0 before that). ``content``: see
    ``CONTENTS`` (models with a LoRA adapter)."""
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
        state = sharded_state(models, content)
        state.update(checkpoint_version=CHECKPOINT_VERSION, iteration=0)
        dist_checkpointing.save(state, str(target))
    return out_dir


def load(models, path, content: str = FULL) -> None:
    """Collective: fill ``models`` (any layout) from a torch_dist checkpoint. Every model tensor must
    be in the checkpoint and vice versa within the model entries; other entries (optimizer, RNG)
    are not read. ``content=ADAPTER``: only the LoRA factors are read (and required)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from . import lora
    from .plan import MappingError

    _check_torch_load_default()
    ckpt_dir = resolve(path)
    error = None
    try:
        check_metadata(ckpt_dir, object_keys(sharded_state(models, content)))
    except Exception as e:
        error = e
    if not rt.all_ok(error is None):
        raise error or RuntimeError("another rank rejected the checkpoint metadata")
    state = sharded_state(models, content)
    keys = [model_key(i, len(models)) for i in range(len(models))]
    try:
        loaded, missing, unexpected = dist_checkpointing.load(state, str(ckpt_dir),
                                                              strict=StrictHandling.RETURN_ALL)
        unexpected = sorted(k for k in unexpected if k.split(".", 1)[0] in keys)
        if content == ADAPTER:  # a full checkpoint's weights are simply not read
            unexpected = [k for k in unexpected if lora.is_lora_param(k)]
        if missing or unexpected:
            raise MappingError(f"{ckpt_dir}: the model's tensors and the checkpoint's differ: missing "
                               f"{sorted(missing)[:5]}, unexpected {unexpected[:5]} (built for another model?)")
        for i, m in enumerate(models):
            sd = m.state_dict(keep_vars=True)
            if not any(".base_layer." in n for n in sd):  # no LoRA wrappers: megatron's own strict load
                m.load_state_dict(loaded[keys[i]], strict=True)
                continue
            got = loaded[keys[i]]  # wrapped linears are saved under their unwrapped names
            for name, t in sd.items():
                plain = name.replace(".base_layer.", ".")
                if isinstance(t, torch.Tensor) and plain in got and isinstance(got[plain], torch.Tensor):
                    t.detach().copy_(got[plain])
    except Exception as e:
        error = e
    if not rt.all_ok(error is None):  # fail together: the export that follows is collective
        raise error or RuntimeError("another rank could not load its part of the checkpoint")
