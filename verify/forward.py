"""Forward passes on both sides: the reference HF model and the sharded megatron model."""

from __future__ import annotations

import contextlib

import torch

from mcore_bridge.errors import UsageError


@contextlib.contextmanager
def exact_fp32():
    """fp32 means fp32 for the duration: no TF32 in cuDNN convolutions (on by default in torch,
    e.g. a vision tower's patch embedding) or CUDA matmuls; both settings restored afterwards.
    Measured on an H200: with cuDNN's TF32 the Qwen3-VL demo's fp32 logits differed by 5e-5."""
    if not torch.cuda.is_available():
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        matmul.allow_tf32 = saved


def _torch_original(fn):
    """The plain-torch function behind a transformers kernel-with-fallback wrapper that dispatches
    elsewhere; None for anything else (or a wrapper already on its torch path)."""
    for _ in range(4):  # through any outer wrappers (functools.wraps chains)
        code = getattr(fn, "__code__", None)
        if code is None or not hasattr(fn, "__wrapped__"):
            return None
        if "use_kernel_func_from_hub_with_fallback" in getattr(code, "co_qualname", ""):
            cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
            cell = cells.get("is_new_implementation")
            return None if cell is not None and not cell.cell_contents else fn.__wrapped__
        fn = fn.__wrapped__
    return None


@contextlib.contextmanager
def reference_torch_paths():
    """For the duration, transformers' models call their own plain-torch implementations where
    transformers would otherwise dispatch to an optional kernel package; yields what it switched.

    transformers (5.x) decorates such functions with ``use_kernel_func_from_hub_with_fallback``: when
    the package is importable (``fla`` for the gated delta rule of Qwen3-Next / Qwen3.5), the call
    goes to the package's kernel, chosen once at import. fla's Triton ``chunk_gated_delta_rule``
    computes fp32 dots in TF32: on an H200 at Qwen3-Next's shapes it was 1.45e-3 (relative) from the
    torch rule it replaces (``bench/gpu_deltanet_check.py``), and an fp32 reference that carries
    that error cannot judge a conversion at fp32 precision. Each swapped name is a module attribute
    of a ``transformers.models.*`` module, read at call time by the model's forward; every one is
    restored on exit. The decorated function keeps its torch original as ``__wrapped__``."""
    import sys

    swapped = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("transformers.models."):
            continue
        for attr, fn in list(vars(module).items()):
            original = _torch_original(fn)
            if original is not None:
                swapped.append((module, attr, fn))
                setattr(module, attr, original)
    try:
        yield [f"{m.__name__}.{a}" for m, a, _ in swapped]
    finally:
        for module, attr, fn in swapped:
            setattr(module, attr, fn)


