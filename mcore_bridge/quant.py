"""Quantised checkpoints, read as bf16 through views; FP8 blockwise export.

**Blockwise FP8** (DeepSeek-V3/V3.1, Kimi-K2, any ``quantization_config.quant_method: fp8`` with
``weight_block_size [br, bc]``; ``scale_fmt: ue8m0``: power-of-two scales): each quantised
``X.weight`` is float8_e4m3fn next to ``X.weight_scale_inv`` float32 ``[ceil(rows/br), ceil(cols/bc)]``; element ``(i, j)`` is
``fp8[i, j] * scale_inv[i // br, j // bc]`` (edge blocks may be partial). ``FP8Checkpoint``
presents each such weight as bf16 of the same shape (the product in fp32, rounded once to bf16:
DeepSeek's ``weight_dequant``), hides the ``*_scale_inv`` names (each one paired, or an error
naming it) and reads only the FP8 rows/cols of a region and the scale rows/cols covering them.

**MXFP4** (gpt-oss, ``quant_method: mxfp4``): ``P_blocks`` uint8 ``[E, R, G, 16]`` holds two FP4
(e2m1) values per byte, low nibble first, ``P_scales`` uint8 ``[E, R, G]`` one e8m0 exponent
(``2 ** (s - 127)``) per 32 values; ``MXFP4Checkpoint`` presents ``P`` as bf16 ``[E, G*32, R]``
(transformers' in-memory orientation after its own dequantisation: ``[E, in, out]``).

Export writes plain bf16 by default (``export_config`` drops ``quantization_config``);
``dtype="fp8"`` quantises the same tensors again (``quantize_fp8``): a block keeps the source's
scale where that scale represents the exported values exactly -- so FP8 -> megatron -> FP8 is
byte-exact -- and gets a fresh one (block amax / 448) where the values changed. (Fresh scales
alone would give every FP8 byte back but move a scale by up to 2^-8: bf16 keeps 8 significant bits
of the block maximum.) MXFP4 export is refused (see ``MXFP4_EXPORT_REFUSAL``).
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
from typing import Iterable, Iterator

import torch

from .errors import CheckpointError, UsageError, WriteError
from .hf_io import TensorInfo

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": [128, 128]}
MXFP4_EXPORT_REFUSAL = (
    "--export-dtype mxfp4 is refused: re-quantising to MXFP4 rounds every weight to one of 15 values "
    "per 32-element block, and whether an exported checkpoint matches the published one depends on the "
    "rounding rule and scale choice of the quantiser that made it, which gpt-oss does not publish; export "
    "bf16 (the default) and quantise with the serving engine's own tool")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quant_config(config: dict) -> dict | None:
    q = config.get("quantization_config")
    if q is None and isinstance(config.get("text_config"), dict):
        q = config["text_config"].get("quantization_config")
    return q


def open_quantized(ckpt):
    """``ckpt`` itself when its config declares no quantization, else its bf16 view."""
    q = quant_config(ckpt.config)
    if not q:
        return ckpt
    method = q.get("quant_method")
    if method == "fp8":
        return FP8Checkpoint(ckpt, fp8_block(q))
    if method == "mxfp4":
        return MXFP4Checkpoint(ckpt)
    raise CheckpointError(f"{ckpt.path}: quantization_config.quant_method={method!r} is not supported "
                          f"(blockwise 'fp8' and 'mxfp4' are); dequantise the checkpoint to bf16 first")


def fp8_block(q: dict) -> tuple[int, int]:
    block = q.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size={block!r}: blockwise FP8 needs two "
                              f"positive integers [rows, cols] (per-tensor FP8 is not supported)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"quantization_config.fmt={q.get('fmt')!r}: only e4m3 FP8 is supported")
    if q.get("scale_fmt") not in (None, "ue8m0"):
        raise CheckpointError(f"quantization_config.scale_fmt={q.get('scale_fmt')!r}: float32 scales (no "
                              f"scale_fmt) and power-of-two 'ue8m0' scales are supported")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"quantization_config.activation_scheme={q.get('activation_scheme')!r}: only "
                              f"'dynamic' (no stored activation scales) is supported")
    return int(block[0]), int(block[1])


def fp8_grid(shape, block) -> tuple[int, int] | None:
    """The ``weight_scale_inv`` shape of a 2-D weight: ``[ceil(rows/br), ceil(cols/bc)]``."""
    if len(shape) != 2:
        return None
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _span(region, shape) -> list[slice]:
    region = tuple(region or ()) + (slice(None),) * (len(shape) - len(region or ()))
    out = []
    for s, n in zip(region, shape):
        if isinstance(s, int):
            s = slice(s, s + 1)
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("quantised views support contiguous regions only")
        out.append(slice(start, max(start, stop)))
    return out


def _blocks(s: slice, b: int) -> slice:
    """The scale rows (or cols) covering rows ``s`` of blocks of ``b``."""
    return slice(s.start // b, -(-s.stop // b) if s.stop > s.start else s.start // b)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], row0: int = 0,
                   col0: int = 0) -> torch.Tensor:
    """bf16 ``q * scale`` per block; ``q`` starts at (``row0``, ``col0``) of the tensor and
    ``scale`` at the block holding that element."""
    br, bc = block
    s = scale.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)
    r, c = row0 - (row0 // br) * br, col0 - (col0 // bc) * bc
    s = s[r:r + q.shape[0], c:c + q.shape[1]]
    return (q.float() * s).to(torch.bfloat16)


def _expand(scale: torch.Tensor, block, shape) -> torch.Tensor:
    """Block scales ``[..., grid]`` spread over the elements ``[..., shape]`` (a leading batch dim kept)."""
    full = scale.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return full[..., :shape[-2], :shape[-1]]


def _per_block(mask: torch.Tensor, block, grid) -> torch.Tensor:
    """``mask [rows, cols]`` (bool) -> ``[grid]``: whether every element of each block is set."""
    rows, cols = mask.shape
    padded = torch.ones(grid[0] * block[0], grid[1] * block[1], dtype=torch.bool, device=mask.device)
    padded[:rows, :cols] = mask
    return padded.view(grid[0], block[0], grid[1], block[1]).all(dim=3).all(dim=1)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int], pow2: bool = False,
                 reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8, scale_inv)`` of a 2-D tensor (or of a stack ``[N, rows, cols]``, each quantised on
    its own): per block, scale = amax / 448 (1 for an all-zero block), fp8 = w / scale rounded to
    nearest (partial edge blocks use their own amax).
    ``pow2`` (``scale_fmt: ue8m0``, DeepSeek-V3.1): the scale rounded up to a power of two.
    ``reference`` (the source checkpoint's scales): a block keeps its reference scale where that
    scale represents every value of the block exactly (``fp8 * scale`` gives ``w`` back in
    ``w``'s dtype), so unchanged weights are written byte for byte as they were read; any other
    block (e.g. changed by training) gets a fresh scale."""
    rows, cols = w.shape[-2:]
    lead = tuple(w.shape[:-2])  # a stack of same-shaped tensors: quantised each on its own, in one pass
    if lead and reference is not None:
        raise ValueError("quantize_fp8: reference scales apply to a single 2-D tensor")
    grid = fp8_grid((rows, cols), block)
    x = w.float()
    whole = rows % block[0] == 0 and cols % block[1] == 0  # no partial edge blocks: no padded copy
    padded = x if whole else torch.zeros(*lead, grid[0] * block[0], grid[1] * block[1], dtype=torch.float32,
                                         device=w.device)
    if not whole:
        padded[..., :rows, :cols] = x
    blocks = padded.view(*lead, grid[0], block[0], grid[1], block[1])
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    if reference is not None and tuple(reference.shape) == grid:
        ref = reference.to(device=w.device, dtype=torch.float32)
        full_ref = _expand(ref, block, w.shape)
        scaled = x / full_ref
        back = (scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * full_ref).to(w.dtype)
        exact = _per_block(back == w, block, grid)  # clamped values beyond 448 never give w back
        scale = torch.where(exact & (ref > 0), ref, scale)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # each block by its scale
    q = q.view(*lead, grid[0] * block[0], grid[1] * block[1])
    return (q if whole else q[..., :rows, :cols].contiguous()), scale


