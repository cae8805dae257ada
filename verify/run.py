"""Verify one (model, layout, dtype): HF and megatron forwards side by side, inside a process group.

    python -m torch.distributed.run --nproc-per-node 2 -m verify.run --model builtin:qwen3 \
        --layout '{"tp": 2, "sp": true}' --dtype fp32 --report reports/

Every rank runs the megatron model; rank 0 runs the transformers reference (or loads it from
``--reference-cache``), computes the metrics and writes the report.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_bridge.bridge import DTYPES, Bridge
from mcore_bridge.errors import UsageError
from mcore_bridge.layout import ParallelLayout
from mcore_bridge.runtime import dist as rt

from . import controls, metrics, mtp
from . import isolate as iso
from .detection import apply as apply_detection
from .detection import perturbed_outputs, summarise
from .forward import hf_forward, hf_model, megatron_logits, reference_dir
from .inputs import Sample, default_samples, multimodal_samples
from .probes import hf_probes, megatron_probes, probe_layer, probe_order

SCHEMA = "mcore-bridge-verify/1"
# the reference's dtypes: the verified ones, and fp64 for the calibration of an fp32 check
REF_DTYPES = {**DTYPES, "fp64": torch.float64}


# ---- reference (transformers) ------------------------------------------------------------------
def hf_reference(model_dir: Path, samples: list[Sample], dtype: torch.dtype, device: str,
                 adapter: Path | None = None) -> dict:
    """Logits ``[S, V]`` and probes ``{name: [S, H]}`` per sample from the real HF model (with the
    PEFT ``adapter`` on it, through PEFT itself). A quantised checkpoint: its dequantised copy,
    read by the model and by the MTP reference alike (``forward.reference_dir``)."""
    with reference_dir(model_dir) as model_dir:
        mtp_depths = mtp.depths(model_dir)
        if mtp_depths:  # with the MTP layers' decoder layers, loaded by transformers, set aside
            model, mtp_layers = mtp.load(model_dir, dtype, device, mtp_depths)
        else:
            model = hf_model(model_dir, dtype, device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).get_base_model().eval()  # LoRA layers inside
        out = {}
        with torch.no_grad():
            for s in samples:
                store = {}
                pos = None if s.position_ids is None else s.position_ids[:, None]
                with hf_probes(model, store):
                    logits = hf_forward(model, s.input_ids[None], pos, s.vision)
                out[s.name] = {"logits": logits[0].float().cpu(), "probes": {k: v[0] for k, v in store.items()}}
                if mtp_depths:  # transformers has no MTP forward: our reference of the formula
                    out[s.name]["mtp"] = [{k: v.cpu() for k, v in d.items()}
                                          for d in mtp.reference(model, mtp_layers, model_dir, s.input_ids,
                                                                 pos, s.vision)]
    return out


def _reference_key(model_dir: Path, samples, dtype: str, adapter: Path | None = None) -> str:
    h = hashlib.sha256()
    for d in [model_dir] + ([adapter] if adapter is not None else []):
        h.update(str(Path(d).resolve()).encode())
        for f in sorted(Path(d).iterdir()):
            if f.suffix in (".json", ".safetensors"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for s in samples:
        h.update(s.name.encode() + s.input_ids.numpy().tobytes())
        for t in [s.position_ids] + [s.vision[k] for k in sorted(s.vision)]:
            if t is not None:
                h.update(t.numpy().tobytes())
    h.update(dtype.encode())
    h.update(b"mtp-routing")  # what a cached reference holds: since MoE MTP layers' routing is recorded too
    return h.hexdigest()[:24]


def reference(model_dir: Path, samples, dtype: str, device: str, cache_dir: Path | None = None,
              adapter: Path | None = None) -> dict:
    """``hf_reference`` memoised on disk (tensors only; loaded with ``weights_only=True``)."""
    if cache_dir is None:
        return hf_reference(model_dir, samples, REF_DTYPES[dtype], device, adapter)
    path = Path(cache_dir) / f"ref-{_reference_key(model_dir, samples, dtype, adapter)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    ref = hf_reference(model_dir, samples, REF_DTYPES[dtype], device, adapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{rt.rank()}")
    torch.save(ref, tmp)
    tmp.replace(path)
    return ref


# ---- megatron side -----------------------------------------------------------------------------
def megatron_outputs(models, samples, vocab: int, sequence_parallel: bool, inject=None) -> dict:
    """Per sample: logits (last stage) and probes (all stages), merged on rank 0 (None elsewhere).
    ``inject(sample name)``: a context manager held around that sample's forward (``verify.isolate``)."""
    import contextlib

    from megatron.core import parallel_state as ps

    mine = {}
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    for s in samples:
        store = {}
        pos = None if s.position_ids is None else s.position_ids[:, None]
        heads = []  # MTP logits per depth (models with MTP layers)
        with (inject(s.name) if inject else contextlib.nullcontext()), \
                megatron_probes(models, store, sequence_parallel):
            logits = megatron_logits(models, s.input_ids[None], vocab, pos, s.vision, mtp=heads)
        if keep:
            mine[s.name] = {"logits": None if logits is None else logits[0],
                            "probes": {k: v[0] for k, v in store.items()}}
            if heads:
                mine[s.name]["mtp_logits"] = [h[0] for h in heads]
    parts = iso.gather(mine)
    if parts is None:
        return None
    merged = {s.name: {"logits": None, "probes": {}} for s in samples}
    for part in parts:
        for name, out in (part or {}).items():
            if out["logits"] is not None:
                merged[name]["logits"] = out["logits"]
            if "mtp_logits" in out:
                merged[name]["mtp_logits"] = out["mtp_logits"]
            merged[name]["probes"].update(out["probes"])
    return merged