def megatron_logits(models, input_ids: torch.Tensor, vocab_size: int, position_ids: torch.Tensor | None = None,
                    vision: dict | None = None, mtp: list | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits ``[B, S, vocab]`` of a sharded megatron model, on the last pipeline
    stage (``None`` elsewhere). Runs megatron's own pipeline schedule, one sample per micro-batch,
    with no attention mask (nor does ``hf_forward`` pass one): no padding is ever masked on either
    side. That is what a hybrid family needs: megatron-core's ``GatedDeltaNet`` ignores
    ``attention_mask`` while transformers' delta-net zeroes the padded positions, so a masked,
    left-padded batch would differ on its real tokens (tests/test_gdn_padding.py).
    Vision-language models take 3-D ``position_ids [3, B, S]`` and the ``vision`` inputs
    (``pixel_values``, ``image_grid_thw``) of a one-sample batch.

    A model with multi-token-prediction layers runs with labels (megatron-core 0.16 needs them to
    run its MTP block; it then returns the loss): the logits are taken from its output layer,
    which it calls once per MTP depth and then for the main logits; the MTP ones go into ``mtp``
    (one ``[B, S, vocab]`` per depth; position i of depth k predicts token i + k + 2)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = input_ids.shape
    device = next(models[0].parameters()).device
    input_ids = input_ids.to(device)
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    position_ids = position_ids.to(device)
    extra = {k: v.to(device) for k, v in (vision or {}).items()}
    if extra and batch != 1:
        raise UsageError("vision inputs are given for one sample at a time")
    collected = []

    mtp_collected = []

    def full(logits):
        return gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()

    def step(data_iterator, model):
        sample, pos = next(data_iterator)
        if getattr(model, "mtp_process", False) and getattr(model, "post_process", False):
            calls = []
            # a copy: megatron's vocab-parallel cross entropy then works on the logits in place
            hook = model.output_layer.register_forward_hook(lambda _m, _i, out: calls.append(out[0].clone()))
            try:
                out = model(sample, pos, None, labels=sample, **extra)
            finally:
                hook.remove()
            *heads, main = [c.transpose(0, 1) for c in calls]  # [S, B, V/tp] -> [B, S, V/tp]
        else:
            out, heads, main = model(sample, pos, None, **extra), None, None

        def loss_func(output):
            collected.append(full(output if main is None else main))
            if heads is not None:
                mtp_collected.append([full(h) for h in heads])
            return output.new_zeros(()), {}

        return out, loss_func

    samples = [(input_ids[i:i + 1], position_ids[..., i:i + 1, :]) for i in range(batch)]
    if len(models) > 1:  # the interleaved schedule wants at least pp micro-batches: repeat the last
        samples += samples[-1:] * max(0, ps.get_pipeline_model_parallel_world_size() - batch)
    iters = [iter(samples) for _ in models]
    with torch.no_grad(), exact_fp32():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters if len(models) > 1 else iters[0],
            model=models if len(models) > 1 else models[0], num_microbatches=len(samples), seq_length=seq,
            micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    if mtp is not None and mtp_collected:
        mtp += [torch.cat([m[k] for m in mtp_collected[:batch]], dim=0).cpu() for k in range(len(mtp_collected[0]))]
    return torch.cat(collected[:batch], dim=0).cpu()


_DEQUANTISED: dict = {}  # one dequantised copy per process: {(source, its files' sizes and times): TemporaryDirectory}


@contextlib.contextmanager
def reference_dir(hf_dir):
    """``hf_dir`` as the reference reads it: a quantised (FP8 / MXFP4) checkpoint as a temporary
    dequantised copy (``quant.dequantized_copy``), anything else as it is. Everything the reference
    reads (the model, an MTP layer's own tensors) comes from the directory this yields. The copy is
    made once per process and source (the fp32, fp64 and bf16 references of a run share it) and
    removed at exit, or when another source's copy replaces it."""
    import json
    import tempfile
    from pathlib import Path

    from mcore_bridge import quant

    if not quant.quant_config(json.loads((Path(hf_dir) / "config.json").read_text())):
        yield Path(hf_dir)
        return
    root = Path(hf_dir).resolve()
    key = (str(root),) + tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.iterdir())
                               if f.is_file())
    if key not in _DEQUANTISED:
        while _DEQUANTISED:  # the disk holds one copy at a time
            _DEQUANTISED.popitem()[1].cleanup()
        tmp = tempfile.TemporaryDirectory(prefix="mcore-bridge-dequantised-")
        try:
            quant.dequantized_copy(root, tmp.name)
        except BaseException:
            tmp.cleanup()  # nothing partial left behind
            raise
        _DEQUANTISED[key] = tmp
    yield Path(_DEQUANTISED[key].name)


def hf_model(hf_dir, dtype=torch.float32, device="cpu"):
    """The real transformers model in ``hf_dir`` (the reference): a causal LM, or the
    image-text-to-text model of a vision-language checkpoint; a quantised checkpoint's model holds
    the dequantised weights."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging

    logging.disable_progress_bar()
    with reference_dir(hf_dir) as d:
        config = json.loads((d / "config.json").read_text())
        cls = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
        return as_reference(cls.from_pretrained(d, dtype=dtype), dtype).to(device).eval()


def as_reference(model, dtype):
    """An fp64 reference (the calibration of an fp32 check) runs transformers' eager experts: its
    default ``grouped_mm`` takes no float64."""
    if dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


def hf_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               vision: dict | None = None) -> torch.Tensor:
    """Logits of ``model`` for ``input_ids [B, S]`` (+ 3-D ``position_ids [3, B, S]`` and vision
    inputs for vision-language models)."""
    device = next(model.parameters()).device
    kw = {k: v.to(device) for k, v in (vision or {}).items()}
    if position_ids is not None:
        kw["position_ids"] = position_ids.to(device)
    with reference_run(model):
        return model(input_ids=input_ids.to(device), use_cache=False, **kw).logits


@contextlib.contextmanager
def reference_run(model):
    """How every forward of a reference model runs (``hf_forward``, and ``verify.mtp``'s formula on
    the same model): no TF32 anywhere, and an fp32 / fp64 model on transformers' plain-torch paths
    (``reference_torch_paths``); a bf16 model runs the way users run it."""
    precise = next(model.parameters()).dtype in (torch.float32, torch.float64)
    with exact_fp32(), (reference_torch_paths() if precise else contextlib.nullcontext()):
        yield


def hf_logits(hf_dir, input_ids: torch.Tensor, dtype=torch.float32, device="cpu", position_ids=None,
              vision=None) -> torch.Tensor:
    """Logits of the real transformers model (the reference), returned on the CPU in fp32."""
    model = hf_model(hf_dir, dtype, device)
    with torch.no_grad():
        return hf_forward(model, input_ids, position_ids, vision).float().cpu()