class FP8Checkpoint:
    """A blockwise-FP8 checkpoint presented with bf16 weights (read-only, same names and shapes)."""

    def __init__(self, ckpt, block: tuple[int, int]):
        self.ckpt, self.block, self.path, self.config = ckpt, block, ckpt.path, ckpt.config
        self.scales: dict[str, str] = {}  # weight -> its scale tensor
        src = ckpt.tensors
        for name, info in src.items():
            if not name.endswith(SCALE_SUFFIX):
                continue
            weight = name[:-len(SCALE_SUFFIX)]
            if weight not in src:
                raise CheckpointError(f"{name}: a block scale without its weight {weight!r} in {self.path}")
            w = src[weight]
            if w.dtype != FP8:
                raise CheckpointError(f"{name}: its weight {weight!r} is {w.dtype}, not float8_e4m3fn")
            want = self.grid(w.shape)
            if want is None or tuple(info.shape) != want:
                raise CheckpointError(
                    f"{name}: shape {tuple(info.shape)} does not fit weight {weight!r} {tuple(w.shape)} with "
                    f"weight_block_size {list(block)} (expected [ceil(rows/{block[0]}), ceil(cols/{block[1]})] "
                    f"= {list(want) if want else 'a 2-D weight'}); the checkpoint is damaged or its "
                    f"quantization_config does not describe it")
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"{name}: a {info.dtype} scale; expected float32")
            self.scales[weight] = name
        for name, info in src.items():
            if info.dtype == FP8 and name not in self.scales:
                raise CheckpointError(f"{name}: an FP8 tensor without its {name + SCALE_SUFFIX!r} in {self.path}; "
                                      f"it cannot be dequantised")
        hidden = set(self.scales.values())
        self.tensors = {}
        for name, info in src.items():
            if name in hidden:
                continue
            if name in self.scales:
                n = math.prod(info.shape)
                info = TensorInfo(name, info.file, torch.bfloat16, tuple(info.shape), 2 * n)
            self.tensors[name] = info
        self.consumed = hidden  # read with their weights: strict accounting counts them as used

    def grid(self, shape) -> tuple[int, int] | None:
        return fp8_grid(shape, self.block)

    @property
    def quantized(self) -> set[str]:
        return set(self.scales)

    def source_scale(self, name: str) -> torch.Tensor | None:
        """The stored ``weight_scale_inv`` of ``name`` (FP8 export reuses it where it is exact)."""
        scale = self.scales.get(name)
        return None if scale is None else self.ckpt.read(scale)

    def names(self):
        return list(self.tensors)

    def info(self, name):
        return self.tensors[name]

    def row_range(self, name: str, region=None):
        """A stored tensor's byte range (``splice``); a quantised weight has none."""
        return None if name in self.scales else self.ckpt.row_range(name, region)

    def read(self, name: str, region=None) -> torch.Tensor:
        scale = self.scales.get(name)
        if scale is None:
            return self.ckpt.read(name, region)
        rows, cols = _span(region, self.tensors[name].shape)
        q = self.ckpt.read(name, (rows, cols))
        s = self.ckpt.read(scale, (_blocks(rows, self.block[0]), _blocks(cols, self.block[1])))
        out = dequantize_fp8(q, s, self.block, rows.start, cols.start)
        if region is not None and any(isinstance(r, int) for r in region):
            out = out[tuple(0 if isinstance(r, int) else slice(None) for r in region)]
        return out

    def close(self):
        self.ckpt.close()