# ---- comparison --------------------------------------------------------------------------------
def compare(samples, ref: dict, got: dict) -> tuple[dict, dict]:
    per_input = {s.name: metrics.compare_logits(ref[s.name]["logits"], got[s.name]["logits"], s.labels)
                 for s in samples}
    weights = {s.name: s.input_ids.numel() for s in samples}
    return metrics.combine(per_input, weights), per_input


def probes_of(samples, ref: dict, num_layers: int) -> list[str]:
    """Probe names in forward order; vision probes as the reference recorded them (vision-language
    models, samples with images)."""
    vision = []
    for s in samples:
        vision += [n for n in ref[s.name]["probes"] if n.startswith("vision.") and n not in vision]
    return probe_order(num_layers, vision)


def layer_drift(samples, ref: dict, got: dict, probes: list[str]) -> dict[str, dict]:
    """Worst drift per probe over all samples (vision probes: over the samples with images)."""
    out = {}
    for name in probes:
        worst = {"rel_mean_diff": 0.0, "max_diff": 0.0}
        for s in samples:
            if name not in ref[s.name]["probes"] and name.startswith("vision."):
                if name in got[s.name]["probes"]:
                    raise RuntimeError(f"megatron ran vision probe {name} on sample {s.name}, HF did not")
                continue  # a text-only sample
            if name not in got[s.name]["probes"]:
                raise RuntimeError(f"megatron probe {name} missing for sample {s.name}")
            d = metrics.probe_drift(ref[s.name]["probes"][name], got[s.name]["probes"][name])
            worst = {k: max(worst[k], d[k]) for k in worst}
        out[name] = worst
    return out


def routing(samples, ref: dict, got: dict, num_layers: int) -> dict[int, float]:
    """Router agreement per MoE layer (token-weighted over samples); {} for dense models."""
    out = {}
    for layer in range(num_layers):
        name = f"router.{layer}"
        if name not in got[samples[0].name]["probes"]:
            continue
        agree, tokens = 0.0, 0
        for s in samples:
            if name not in ref[s.name]["probes"]:
                raise RuntimeError(f"{name}: the megatron layer routes tokens, the HF layer does not")
            ref_map, got_map = ref[s.name]["probes"][name], got[s.name]["probes"][name]
            agree += metrics.routing_agreement(ref_map, got_map) * ref_map.shape[0]
            tokens += ref_map.shape[0]
        out[layer] = agree / tokens
    return out


