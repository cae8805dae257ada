"""Megatron-side checkpoints written and read by the bridge.

Two formats, both with ``mcore_bridge.json`` (the layout written at, the HF config, tensor shapes
and dtypes, expert storage) and the source's tokenizer/generation files under ``hf/``, so that no
HF directory is needed to export back:
  * ``torch_dist`` (default, ``dist_ckpt.py``): Megatron-LM's distributed checkpoint through
    megatron-core's dist_checkpointing; loads at any layout.
  * ``plain`` (this module): one safetensors file per distinct model-parallel part holding that
    rank's parameters exactly as megatron names them; loads only at the layout it was written at.
A torch_dist checkpoint written elsewhere (no ``mcore_bridge.json``) loads given the HF directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import hf_io as hfio
from .bridge import Bridge
from .errors import UsageError
from .layout import LayoutError, ParallelLayout
from .plan import MappingError
from .runtime import dist as rt

META_NAME = "mcore_bridge.json"
PLAIN = "mcore-bridge-plain/1"
TORCH_DIST = "torch_dist"
FORMAT_NAMES = {"plain": PLAIN, "torch_dist": TORCH_DIST}
DTYPE_NAMES = {v: k for k, v in hfio.SAFETENSORS_DTYPES.items()}


def rank_file(layout: ParallelLayout, rank: int, world_size: int) -> str:
    """The file holding what global ``rank`` holds: megatron's ``mp_rank_TT_PPP`` naming, plus the
    expert-parallel rank (``_EEE``) and, when it differs from tp, the expert-TP rank (``_xNN``)."""
    c = layout.coords(rank, world_size)
    name = f"mp_rank_{c['tp']:02d}_{c['pp']:03d}"
    if layout.ep > 1:
        name += f"_{c['ep']:03d}"
    if layout.etp != layout.tp:
        name += f"_x{c['etp']:02d}"
    return name + ".safetensors"


def writes_file(layout: ParallelLayout, rank: int, world_size: int) -> bool:
    """Whether ``rank`` is the lowest rank holding its file's contents (replicas write nothing)."""
    mine = rank_file(layout, rank, world_size)
    return all(rank_file(layout, r, world_size) != mine for r in range(rank))


def is_mcore_checkpoint(path) -> bool:
    from . import dist_ckpt

    return (Path(path) / META_NAME).exists() or dist_ckpt.is_torch_dist(path)


def read_meta(path) -> dict:
    path = Path(path)
    meta_file = path / META_NAME
    if not meta_file.exists():
        raise hfio.CheckpointError(f"--load {path}: not a checkpoint written by mcore-bridge "
                                   f"(no {META_NAME}); for an HF directory use --model")
    meta = hfio.read_json(meta_file)
    if meta.get("format") not in FORMAT_NAMES.values():
        raise hfio.CheckpointError(f"{meta_file}: unknown format {meta.get('format')!r}")
    return meta