# -- MXFP4 --------------------------------------------------------------------------------------
MX_BLOCK = 32


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[..., G, 16]`` uint8 + ``[..., G]`` uint8 -> fp32 ``[..., G*32]`` (low nibble first)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    vals = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    vals = vals.reshape(*b.shape[:-1], 2 * b.shape[-1])  # [..., G, 32]
    vals = torch.ldexp(vals, scales.to(torch.int32).sub(127).unsqueeze(-1).float())
    return vals.reshape(*b.shape[:-2], b.shape[-2] * 2 * b.shape[-1])


class MXFP4Checkpoint:
    """An MXFP4 checkpoint presented with bf16 ``P [E, in, out]`` for each ``P_blocks``/``P_scales``."""

    def __init__(self, ckpt):
        self.ckpt, self.path, self.config = ckpt, ckpt.path, ckpt.config
        src = ckpt.tensors
        self.pairs: dict[str, tuple[str, str]] = {}
        for name, info in src.items():
            if name.endswith("_scales") and name[:-len("_scales")] + "_blocks" not in src:
                raise CheckpointError(f"{name}: MXFP4 scales without their {name[:-7] + '_blocks'!r} in {self.path}")
            if not name.endswith("_blocks"):
                continue
            base = name[:-len("_blocks")]
            sname = base + "_scales"
            if sname not in src:
                raise CheckpointError(f"{name}: MXFP4 blocks without their scales {sname!r} in {self.path}; "
                                      f"they cannot be dequantised")
            b, s = info, src[sname]
            if (b.dtype != torch.uint8 or s.dtype != torch.uint8 or len(b.shape) != 4 or b.shape[-1] != 16
                    or tuple(s.shape) != tuple(b.shape[:-1])):
                raise CheckpointError(f"{name}: MXFP4 blocks {b.dtype}{tuple(b.shape)} with scales "
                                      f"{s.dtype}{tuple(s.shape)}; expected uint8 [E, R, G, 16] and uint8 [E, R, G]")
            if base in src:
                raise CheckpointError(f"{base}: stored both dequantised and as MXFP4 ({name})")
            self.pairs[base] = (name, sname)
        hidden = {n for pair in self.pairs.values() for n in pair}
        self.tensors = {n: i for n, i in src.items() if n not in hidden}
        for base, (bname, _) in self.pairs.items():
            e, r, g, _ = src[bname].shape
            shape = (e, g * MX_BLOCK, r)
            self.tensors[base] = TensorInfo(base, src[bname].file, torch.bfloat16, shape, 2 * math.prod(shape))
        self.consumed = hidden

    def names(self):
        return list(self.tensors)

    def info(self, name):
        return self.tensors[name]

    def row_range(self, name: str, region=None):
        """A stored tensor's byte range (``splice``); an MXFP4 one has none."""
        return None if name in self.pairs else self.ckpt.row_range(name, region)

    def read(self, name: str, region=None) -> torch.Tensor:
        pair = self.pairs.get(name)
        if pair is None:
            return self.ckpt.read(name, region)
        experts, cols, rows = _span(region, self.tensors[name].shape)  # [E, in, out]
        groups = _blocks(cols, MX_BLOCK)
        b = self.ckpt.read(pair[0], (experts, rows, groups, slice(None)))
        s = self.ckpt.read(pair[1], (experts, rows, groups))
        vals = dequantize_mxfp4(b, s)  # [e, r, g*32]
        c0 = cols.start - groups.start * MX_BLOCK
        vals = vals[:, :, c0:c0 + (cols.stop - cols.start)]
        out = vals.transpose(1, 2).to(torch.bfloat16)
        if region is not None and any(isinstance(r, int) for r in region):
            out = out[tuple(0 if isinstance(r, int) else slice(None) for r in region)]
        return out

    def close(self):
        self.ckpt.close()