def layer_params(bridge: Bridge, probe: str) -> tuple[list[str], list[str]]:
    """HF and megatron parameter names behind a probe (what to look at when it drifts)."""
    layer = probe_layer(probe)
    if probe.startswith(("router.", "shared_experts.")):  # one MoE layer's router / shared expert(s) (verify.isolate)
        layer = int(probe.split(".")[1])
        part = ".mlp.router." if probe.startswith("router.") else ".mlp.shared_experts."
        units = [u for u in bridge.units if u.layer == layer and part in u.rule.mcore]
    elif layer is not None:
        units = [u for u in bridge.units if u.layer == layer]
    elif probe.startswith("vision."):
        units = [u for u in bridge.units if u.rule.mcore.startswith(vision_prefixes(probe))]
    elif probe == "embedding":
        units = [u for u in bridge.units if u.rule.mcore.startswith("embedding.")]
    elif probe == "output_layer":  # tied embeddings: the word embedding is the output layer
        units = [u for u in bridge.units if u.rule.mcore.startswith("output_layer.")] or \
            [u for u in bridge.units if u.rule.mcore.startswith("embedding.word_embeddings.")]
    else:
        units = [u for u in bridge.units if u.rule.mcore.startswith("decoder.final_layernorm")]
    hf = [n for u in units for n in u.hf_names]
    mc = list(dict.fromkeys(u.rule.mcore.replace("{L}", str(layer)) for u in units))
    return hf, mc


def expert_params(bridge: Bridge, layer: int, expert: int) -> dict:
    """HF and megatron parameter names of one routed expert of one layer."""
    units = [u for u in bridge.units if u.layer == layer and getattr(u, "expert", None) == expert]
    return {"hf_params": [n for u in units for n in u.hf_names],
            "mcore_params": list(dict.fromkeys(u.rule.mcore.replace("{L}", str(layer)).replace("{E}", str(expert))
                                               for u in units))}


def vision_prefixes(probe: str) -> tuple[str, ...]:
    """Megatron parameter prefixes behind a vision probe; the first block also owns what comes
    before it (patch embedding, learned position embedding)."""
    _, kind, *index = probe.split(".")
    siglip = "visual.vision_tower."  # a SigLIP tower + projector (Gemma 3)
    if kind == "block":
        own = (f"visual.blocks.{index[0]}.", f"{siglip}encoder.layers.{index[0]}.")
        return own + (("visual.patch_embed.", "visual.pos_embed.", f"{siglip}embeddings.") if index[0] == "0" else ())
    if kind == "deepstack":
        return (f"visual.deepstack_merger_list.{index[0]}.",)
    return ("visual.merger.", f"{siglip}post_layernorm.", "visual.multi_modal_projector.")