def save_mcore(bridge: Bridge, models, out_dir, overwrite: bool = False, fmt: str = "torch_dist",
               content: str = "full", spec: str = "te", spliced: dict | None = None):
    """Collective. torch_dist: megatron's distributed checkpoint; plain: the first rank holding each
    distinct part writes its file. Rank 0 writes the metadata once every rank succeeded.
    ``content`` (a model with a LoRA adapter, torch_dist only): "full" (weights and factors),
    "adapter" (the factors alone, for ``load_adapter_mcore``) or "merged" (merged weights).
    ``spec`` (torch_dist only): the key layout of megatron's TransformerEngine ("te", what
    Megatron-LM trains with by default) or local ("local") layer spec; reading detects either.
    ``spliced``: parameters left unloaded by ``load_weights(..., spliced=)``, written from their
    source files' bytes (``splice``); torch_dist raises ``splice.Unsafe`` on every rank, having
    written nothing, when megatron's sharded state holds a tensor they cannot give."""
    from . import te_layout

    if fmt not in FORMAT_NAMES:
        raise UsageError(f"checkpoint format {fmt!r}: choose {', '.join(FORMAT_NAMES)}")
    if spec not in te_layout.SPECS:
        raise UsageError(f"checkpoint spec {spec!r}: choose {', '.join(te_layout.SPECS)}")
    if bridge.lora is None:
        content = "full"
    elif fmt != "torch_dist":
        raise UsageError("a model with a LoRA adapter is saved in the torch_dist format (--ckpt-format torch_dist)")
    out_dir = Path(out_dir).absolute()
    state = bridge.state(models)
    meta = {
        "format": FORMAT_NAMES[fmt],
        "layout": bridge.layout.to_dict(),
        "family": bridge.family.name,
        "hf_config": bridge.hf_config,
        "hf_tensors": {n: [list(s), DTYPE_NAMES[d]] for n, (s, d) in bridge.hf_tensors.items()},
        "expert_storage": bridge.expert_storage,
    }
    if fmt == "torch_dist":
        meta["spec"] = spec  # informational: reading tells the layout from the checkpoint's keys
    if content != "merged" and bridge.lora is not None:
        meta.update(lora=bridge.lora.to_dict(), content=content)

    def finalize(stage: Path):
        (stage / META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        (stage / "hf").mkdir()
        hfio.copy_side_files(bridge.side_files, stage / "hf", bridge.hf_config)

    if fmt == "torch_dist":
        from . import dist_ckpt

        block = bridge.family.decoder_block_spec
        from .splice import Windows

        windows = Windows(state, spliced, models) if spliced else None
        return dist_ckpt.save(models, out_dir, overwrite, finalize_extra=finalize, content=content, spec=spec,
                              block=block, windows=windows)
    layout, rank, world = bridge.layout, rt.rank(), rt.world_size()
    with hfio.collective_output(out_dir, overwrite, finalize) as stage:
        if writes_file(layout, rank, world):
            spliced = spliced or {}
            tensors = {f"chunk{c}.{name}": spliced.get((c, name)) or t.detach().contiguous().cpu()
                       for (c, name), t in state.items()}
            hfio.write_shard(stage / rank_file(layout, rank, world), tensors)
    return out_dir


def bridge_from_mcore(path, layout: ParallelLayout | None = None, hf_dir=None) -> Bridge:
    """A Bridge for a Megatron checkpoint; the layout defaults to the saved one (torch_dist loads at
    any layout). ``hf_dir`` supplies tokenizer/generation files instead of the copies under ``hf/``,
    and the HF config and tensor shapes for a torch_dist checkpoint written without mcore-bridge."""
    from . import dist_ckpt

    path = Path(path)
    if not (path / META_NAME).exists() and dist_ckpt.is_torch_dist(path):
        if hf_dir is None:
            raise hfio.CheckpointError(f"--load {path}: a Megatron distributed checkpoint without {META_NAME}; "
                                       f"pass --model HF_DIR for its config and tokenizer")
        return Bridge(hf_dir, layout or ParallelLayout())
    meta = read_meta(path)
    saved = ParallelLayout(**meta["layout"])
    layout = layout or saved
    if meta["format"] == PLAIN and {**layout.to_dict(), "sp": None} != {**saved.to_dict(), "sp": None}:
        raise LayoutError(f"{path} was written at {saved.short()}; the plain format loads only at that "
                          f"layout: drop the layout flags or pass the same --tp/--pp/--vpp/--ep/--etp")
    hf_tensors = {n: (tuple(s), hfio.SAFETENSORS_DTYPES[d]) for n, (s, d) in meta["hf_tensors"].items()}
    side = Path(hf_dir) if hf_dir is not None else path / "hf"
    return Bridge(path, layout, hf_config=meta["hf_config"], hf_tensors=hf_tensors, side_files=side,
                  expert_storage=meta.get("expert_storage"))


def load_mcore(bridge: Bridge, models, path, spliced: dict | None = None) -> str | None:
    """Fill this rank's chunks from a Megatron checkpoint (either format); one holding a LoRA
    adapter with the weights puts the adapter on the model first. Returns a line naming the
    non-model entries that were left unread (a Megatron-LM training checkpoint's optimizer and
    RNG state, ...), or None. ``spliced`` (a dict, for a conversion that only writes the weights
    out): parameters stored as one contiguous record are left unread and go there as
    ``splice.Runs`` (``unsplice``), which ``save_weights(..., spliced=)`` copies file to file."""
    from . import dist_ckpt, unsplice

    path = Path(path)
    meta = read_meta(path) if (path / META_NAME).exists() else None
    if meta is not None and meta.get("content") == "adapter":
        raise hfio.CheckpointError(f"--load {path} holds a LoRA adapter only: pass the base model with --model "
                                   f"(or --load) and this directory as --adapter-load")
    if meta is not None and meta.get("lora"):
        _apply_saved_lora(bridge, models, meta, path)
        spliced = None  # the weights are wrapped: load them
    defer = unsplice.Deferred(bridge.state(models)) if spliced is not None else None
    if meta is not None and meta["format"] == PLAIN:
        note = load_plain(bridge, models, path, defer)
    else:
        note = dist_ckpt.load(models, path, defer=defer)
    if defer is not None:
        defer.finish(spliced)
    return note


def _apply_saved_lora(bridge: Bridge, models, meta: dict, path: Path):
    from .lora import AdapterError, LoraSpec

    spec = LoraSpec.from_dict(meta["lora"])
    if bridge.lora is None:
        bridge.apply_lora(models, spec)
    elif bridge.lora != spec:
        raise AdapterError(f"{path}: adapter {spec} differs from the model's {bridge.lora}")


def load_adapter_mcore(bridge: Bridge, models, path) -> str | None:
    """Put the LoRA adapter of a Megatron checkpoint (adapter-only, or with weights: then only the
    factors are read) on models whose base weights are already loaded. Returns what
    ``dist_ckpt.load`` returns."""
    from . import dist_ckpt
    from .lora import AdapterError

    path = Path(path)
    meta = read_meta(path)
    if not meta.get("lora"):
        raise AdapterError(f"--adapter-load {path}: this checkpoint holds no LoRA adapter")
    mismatched = sorted(n for n, (s, _) in meta["hf_tensors"].items()
                        if n in bridge.hf_tensors and tuple(s) != tuple(bridge.hf_tensors[n][0]))
    if meta["hf_config"].get("model_type") != bridge.hf_config.get("model_type") or mismatched:
        raise AdapterError(f"--adapter-load {path} was made for another base model "
                           f"({meta['hf_config'].get('model_type')}, shapes differ: {mismatched[:3]})")
    _apply_saved_lora(bridge, models, meta, path)
    return dist_ckpt.load(models, path, content="adapter")


def load_plain(bridge: Bridge, models, path, defer=None):
    """Fill this rank's chunks from its file; every parameter present exactly once, nothing extra.
    ``defer`` (an ``unsplice.Deferred``): a tensor stored in the model's dtype is noted there, not read."""
    path = Path(path)
    file = path / rank_file(bridge.layout, rt.rank(), rt.world_size())
    error = None
    try:
        if not file.exists():
            raise hfio.CheckpointError(f"{file} is missing: the checkpoint is incomplete")
        header, data_start = hfio.parse_header(file)
        state = {f"chunk{c}.{name}": t for (c, name), t in bridge.state(models).items()}
        missing = sorted(set(state) - set(header))
        extra = sorted(set(header) - set(state))
        bad = [k for k in state if k in header and tuple(header[k]["shape"]) != tuple(state[k].shape)]
        if missing or extra or bad:
            raise MappingError(f"{file}: missing {missing[:5]}, unexpected {extra[:5]}, "
                               f"mis-shaped {bad[:5]}")
    except Exception as e:
        error = e
    if not rt.all_ok(error is None):
        raise error or RuntimeError("another rank could not read its part of the checkpoint")
    with torch.no_grad(), hfio.safe_open(str(file), framework="pt") as f:
        for key, target in state.items():
            entry = header[key]
            if defer is not None and hfio.SAFETENSORS_DTYPES.get(entry["dtype"]) == target.dtype \
                    and defer.take(target, file, data_start + entry["data_offsets"][0]):
                continue
            target.copy_(f.get_tensor(key))