# -- export -------------------------------------------------------------------------------------
_NOT_QUANTIZED = re.compile(r"(norm|embed|lm_head|(^|\.)gate\.weight$|_gate\.weight$|\.bias$)")


def default_fp8_names(hf_tensors: dict, keep=frozenset()) -> set[str]:
    """From a bf16 source: the 2-D linear weights DeepSeek-V3 quantises (not norms, embeddings,
    lm_head, router or shared-expert gates), less the names in ``keep`` (the family's)."""
    return {n for n, (shape, _) in hf_tensors.items()
            if n.endswith(".weight") and len(shape) == 2 and not _NOT_QUANTIZED.search(n) and n not in keep}


def export_plan(hf, hf_tensors: dict, config: dict, dtype, peft_format: bool = False, keep=frozenset()
                ) -> tuple[object, tuple | None]:
    """``(dtype for the exporter, fp8 plan or None)`` for an export ``dtype`` (a torch dtype,
    None, "fp8" or "mxfp4"). The plan is ``(names to quantise, block, quantization_config,
    reference scales or None)``: the names the source stored as FP8 (its block, config and
    scales), else ``default_fp8_names`` less ``keep``."""
    if isinstance(dtype, str) and dtype.lower() == "mxfp4":
        raise UsageError(MXFP4_EXPORT_REFUSAL)
    if not (isinstance(dtype, str) and dtype.lower() == "fp8"):
        return dtype, None
    if peft_format:
        raise UsageError("dtype='fp8' exports base weights; a LoRA adapter (peft_format) is exported unquantised")
    if hf_tensors is None:
        raise UsageError("dtype='fp8' needs the HF tensor shapes: build the Bridge from an HF source")
    while hf is not None and not isinstance(hf, FP8Checkpoint):  # under a stacked-experts view
        hf = getattr(hf, "ckpt", None)
    q = quant_config(config) or {}
    if isinstance(hf, FP8Checkpoint):
        return None, (hf.quantized, hf.block, dict(q), hf.source_scale)
    if q.get("quant_method") == "fp8" and hf is None:  # built from a config: the block as configured
        return None, (default_fp8_names(hf_tensors, keep), fp8_block(q), dict(q), None)
    return None, (default_fp8_names(hf_tensors, keep), tuple(DEFAULT_FP8_CONFIG["weight_block_size"]),
                  dict(DEFAULT_FP8_CONFIG), None)


def export_config(config: dict, plan) -> dict:
    """The config.json to write: the source's quantization_config only for an FP8 export."""
    out = dict(config)
    text = out.get("text_config")
    where = out if "quantization_config" in out or not isinstance(text, dict) else dict(text)
    where.pop("quantization_config", None)
    if plan is not None:
        where["quantization_config"] = plan[2]
    if where is not out:
        out["text_config"] = where
    return out


