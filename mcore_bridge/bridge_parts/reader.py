"""The checkpoint reader: the HF source, its family and the views over its tensors."""

from __future__ import annotations

import os
from pathlib import Path

from .. import hf_io as hfio
from .. import quant, stacked
from ..families import family_for


def resolve_source(model: str | os.PathLike) -> Path:
    """An HF directory, or ``builtin:NAME`` for a tiny model of the built-in zoo."""
    model = str(model)
    if model.startswith("builtin:"):
        from .. import zoo

        return zoo.materialize(model.split(":", 1)[1])
    return Path(model)


def tensor_table(ckpt) -> dict:
    """name -> (shape, dtype) of every tensor ``ckpt`` presents."""
    return {n: (i.shape, i.dtype) for n, i in ckpt.tensors.items()}


class CheckpointReader:
    """The HF side of a bridge. From a directory (``hf_config`` None): opens it, lets the family
    adapt to its naming, and presents stacked experts as one tensor per expert. Without one
    (``hf_config`` given, e.g. a megatron checkpoint's metadata): only the config and tensor table.

    Attributes: ``source``, ``hf`` (the opened checkpoint or None), ``hf_config``, ``hf_tensors``
    (name -> (shape, dtype), per-expert names: the export target, or None), ``expert_storage``
    (how the source stores experts; the export default), ``side_files``, ``family``."""

    def __init__(self, source, *, hf_config: dict | None = None, hf_tensors: dict | None = None,
                 side_files: Path | None = None, expert_storage: str | None = None, allow_pickle: bool = False):
        if hf_config is None:
            self.source = resolve_source(source)
            self.hf = quant.open_quantized(hfio.HFCheckpoint(self.source, allow_pickle=allow_pickle))  # FP8/MXFP4: bf16
            hf_config = self.hf.config
            hf_tensors = tensor_table(self.hf)
            side_files = self.source
        else:
            self.source, self.hf = Path(source) if source else None, None
        self.family = family_for(hf_config)
        if hf_tensors is not None:  # the checkpoint's naming, where a family allows several
            self.family.adapt(hf_tensors)
        if self.hf is not None:  # stacked experts: from here on seen as one tensor per expert
            self.hf, expert_storage = stacked.open_checkpoint(self.hf, self.family)
            hf_tensors = tensor_table(self.hf)
        elif expert_storage is None and not getattr(self.family, "per_expert_storage", True):
            expert_storage = stacked.IN_OUT  # experts exist only stacked: as transformers saves them
        self.hf_config = hf_config
        self.hf_tensors = hf_tensors
        self.expert_storage = expert_storage
        self.side_files = side_files

    def open(self, hf_dir):
        """Another HF directory of this model (``load_weights(hf_dir=...)``), through the same views."""
        return stacked.open_checkpoint(quant.open_quantized(hfio.HFCheckpoint(resolve_source(hf_dir))), self.family)[0]