def build_report(*, bridge, layout, dtype, device, samples, ref32, got, calib=None, timing, name,
                 source: str | None = None) -> dict:
    """``source``: the model as the user named it (``builtin:NAME`` or the path as given), never
    the resolved cache directory: reports are shared, a machine's home directory is not."""
    num_layers = bridge.family.num_layers
    probes = probes_of(samples, ref32, num_layers)
    overall, per_input = compare(samples, ref32, got)
    routed = routing(samples, ref32, got, num_layers)
    if routed:
        overall["router_agreement"] = min(routed.values())
    calibration = None
    if calib is not None:  # HF's own error at this dtype: bf16 against ref32, or ref32 against fp64 (calib)
        truth, own = (calib, ref32) if dtype == "fp32" else (ref32, calib)
        cal_overall, _ = compare(samples, truth, own)
        cal_layers = layer_drift(samples, truth, own, probes)
        cal_routed = routing(samples, truth, own, num_layers) if routed else {}
        if cal_routed:
            cal_overall["router_agreement"] = min(cal_routed.values())
        # the key predates fp32 calibration: it holds HF at the verified dtype against the more precise run
        calibration = {"hf_bf16_vs_fp32": cal_overall, "against": "fp64" if dtype == "fp32" else "fp32",
                       "layers": [cal_layers[p]["rel_mean_diff"] for p in probes]}
    gate = "with_loss" if bridge.family.multimodal else "all"  # image and prompt tokens carry no loss
    tokens = (sum(s.input_ids.numel() for s in samples), sum(s.loss_tokens for s in samples))
    limits = metrics.thresholds(dtype, calibration and calibration["hf_bf16_vs_fp32"], moe=bool(routed), gate=gate,
                                tokens=tokens)
    drift = layer_drift(samples, ref32, got, probes)
    layers, first = [], None
    for i, probe in enumerate(probes):
        limit = limits["layer_rel_drift"]
        if calibration is not None:
            limit = max(limit, metrics.calibration_factor(dtype) * calibration["layers"][i])
        entry = {"probe": probe, "layer": probe_layer(probe), **drift[probe], "threshold": limit}
        ok = drift[probe]["rel_mean_diff"] <= limit
        routing_ok = True
        if entry["layer"] in routed:
            entry["router_agreement"] = routed[entry["layer"]]
            routing_ok = routed[entry["layer"]] >= limits["router_agreement_min"]
        entry["ok"] = ok and routing_ok
        layers.append(entry)
        if not entry["ok"] and first is None:
            hf, mc = layer_params(bridge, probe)
            # A layer whose tokens went to other experts points at the router (weights, bias,
            # settings); same routing but drifting output points at the layer's other weights.
            first = {"probe": probe, "layer": probe_layer(probe), "rel_mean_diff": drift[probe]["rel_mean_diff"],
                     "cause": "weights" if routing_ok else "routing", "hf_params": hf, "mcore_params": mc}
            if not routing_ok:
                first["router_agreement"] = routed[entry["layer"]]
            first_limit = limit
    fails = metrics.failures(overall, limits, gate)
    mtp_section, mtp_fails, mtp_first = mtp.compare(samples, ref32, got, limits, gate, bridge, calib, dtype)
    if first is None and mtp_first is not None:  # the main model is fine up to its head: the MTP layer
        first = mtp_first
        first_limit = mtp_first.pop("threshold")
    if first is not None:
        if first["cause"] == "routing":
            fails.append(f"{first['probe']} routing: {first['router_agreement']:.3f} of tokens reach the "
                         f"same experts (< {limits['router_agreement_min']:.3f})")
        else:
            fails.append(f"{first['probe']} drift {first['rel_mean_diff']:.2e} > {first_limit:.2e}")
    fails += [f for f in mtp_fails if f not in fails]
    return {
        "schema": SCHEMA, "model": name, "source": source or str(bridge.source), "family": bridge.family.name,
        "layout": layout.to_dict(), "layout_id": layout.short(), "dtype": dtype, "device": device,
        "world_size": rt.world_size(), "versions": versions(), "timing": timing,
        "inputs": [s.describe() for s in samples], "metrics": overall, "per_input": per_input,
        "thresholds": limits, "gate": gate, "layers": layers, "first_diverging": first, "calibration": calibration,
        **({"mtp": mtp_section} if mtp_section else {}),
        "failures": fails, "verdict": "fail" if fails else "pass",
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def versions() -> dict:
    import megatron.core
    import transformers

    import mcore_bridge

    return {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__, "mcore_bridge": mcore_bridge.__version__}


def model_name(source: str) -> str:
    s = str(source)
    return f"{s.split(':', 1)[1]}-tiny" if s.startswith("builtin:") else Path(s).resolve().name


def run_layout(source: str, layout: ParallelLayout, dtype: str = "fp32", device: str = "auto",
               control: str | None = None, reference_cache: Path | None = None,
               lengths=None, grouped_experts: bool = False, adapter: str | None = None, grad: bool = False,
               train_steps: int = 0, detection: bool = True, isolate: bool = False,
               fp32_calibration: bool | None = None) -> dict | None:
    """Collective: convert ``source`` into ``layout`` and verify it. The report on rank 0.
    ``grouped_experts``: MoE experts built as megatron's grouped-GEMM module (bf16 only in 0.16).
    ``adapter``: a PEFT directory put on both sides (megatron LoRA vs HF + PeftModel).
    ``grad`` / ``train_steps``: also compare gradients / N AdamW steps (``verify.grad``, fp32).
    ``detection``: also run the standard positive controls (``verify.detection``; not with ``control``).
    ``isolate``: also the layer-isolated (teacher-forced) comparison (``verify.isolate``).
    ``fp32_calibration``: see ``verify_loaded`` (None: on a GPU)."""
    t0 = time.time()
    _refuse_unsupported(layout)
    bridge = Bridge(source, layout)
    if (grad or train_steps) and getattr(bridge.family, "mtp_layers", 0):
        from mcore_bridge.errors import UsageError

        raise UsageError("--grad / --train-steps on a model with multi-token-prediction layers: megatron adds the "
                         "MTP loss (mtp_loss_scaling_factor) to every gradient and transformers has no MTP, so the "
                         "gradients are not comparable; verify the forward (logits and MTP heads) instead")
    controls.before_build(bridge, control)
    device = bridge.setup(device)
    models = bridge.build_model(DTYPES[dtype], grouped_experts=grouped_experts)
    bridge.load_weights(models)
    if adapter:
        bridge.load_adapter(models, adapter)
    controls.after_load(models, bridge, control)
    report = verify_loaded(bridge, models, bridge.source, dtype=dtype, name=model_name(source),
                           reference_cache=reference_cache, lengths=lengths, load_s=time.time() - t0,
                           adapter=Path(adapter) if adapter else None, source=str(source),
                           detection=detection and not control, isolate=isolate,
                           fp32_calibration=fp32_calibration)
    if grad or train_steps:
        if dtype != "fp32":
            raise ValueError("--grad / --train-steps compare fp32 gradients: use --dtype fp32")
        from .grad import run_checks

        report = run_checks(report, bridge, models, samples_for(bridge, bridge.source, lengths), bridge.source,
                            grad=grad, train_steps=train_steps, adapter=Path(adapter) if adapter else None,
                            control=control)
    if report is not None and control:
        report["control"] = control
    if report is not None and grouped_experts:  # another case than SequentialMLP experts
        report["layout_id"] += "-grouped"
    return report


def verify_loaded(bridge: Bridge, models, hf_dir: Path, *, dtype: str, name: str,
                  reference_cache: Path | None = None, lengths=None, load_s: float = 0.0,
                  adapter: Path | None = None, source: str | None = None, detection: bool = False,
                  isolate: bool = False, fp32_calibration: bool | None = None) -> dict | None:
    """Collective: compare loaded megatron ``models`` with the HF model in ``hf_dir`` (plus the
    PEFT ``adapter`` on it). ``detection``: also the standard positive controls, one more megatron
    forward each against the same reference (``verify.detection``). ``isolate``: also every layer
    fed the HF layer's input, and every MoE expert re-run on the same tokens on both sides
    (``verify.isolate``; one more HF and one more megatron forward). ``fp32_calibration`` (default: on
    a GPU): an fp32 check also runs the HF model in fp64, and no limit is tighter than ``FP32_FACTOR``
    x HF's own fp32 error against it (``metrics.thresholds``). Runs megatron forwards: the caller
    keeps a ``compat.scope`` open."""
    _refuse_unsupported(bridge.layout)
    t0 = time.time()
    vocab = int(bridge.family.cfg.require("vocab_size"))
    samples = samples_for(bridge, hf_dir, lengths)
    got = megatron_outputs(models, samples, vocab, bridge.layout.sp)
    t_mg = time.time() - t0
    runs = perturbed_outputs(bridge, models, samples, vocab, megatron_outputs) if detection else []
    t_det = time.time() - t0 - t_mg
    if isolate:

        if bridge.layout.cp > 1:
            raise UsageError("the isolated comparison (--isolate) does not split the injected hidden states "
                             "for context parallelism: run it with cp=1")
        t_iso = time.time()
        iso_ref = iso.hf_isolation_reference(hf_dir, samples, bridge.device, adapter) if rt.rank() == 0 else None
        iso_got, iso_experts = iso.run_megatron(models, samples, vocab, bridge.layout.sp, iso_ref, megatron_outputs)
        t_iso = time.time() - t_iso
    if rt.rank() != 0:
        return None
    t1 = time.time()
    device = bridge.device
    ref32 = reference(hf_dir, samples, "fp32", device, reference_cache, adapter)
    if dtype != "fp32":
        calib = reference(hf_dir, samples, dtype, device, reference_cache, adapter)
    elif fp32_calibration if fp32_calibration is not None else device == "cuda":
        calib = reference(hf_dir, samples, "fp64", device, reference_cache, adapter)
    else:
        calib = None
    timing = {"load_s": load_s, "megatron_forward_s": t_mg, "reference_s": time.time() - t1}
    report = build_report(bridge=bridge, layout=bridge.layout, dtype=dtype,
                          device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                          samples=samples, ref32=ref32, got=got, calib=calib, timing=timing, name=name,
                          source=source)
    if detection:
        kw = dict(bridge=bridge, layout=bridge.layout, dtype=dtype, device=report["device"], samples=samples,
                  ref32=ref32, calib=calib, timing={}, name=name, source=source)
        control_reports = [(run, build_report(got=run["got"], **kw)) for run in runs]
        apply_detection(report, summarise(report, control_reports))
        report["timing"]["detection_s"] = t_det
    if isolate:
        iso.apply(report, iso.summarise(report, samples, iso_ref, iso_got, iso_experts,
                                        lambda probe: dict(zip(("hf_params", "mcore_params"), layer_params(bridge, probe))),
                                        lambda layer, e: expert_params(bridge, layer, e)))
        report["timing"]["isolate_s"] = t_iso
    report["timing"]["total_s"] = load_s + time.time() - t0
    if bridge.lora is not None:  # another case than the bare model: megatron LoRA vs the reference
        report["adapter"] = {"reference": str(adapter) if adapter else f"{source or hf_dir} (merged)", **bridge.lora.to_dict()}
        report["layout_id"] += "-lora"
    return report


def samples_for(bridge: Bridge, hf_dir: Path, lengths=None) -> list[Sample]:
    """Verify's inputs for this model (text, or images and text for vision-language models)."""
    if bridge.family.multimodal:
        return multimodal_samples(bridge.family, hf_dir, **({"lengths": lengths} if lengths else {}))
    return default_samples(int(bridge.family.cfg.require("vocab_size")), hf_dir, **({"lengths": lengths} if lengths else {}))


def _refuse_unsupported(layout: ParallelLayout):
    from mcore_bridge.layout import LayoutError
    from mcore_bridge.model import forward_unsupported

    if forward_unsupported(layout):
        raise LayoutError(forward_unsupported(layout))


def exit_code(report: dict | None) -> int:
    """Collective: 0 on every rank when rank 0's verdict is pass, else 1."""
    code = 0 if report is None or report["verdict"] == "pass" else 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([code], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, 0)
        code = int(flag.item())
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layout", required=True, help="JSON of ParallelLayout fields")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--report", default=None, help="report directory (JSON + Markdown per case)")
    ap.add_argument("--reference-cache", default=None)
    ap.add_argument("--control", default=None)
    ap.add_argument("--grouped-experts", action="store_true",
                    help="MoE experts as megatron's grouped-GEMM module instead of SequentialMLP")
    ap.add_argument("--adapters", default=None, help="PEFT adapter directory (megatron LoRA vs HF + PeftModel)")
    ap.add_argument("--grad", action="store_true", help="also compare one backward pass (verify/grad.py)")
    ap.add_argument("--train-steps", type=int, default=0, help="also compare N AdamW steps (verify/train.py)")
    ap.add_argument("--isolate", action="store_true",
                    help="also feed every megatron layer the HF layer's input and compare each layer (and "
                         "each MoE expert) on its own (verify/isolate.py)")
    ap.add_argument("--no-detection", action="store_true",
                    help="skip the standard positive controls (verify/detection.py) that measure detection power")
    ap.add_argument("--fp32-calibration", choices=("auto", "on", "off"), default="auto",
                    help="fp32: also run the HF model in fp64 and allow each limit up to 3x HF's own fp32 error "
                         "against it (auto: on a GPU)")
    args = ap.parse_args(argv)
    from mcore_bridge.runtime import compat

    device = rt.resolve_device(args.device)
    with compat.compile_off(), compat.scope(device):  # this worker's whole run: conversion and both forwards
        report = run_layout(args.model, ParallelLayout(**json.loads(args.layout)), args.dtype, device,
                            args.control, Path(args.reference_cache) if args.reference_cache else None,
                            grouped_experts=args.grouped_experts, adapter=args.adapters, grad=args.grad,
                            train_steps=args.train_steps, detection=not args.no_detection,
                            isolate=args.isolate,
                            fp32_calibration={"auto": None, "on": True, "off": False}[args.fp32_calibration])
    if report is not None:
        if args.report:
            from .report import write_report

            write_report(report, args.report)
        print(summary_line(report), flush=True)
    code = exit_code(report)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def summary_line(r: dict) -> str:
    m = r["metrics"]
    first = r["first_diverging"]
    where = f"  first diverging: {first['probe']}" if first else ""
    return (f"{r['model']:<12} {r['layout_id']:<16} {r['dtype']:<5} mean_diff {m['mean_diff']:.2e} "
            f"max_diff {m['max_diff']:.2e} (with loss {m['mean_diff_with_loss']:.2e}/{m['max_diff_with_loss']:.2e}) "
            f"top1 {m['top1_agreement']:.4f}  {r['verdict'].upper()}{where}{_checks(r)}{_detection(r)}{_isolated(r)}")


def _isolated(r: dict) -> str:
    from .isolate import line

    return f"  {line(r['isolation'])}" if r.get("isolation") else ""


def _detection(r: dict) -> str:
    d = r.get("detection")
    if not d:
        return ""
    return f"  detection: {d['status']}" + ("" if d["gate"] else " (bf16 is not the conversion gate)")


def _checks(r: dict) -> str:
    if "grad" not in r and "train" not in r:
        return ""
    from .grad import summary

    return summary(r)


if __name__ == "__main__":
    import sys

    sys.exit(main())
