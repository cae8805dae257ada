"""The loader: HF tensors -> this rank's megatron parameters, reading only the needed slices."""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from .. import splice
from ..plan import MappingError, check_names
from ..runtime import dist as rt
from ..transforms import Replicated, ShapeMismatch, Split, Vocab


def progress(iterable, desc: str, total: Optional[int] = None):
    """A tqdm bar on rank 0 (stderr), silent elsewhere and when MCORE_BRIDGE_QUIET is set."""
    if rt.rank() != 0 or os.environ.get("MCORE_BRIDGE_QUIET"):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None)  # None: no bar when stderr is not a terminal


def check_copies(ckpt, names, regions, param: str) -> None:
    """HF tensors that are copies of one tensor in the model must be equal (in this rank's region)."""
    first = ckpt.read(names[0], regions[0])
    for name, region in zip(names[1:], regions[1:]):
        other = ckpt.read(name, region)
        if not torch.equal(other, first):
            diff = (other.float() - first.float()).abs().max().item() if other.shape == first.shape else "shape"
            raise MappingError(f"{name} differs from {names[0]} (max |diff| {diff}): the model holds one tensor for "
                               f"both ({param}), so the checkpoint's copies must be equal; refusing rather than "
                               f"picking one")


def read_direct(ckpt, transform, names, regions, target) -> bool:
    """Transforms that only take a row range of one tensor (``Replicated``, ``Split``,
    ``Vocab``, whose padding rows are then zeroed) read the bytes straight into the parameter when the
    checkpoint can (``HFCheckpoint.read_into``: same dtype, one contiguous range); False otherwise."""
    read_into = getattr(ckpt, "read_into", None)
    if read_into is None or len(regions) != 1 or type(transform) not in (Replicated, Split, Vocab):
        return False
    n = read_into(names[transform.region_sources(1)[0]], regions[0], target)
    if n == 0:
        return False
    flat = target.view(-1)
    done = n // target.element_size()
    if done != flat.numel():
        if type(transform) is not Vocab:
            return False  # not the whole parameter: the general path fills it
        flat[done:].zero_()
    return True


class Loader:
    """Fills model chunks from an opened checkpoint (``hf_io.HFCheckpoint`` or a view over one)
    through ``local`` (a ``LocalPlan``): every rank checks its whole plan first and all fail
    together before any weight is read."""

    def __init__(self, local):
        self.local = local

    def load(self, models, ckpt, lora: bool = False, spliced: dict | None = None):
        """The base weights, or with ``lora`` the adapter's factors, from ``ckpt``; closes it.
        ``spliced`` (a dict): parameters that are whole rows of the source files (``splice.plan``)
        are not loaded but put there as ``splice.Runs`` by (chunk, name), for a writer."""
        state = self.local.state(models, lora)
        g = self.local.groups()
        jobs, error = [], None
        try:
            check_names(self.local.table(lora)[1], set(ckpt.names()), where=str(ckpt.path))
            for item in self.local.items(models, state, lora):
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
                if transform.identical_sources:
                    check_copies(ckpt, names, regions, item.param)
                jobs.append((item, target, names, regions, tp, tp_rank))
        except Exception as e:  # make every rank fail together, before any weight is read
            error = e
        if not rt.all_ok(error is None):
            raise error or RuntimeError("another rank rejected the checkpoint (see its error)")
        if spliced is not None:  # a parameter filled by two items is loaded
            keys = [(item.chunk, item.param) for item, *_ in jobs]
            once = {k for k in keys if keys.count(k) == 1} if len(set(keys)) != len(keys) else set(keys)
        with torch.no_grad():
            for item, target, names, regions, tp, tp_rank in progress(jobs, "load"):
                if spliced is not None and (item.chunk, item.param) in once:
                    runs = splice.plan(ckpt, item.unit.rule.transform, names, regions, target, tp, tp_rank)
                    if runs is not None:
                        spliced[(item.chunk, item.param)] = runs
                        continue
                if read_direct(ckpt, item.unit.rule.transform, names, regions, target):
                    continue
                sources = item.unit.rule.transform.region_sources(len(regions))
                pieces = [ckpt.read(names[i], r) for i, r in zip(sources, regions)]
                item.unit.rule.transform.to_mcore_into(pieces, target, tp, tp_rank)
                del pieces  # let the mapped source pages go before the next read
        ckpt.close()