def quantize_stream(stream: Iterable[tuple[str, torch.Tensor]], plan) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in; the planned names out as FP8 followed by their ``_scale_inv``."""
    if plan is None:
        yield from stream
        return
    names, block, config, reference = plan
    pow2 = config.get("scale_fmt") == "ue8m0"
    for name, t in stream:
        if name in names:
            q, s = quantize_fp8(t, block, pow2, reference(name) if reference else None)
            yield name, q
            yield name + SCALE_SUFFIX, s
        else:
            yield name, t


STACK_ELEMENTS = 1 << 26  # elements per stacked quantisation (its fp32 temporaries: a few x 256 MB)


def quantize_buckets(stream, plan, stack: bool | None = None):
    """An ``Exporter.iterate_buckets`` stream with each bucket's planned tensors quantised (the
    bucket is re-packed downstream). ``stack`` (default: for tensors on an accelerator): planned
    tensors of one shape without reference scales (a layer's experts) are quantised as one stack,
    the same bytes as one by one. On a GPU that is one set of kernels for a bucket's hundreds of
    small expert matrices instead of a dozen launches each (Qwen3-30B-A3B: 9,216 of them); on a CPU
    one by one is faster (each matrix's temporaries stay in cache), so it stays that way there."""
    if plan is None:
        yield from stream
        return
    names, block, config, reference = plan
    pow2 = config.get("scale_fmt") == "ue8m0"
    for bucket, tensors, buf in stream:
        if tensors is None:
            yield bucket, tensors, buf
            continue
        groups: dict = {}
        refs = {}  # index -> the source's scales (None: fresh ones), for every planned tensor
        for i, (name, t) in enumerate(tensors):
            if name in names:
                refs[i] = reference(name) if reference else None
                if refs[i] is None and (stack if stack is not None else t.device.type != "cpu"):
                    groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
        done = {}
        for (shape, _, _), idx in groups.items():
            per = max(1, STACK_ELEMENTS // max(1, math.prod(shape)))  # bounds the stack's fp32 temporaries
            for part in (idx[j:j + per] for j in range(0, len(idx), per)):
                if len(part) > 1:
                    q, s = quantize_fp8(torch.stack([tensors[i][1] for i in part]), block, pow2)
                    done.update({i: (q[k], s[k]) for k, i in enumerate(part)})
        out = []
        for i, (name, t) in enumerate(tensors):
            if i not in refs:
                out.append((name, t))
                continue
            q, s = done[i] if i in done else quantize_fp8(t, block, pow2, refs[i])
            out += [(name, q), (name + SCALE_SUFFIX, s)]
        yield bucket, out, None


def output_entries(name: str, shape, plan) -> list[tuple[str, tuple, torch.dtype]]:
    """The tensors an exported ``name`` becomes in the written checkpoint: itself (FP8 when
    planned) and, when planned, its scale."""
    if plan is None or name not in plan[0]:
        return []
    br, bc = plan[1]
    return [(name, tuple(shape), FP8), (name + SCALE_SUFFIX, (-(-shape[0] // br), -(-shape[1] // bc)), torch.float32)]


def dequantized_copy(src, dst) -> None:
    """Write ``src`` (a quantised HF directory) into ``dst`` as the bf16 checkpoint its views
    present: one output file per source file, config.json without ``quantization_config``, side
    files copied. (The HF reference of verification is loaded from such a copy: transformers'
    own CPU dequantisation derives the block from the scale grid, wrong for partial edge blocks.)"""
    from pathlib import Path

    from . import hf_io

    src, dst = Path(src), Path(dst)
    view = open_quantized(hf_io.HFCheckpoint(src))
    dst.mkdir(parents=True, exist_ok=True)
    need = sum(view.info(n).nbytes for n in view.names())
    free = shutil.disk_usage(dst).free
    if need > free:  # refused before the first byte, not by a full disk halfway
        view.close()
        raise WriteError(errno.ENOSPC, f"the dequantised copy of {src} needs {need / 1e9:.1f} GB and its disk has "
                         f"{free / 1e9:.1f} GB free; point TMPDIR at a disk with room", str(dst))
    by_file: dict = {}
    for name in view.names():
        by_file.setdefault(view.info(name).file, []).append(name)
    files = sorted(by_file)
    weight_map = {}
    for i, f in enumerate(files):
        out = hf_io.shard_file_name(i, len(files))
        hf_io.write_shard(dst / out, {n: view.read(n).clone() for n in by_file[f]})
        weight_map.update({n: out for n in by_file[f]})
    if len(files) > 1:
        (dst / hf_io.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    hf_io.copy_side_files(src, dst, export_config(view.config, None))
    view.close()
