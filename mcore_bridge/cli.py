"""``mcore-bridge`` command line.

    mcore-bridge export --model HF_DIR --to-mcore --tp 2 --pp 2 --save MCORE_DIR
    mcore-bridge export --load MCORE_DIR --to-hf --save HF_OUT
    mcore-bridge demo

Multi-process runs launch themselves through torchrun (``launch.py``): by default as many
processes as the layout needs, or ``--nproc-per-node`` / ``NPROC_PER_NODE``; the seed's
``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are honoured.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .errors import BridgeError, OutputExists, UsageError
from .launch import needs_launch, under_torchrun
from .versions import VersionAction, print_header

# Errors shown as one line (exit 2): the library's own (``errors.BridgeError``) and a path the user
# gave that is missing or not accessible. Anything else is a bug and keeps its traceback (exit 1).
USER_ERRORS = (BridgeError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _add_layout_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("parallel layout")
    g.add_argument("--tp", "--tensor-model-parallel-size", "--tensor_model_parallel_size", type=int,
                   default=None, help="tensor parallel size (default 1, or the checkpoint's)")
    g.add_argument("--pp", "--pipeline-model-parallel-size", "--pipeline_model_parallel_size", type=int,
                   default=None, help="pipeline parallel size (default 1, or the checkpoint's)")
    g.add_argument("--vpp", "--virtual-pipeline-model-parallel-size",
                   "--virtual_pipeline_model_parallel_size", type=int, default=None,
                   help="virtual pipeline chunks per stage (interleaved schedule)")
    g.add_argument("--sp", "--sequence-parallel", "--sequence_parallel", type=_bool, nargs="?",
                   const=True, default=False, help="sequence parallel (needs --tp >= 2)")
    g.add_argument("--decoder-first-pipeline-num-layers", "--decoder_first_pipeline_num_layers", type=int,
                   default=None, help="layers on the first pipeline stage (uneven split)")
    g.add_argument("--decoder-last-pipeline-num-layers", "--decoder_last_pipeline_num_layers", type=int,
                   default=None, help="layers on the last pipeline stage (uneven split)")
    g.add_argument("--ep", "--expert-model-parallel-size", "--expert_model_parallel_size", type=int,
                   default=None, help="expert parallel size for MoE models (default 1)")
    g.add_argument("--etp", "--expert-tensor-parallel-size", "--expert_tensor_parallel_size", type=int,
                   default=None, help="tensor parallel size inside each expert (default: --tp)")
    g.add_argument("--cp", "--context-parallel-size", "--context_parallel_size", type=int, default=None,
                   help="context parallel size (weights replicated over the CP ranks; default 1)")


def _add_runtime_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda (NCCL) when a GPU is visible, else cpu (gloo)")
    g.add_argument("--nproc-per-node", "--nproc_per_node", type=int,
                   default=int(os.environ["NPROC_PER_NODE"]) if os.environ.get("NPROC_PER_NODE") else None,
                   help="processes per node (env NPROC_PER_NODE); default: what the layout needs")
    g.add_argument("--nnodes", type=int, default=int(os.environ.get("NNODES", "1")),
                   help="number of nodes (env NNODES); run the same command on every node, each with its "
                        "--node-rank, and the same --master-addr/--master-port. The processes of all "
                        "nodes together (nnodes x nproc-per-node) form the layout")
    g.add_argument("--node-rank", "--node_rank", type=int, default=int(os.environ.get("NODE_RANK", "0")),
                   help="this node's rank, 0 .. nnodes-1 (env NODE_RANK)")
    g.add_argument("--master-addr", "--master_addr", default=os.environ.get("MASTER_ADDR") or None,
                   help="with --nnodes > 1: address of node 0, reachable from every node (env MASTER_ADDR)")
    g.add_argument("--master-port", "--master_port", type=int,
                   default=int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None,
                   help="with --nnodes > 1: a free port on node 0 (env MASTER_PORT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcore-bridge",
        description="Convert Hugging Face safetensors checkpoints to and from megatron-core models "
                    "sharded by tensor/pipeline parallelism, on CPU (gloo) or GPU (NCCL).")
    parser.add_argument("--version", action=VersionAction,
                        help="print the versions of mcore-bridge, megatron-core, torch and transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = sub.add_parser(
        "export", help="convert HF -> Megatron (--to-mcore) or Megatron -> HF (--to-hf)",
        description="Convert between an HF directory and a Megatron checkpoint. HF -> Megatron: "
                    "--model HF_DIR --to-mcore --save DIR (Megatron-LM's torch_dist layout: "
                    "latest_checkpointed_iteration.txt + release/). Megatron -> HF: --load DIR --to-hf "
                    "--save HF_OUT, at any layout (a checkpoint written by mcore-bridge remembers its HF "
                    "config, --model only supplies tokenizer files; for one written by Megatron-LM pass "
                    "--model HF_DIR for the config). --model HF_DIR --to-hf loads HF into the layout and "
                    "writes HF again (a round trip through megatron).")
    ex.add_argument("--model", help="HF model directory or builtin:NAME (see `mcore-bridge zoo`)")
    ex.add_argument("--load", help="Megatron checkpoint: torch_dist (ours or Megatron-LM's) or mcore-bridge's plain")
    ex.add_argument("--save", required=True, help="output directory (written atomically)")
    ex.add_argument("--to-mcore", "--to_mcore", type=_bool, nargs="?", const=True, default=False,
                    help="write a Megatron-side checkpoint")
    ex.add_argument("--to-hf", "--to_hf", type=_bool, nargs="?", const=True, default=False,
                    help="write HF safetensors")
    ex.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="megatron parameter dtype (default: the checkpoint's); HF output keeps the "
                         "source tensors' dtypes")
    ex.add_argument("--export-dtype", "--export_dtype", choices=("source", "fp8", "mxfp4"), default="source",
                    help="HF output: source (each tensor as the source stored it; FP8/MXFP4 sources as bf16, "
                         "no quantization_config) or fp8 (blockwise, regenerated scales, the source's "
                         "quantization_config or [128,128] blocks); mxfp4 is refused with the reason")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    ex.add_argument("--max-shard-size", default="2GB", help="largest HF output file (e.g. 500MB, 5GB)")
    ex.add_argument("--ckpt-format", "--ckpt_format", choices=("torch_dist", "plain"), default="torch_dist",
                    help="--to-mcore output: torch_dist (Megatron-LM's distributed checkpoint, loads at any "
                         "layout; default) or plain (one safetensors file per model-parallel part, reloads "
                         "only at the same layout)")
    ex.add_argument("--spec", choices=("te", "local"), default="te",
                    help="--to-mcore torch_dist output: the key layout of megatron's TransformerEngine layer "
                         "spec (te; default, what Megatron-LM trains with unless --transformer-impl local) or "
                         "of its local spec (local). Reading detects either from the checkpoint's keys")
    ex.add_argument("--test-convert-precision", "--test_convert_precision", type=_bool, nargs="?",
                    const=True, default=False,
                    help="after converting, check what was written: --to-mcore loads a fresh megatron "
                         "model from the written checkpoint and runs it beside the HF model; --to-hf runs "
                         "the megatron model beside the HF model loaded from the written directory. Gated in "
                         "fp32 (a bf16 model upcast exactly; its bf16 drift reported as info); fails if they "
                         "disagree beyond the fp32 thresholds")
    lo = ex.add_argument_group("LoRA adapters")
    lo.add_argument("--adapters", default=None,
                    help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) put on "
                         "the model after its weights are loaded")
    lo.add_argument("--adapter-load", "--adapter_load", default=None,
                    help="a Megatron checkpoint holding a LoRA adapter (written with --to-mcore and "
                         "--adapters), put on the model after its weights are loaded")
    lo.add_argument("--merge-lora", "--merge_lora", type=_bool, nargs="?", const=True, default=False,
                    help="with an adapter: write merged weights W + scale*B@A (computed in fp32 while "
                         "exporting; the model's weights are not modified). Default false: --to-hf writes "
                         "the adapter as a PEFT directory, --to-mcore an adapter-only Megatron checkpoint")
    lo.add_argument("--peft-experts", "--peft_experts", choices=("parameters", "modules"), default="parameters",
                    help="how a PEFT adapter stores routed experts: 'parameters' (stacked, PEFT "
                         "target_parameters on transformers 5; default) or 'modules' (one module per "
                         "expert, as transformers 4 built them)")
    ex.add_argument("--allow-pickle", "--allow_pickle", action="store_true",
                    help="accept an HF directory that holds only pickled weights (pytorch_model.bin or its "
                         "shards + pytorch_model.bin.index.json). Refused by default: unpickling can run "
                         "code. With this flag they are read with torch.load(weights_only=True, mmap=True), "
                         "which refuses anything but tensors; use it only for files you trust, and prefer "
                         "converting them to safetensors")
    _add_layout_args(ex)
    _add_runtime_args(ex)

    demo = sub.add_parser("demo", help="round-trip every built-in model through megatron and check it",
                          description="HF -> Megatron (tp=2 by default) -> Megatron checkpoint -> HF for "
                                      "every built-in tiny model; prints one verdict line per model.")
    demo.add_argument("--models", default=None, help="comma-separated built-in names (default: all)")
    demo.add_argument("--tp", type=int, default=2)
    demo.add_argument("--pp", type=int, default=1)
    _add_runtime_args(demo)

    ver = sub.add_parser(
        "verify", help="run HF and Megatron side by side over a parallel matrix and write reports",
        description="For each model, each valid layout of --matrix and each --dtype: convert the HF model "
                    "into that layout (one torchrun job with the processes the layout needs), run the transformers "
                    "model and the megatron model on the same inputs, compare logits (mean_diff, "
                    "max_diff, the loss-masked variants, top-1 agreement, KL, cosine) and per-layer "
                    "hidden states, and fail past the dtype's thresholds. Writes JSON + Markdown per "
                    "case and HTML pages under --report. Without --model: the built-in zoo.")
    ver.add_argument("--model", action="append", default=None,
                     help="HF directory or builtin:NAME (repeatable; default: every built-in model)")
    ver.add_argument("--matrix", default="tp=1,2 sp=0,1 ep=1,2",
                     help='layouts, e.g. "tp=1,2 pp=1,2 sp=0,1 vpp=1,2" (invalid combinations are skipped '
                          'with the reason); axes: tp pp vpp sp first last ep etp cp')
    ver.add_argument("--dtype", default="fp32", help="comma-separated: fp32,bf16")
    ver.add_argument("--report", default=None,
                     help="report directory (default: a fresh reports/runs/<UTC time>); a committed baseline "
                          "set (holding a .mcore-bridge-baseline marker, as reports/ does) is not written to")
    ver.add_argument("--overwrite-baseline", "--overwrite_baseline", action="store_true",
                     help="allow --report to name a baseline set (one with a .mcore-bridge-baseline marker)")
    ver.add_argument("--control", default=None,
                     help="inject a known error to check the harness (see verify/controls.py), e.g. "
                          "scale:decoder.layers.1.mlp.linear_fc2.weight:1.01")
    ver.add_argument("--moe-grouped-gemm", "--moe_grouped_gemm", type=_bool, nargs="?", const=True, default=False,
                     help="build MoE experts as megatron's grouped-GEMM module (bf16 only; megatron-core "
                          "0.16's local spec -- refused where it has none, e.g. 0.19) instead of one MLP per expert")
    ver.add_argument("--adapters", default=None,
                     help="a PEFT adapter directory: verify megatron with it as LoRA against HF + PeftModel")
    ver.add_argument("--grad", action="store_true",
                     help="also compare one backward pass: per-parameter gradients in HF names (fp32)")
    ver.add_argument("--train-steps", type=int, default=0, metavar="N",
                     help="also run N AdamW steps on both sides and compare losses and trained weights (fp32)")
    ver.add_argument("--isolate", action="store_true",
                     help="also compare each layer on its own: every megatron layer fed the HF layer's input "
                          "(teacher forcing), every MoE expert re-run on the same tokens on both sides; the report "
                          "names the first layer (and expert) whose own error fails")
    ver.add_argument("--no-detection", action="store_true",
                     help="skip the standard positive controls (x1.01 of a mid-depth weight; swapped experts) "
                          "that each report runs to state whether the gate would catch a fault")
    ver.add_argument("--fp32-calibration", choices=("auto", "on", "off"), default="auto",
                     help="fp32: also run the HF model in fp64 and allow each limit up to 3x HF's own fp32 error "
                          "against it, never below the fixed fp32 limits (auto: on a GPU, where summation order "
                          "varies with the GEMM algorithm per shape)")
    ver.add_argument("--baseline", default=None, help="after the run, compare against this report set")
    _add_runtime_args(ver)

    rep = sub.add_parser("report", help="render report pages, or compare two report sets",
                         description="--render DIR rebuilds the HTML/Markdown index of a report set; "
                                     "--baseline OLD --current NEW compares two sets and exits 1 when a "
                                     "metric got worse beyond the stated tolerance or a verdict flipped.")
    rep.add_argument("--render", default=None)
    rep.add_argument("--baseline", default=None)
    rep.add_argument("--current", default=None)
    rep.add_argument("--rel-tol", default=None)
    rep.add_argument("--json", default=None, help="also write the comparison as JSON")

    sub.add_parser("zoo", help="list the built-in tiny models")
    from .sizing import add_parser as add_plan_parser

    add_plan_parser(sub, _add_layout_args)
    return parser


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------

def _layout(args, default=None):
    """The layout from the flags; with none given, ``default`` (a checkpoint's saved layout). Any
    layout flag describes a whole new layout: fields not given take their defaults, not the saved
    ones (a saved sp or uneven split need not fit it)."""
    from .layout import ParallelLayout

    flags = dict(tp=args.tp, pp=args.pp, vpp=args.vpp, sp=args.sp or None, ep=args.ep, etp=args.etp, cp=args.cp,
                 first_stage_layers=args.decoder_first_pipeline_num_layers,
                 last_stage_layers=args.decoder_last_pipeline_num_layers)
    given = {k: v for k, v in flags.items() if v is not None}
    if not given and default is not None:
        return default
    return ParallelLayout(**given)


def cmd_export(args, argv) -> int:
    from . import checkpoint
    from .bridge import Bridge
    from .layout import LayoutError, ParallelLayout

    if args.to_mcore == args.to_hf:
        raise SystemExit("mcore-bridge export: choose exactly one of --to-mcore and --to-hf")
    if args.adapters and args.adapter_load:
        raise SystemExit("mcore-bridge export: --adapters (PEFT) and --adapter-load (Megatron) both name an "
                         "adapter; pass one")
    if args.test_convert_precision and args.to_mcore and args.adapter_load:
        raise SystemExit("mcore-bridge export: --test-convert-precision with --to-mcore compares against HF + a "
                         "PEFT adapter: pass the adapter as --adapters (PEFT), or check --adapter-load with --to-hf")
    save = Path(args.save)
    if save.exists() and any(save.iterdir()) and not args.overwrite:
        raise OutputExists(f"--save {save} exists and is not empty; pass --overwrite to replace it")
    if args.load:
        if args.to_mcore:
            raise SystemExit("mcore-bridge export: --load reads a Megatron checkpoint; use --to-hf")
        meta_file = Path(args.load) / checkpoint.META_NAME
        saved = ParallelLayout(**checkpoint.read_meta(args.load)["layout"]) if meta_file.exists() else None
        bridge = checkpoint.bridge_from_mcore(args.load, _layout(args, saved), hf_dir=_hf_source(args.model))
    elif args.model:
        bridge = Bridge(args.model, _layout(args), allow_pickle=args.allow_pickle)
    else:
        raise SystemExit("mcore-bridge export: pass --model HF_DIR (or builtin:NAME) or --load MCORE_DIR")

    if args.test_convert_precision:
        from .model import forward_unsupported

        if forward_unsupported(bridge.layout):
            raise LayoutError(f"--test-convert-precision: {forward_unsupported(bridge.layout)}")
    code = needs_launch(args, bridge.layout.min_world_size, argv)
    if code is not None:
        return code
    print_header()  # here, not before the launch: one line, from the process that does the work
    from .runtime import compat, dist

    device = dist.resolve_device(args.device)
    with compat.scope(device):  # the whole command: build, load, save and the precision check
        return _export(args, bridge, device, save)


def _export(args, bridge, device, save) -> int:
    from . import checkpoint, splice
    from .bridge import DTYPES

    if args.export_dtype != "source":  # refused (mxfp4) or checked before any weight is read
        if args.to_mcore:
            raise UsageError(f"--export-dtype {args.export_dtype}: applies to HF output (--to-hf); a Megatron "
                             f"checkpoint keeps the model's --dtype")
        bridge.fp8_plan(args.export_dtype)
    bridge.setup(device)
    dtype = DTYPES[args.dtype] if args.dtype else bridge.source_dtype()
    models = bridge.build_model(dtype)
    # HF -> Megatron with nothing else done to the model: parameters that are whole source rows go
    # file to file (splice), unloaded; --test-convert-precision checks what was written
    # Megatron -> HF likewise (unsplice): parameters stored as one record are written from its bytes
    spliced = {} if not args.adapters and not args.adapter_load and (
        args.to_mcore and not args.load or args.to_hf and args.load and not args.test_convert_precision) else None
    if args.load:
        _say(checkpoint.load_mcore(bridge, models, args.load, spliced=spliced))
    else:
        bridge.load_weights(models, spliced=spliced)
    if args.adapters:
        bridge.load_adapter(models, args.adapters)
    elif args.adapter_load:
        _say(checkpoint.load_adapter_mcore(bridge, models, args.adapter_load))
    lora = bridge.lora is not None
    merge = lora and args.merge_lora
    if args.to_mcore:
        content = "merged" if merge else ("adapter" if lora and (args.adapters or args.adapter_load) else "full")
        try:
            checkpoint.save_mcore(bridge, models, save, overwrite=args.overwrite, fmt=args.ckpt_format,
                                  content=content, spec=args.spec, spliced=spliced)
        except splice.Unsafe as e:  # raised on every rank before anything was written
            _say(f"writing from the source files' bytes is not possible here ({e}); loading every parameter")
            bridge.load_weights(models)
            spliced = None
            checkpoint.save_mcore(bridge, models, save, overwrite=args.overwrite, fmt=args.ckpt_format,
                                  content=content, spec=args.spec)
        what = f"Megatron{', ' + content if lora else ''}"
    else:
        bridge.save_weights(models, save, overwrite=args.overwrite, max_shard_bytes=parse_size(args.max_shard_size),
                            dtype=None if args.export_dtype == "source" else args.export_dtype,
                            merge_lora=merge, peft_format=lora and not merge, peft_experts=args.peft_experts,
                            spliced=spliced)
        what = "HF" + (", merged with the adapter" if merge else ", PEFT adapter" if lora else "")
    copied = (f"; {len(spliced)} of {len(bridge.state(models))} parameters written from the source files' bytes, "
              f"never loaded") if spliced else ""
    _say(f"wrote {save} ({what}, layout {bridge.layout.short()}{copied})")
    if args.test_convert_precision:
        if args.to_mcore:  # what was written, not the model that was converted
            models.clear()
            return _check_written_mcore(bridge, save, dtype, args)
        # the megatron model against HF loaded from what was written (weights or PEFT adapter)
        hf_dir = save if merge or not lora else bridge.source
        adapter = save if lora and not merge else None
        return _check_precision(bridge, models, hf_dir, dtype, adapter)
    return 0


def _check_written_mcore(bridge, save: Path, dtype, args) -> int:
    """--test-convert-precision after --to-mcore: a fresh model loaded from the checkpoint just
    written (an adapter-only one on the HF source's base weights) against the HF source, with the
    PEFT adapter on it when there is one."""
    from . import checkpoint
    from .bridge import Bridge

    adapter_only = checkpoint.read_meta(save).get("content") == "adapter"
    if adapter_only:
        reader = Bridge(bridge.source, bridge.layout, allow_pickle=args.allow_pickle)
    else:
        reader = checkpoint.bridge_from_mcore(save, bridge.layout)
    reader.device = bridge.device  # the same layout: the parallel state is already set up
    models = reader.build_model(dtype)
    if adapter_only:
        reader.load_weights(models)
        checkpoint.load_adapter_mcore(reader, models, save)
    else:
        checkpoint.load_mcore(reader, models, save)
    _say(f"precision check: a model loaded back from {save}")
    return _check_precision(reader, models, bridge.source, dtype, Path(args.adapters) if args.adapters else None)


def _check_precision(bridge, models, hf_dir, dtype, adapter=None) -> int:
    """Seed's --test_convert_precision: the converted megatron model against the HF model (with
    the written PEFT ``adapter`` on it; a merged export is checked as written, against the
    megatron model that still holds the adapter unmerged). The gate is fp32: a bf16 model's
    values are upcast exactly into an fp32 model and compared with HF in fp32; the bf16 run
    itself is reported as kernel drift, not the gate."""
    import torch

    from verify.run import exit_code, summary_line, verify_loaded

    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)
    if name is None:
        raise UsageError("--test-convert-precision supports --dtype fp32 or bf16")
    gate_models = models
    if name != "fp32":
        report = verify_loaded(bridge, models, Path(hf_dir), dtype=name, name=Path(hf_dir).name, adapter=adapter)
        if report is not None:
            print(f"info (kernel drift, not the gate): {summary_line(report)}", flush=True)
        gate_models = _upcast(bridge, models)
        if gate_models is None:
            _say("precision check: the LoRA model is gated in bf16 (no exact fp32 copy of its adapter layers)")
            return exit_code(report)
    report = verify_loaded(bridge, gate_models, Path(hf_dir), dtype="fp32", name=Path(hf_dir).name, adapter=adapter)
    if report is not None:
        print(f"gate (fp32, the checkpoint's values upcast exactly): {summary_line(report)}", flush=True)
        for failure in report["failures"]:
            print(f"  {failure}", flush=True)
    return exit_code(report)


def _upcast(bridge, models):
    """An fp32 model holding exactly ``models``' values (None when the parameter names differ, i.e.
    adapter layers a fresh model lacks)."""
    import torch

    fresh = bridge.build_model(torch.float32)
    with torch.no_grad():
        for new, old in zip(fresh, models):
            src = {**dict(old.named_parameters()), **dict(old.named_buffers())}
            dst = {**dict(new.named_parameters()), **dict(new.named_buffers())}
            if set(src) != set(dst):
                return None
            for k, t in dst.items():
                if t.is_floating_point():
                    t.copy_(src[k])
                    if not torch.equal(t, src[k].to(t.dtype)):
                        raise RuntimeError(f"precision check: {k} did not upcast exactly")
    return fresh


def _hf_source(model):
    if model is None:
        return None
    from .bridge import resolve_source

    return resolve_source(model)


def cmd_demo(args, argv) -> int:
    from .demo import run_demo
    from .layout import ParallelLayout

    code = needs_launch(args, args.tp * args.pp, argv)
    if code is not None:
        return code
    from .runtime import compat, dist

    names = args.models.split(",") if args.models else None
    device = dist.resolve_device(args.device)
    with compat.scope(device):  # the demo runs megatron forwards of its own
        return run_demo(ParallelLayout(tp=args.tp, pp=args.pp), names, device)


BASELINE_MARKER = ".mcore-bridge-baseline"  # in a report set that others compare against


def _report_dir(report: str | None, overwrite_baseline: bool) -> Path:
    """``--report``, or a fresh ``reports/runs/<UTC time>``; refuses a baseline set unless told."""
    import datetime

    if report is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = Path("reports") / "runs" / stamp
        n = 1
        while path.exists():
            path, n = Path("reports") / "runs" / f"{stamp}-{n}", n + 1
        return path
    path = Path(report)
    if (path / BASELINE_MARKER).exists() and not overwrite_baseline:
        raise OutputExists(f"--report {path} is a baseline report set ({path / BASELINE_MARKER}): a run "
                              f"would overwrite what it is compared against; omit --report for a fresh "
                              f"directory, or pass --overwrite-baseline to replace the baseline")
    return path


def cmd_verify(args, argv) -> int:
    """One torchrun job per (model, layout, dtype), each with the processes its layout needs."""
    import json
    import subprocess

    from verify.matrix import applicable, expand, matrix_text
    from verify.run import model_name

    from . import zoo
    from .bridge import Bridge
    from .layout import LayoutError
    from .model import forward_unsupported

    models = args.model or [f"builtin:{n}" for n in zoo.names()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            raise UsageError(f"--dtype {d!r}: choose fp32 and/or bf16")
    report_dir = _report_dir(args.report, args.overwrite_baseline)
    print_header()
    plans, unplanned = [], 0
    for model in models:
        family = Bridge(model).family  # fails early on unknown architectures / bad checkpoints
        layouts, skipped = expand(args.matrix, family.layout_dims(), family.check_layout)
        refused = [forward_unsupported(layout) for layout in layouts if forward_unsupported(layout)]
        if refused:
            raise LayoutError(f"--matrix {args.matrix!r}: {refused[0]}")
        by_reason: dict[str, list] = {}
        for fields, reason in skipped:
            by_reason.setdefault(reason, []).append(fields)
        for reason, cases in by_reason.items():
            what = cases[0] if len(cases) == 1 else f"{len(cases)} layouts"
            print(f"{model_name(model):<12} skip {what}: {reason}", flush=True)
        if not layouts:
            unplanned += 1
            print(f"mcore-bridge verify: no layout of --matrix \"{args.matrix}\" applies to {model} (each is "
                  f"skipped above); layouts that do: --matrix \"{matrix_text(applicable(family.layout_dims()))}\" "
                  f"(each axis checked alone, values up to 8)", file=sys.stderr, flush=True)
        plans.append((model, layouts))
    if unplanned:  # a usage error: nothing is run, no report written
        return 2
    failed, ran = [], 0
    for model, layouts in plans:
        for layout in layouts:
            for dtype in dtypes:
                nproc = args.nproc_per_node or layout.min_world_size
                cmd = _case_launcher(nproc) + [
                       "-m", "verify.run", "--model", model, "--layout",
                       json.dumps(layout.to_dict()), "--dtype", dtype, "--device", args.device,
                       "--report", str(report_dir), "--reference-cache", str(report_dir / ".cache")]
                if args.control:
                    cmd += ["--control", args.control]
                if args.moe_grouped_gemm:
                    cmd += ["--grouped-experts"]
                if args.adapters:
                    cmd += ["--adapters", args.adapters]  # as given (it lands in the report); same cwd
                cmd += ["--no-detection"] * args.no_detection + ["--isolate"] * args.isolate
                cmd += ["--fp32-calibration", args.fp32_calibration]
                cmd += ["--grad"] * args.grad + (["--train-steps", str(args.train_steps)] if args.train_steps else [])
                env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                           MCORE_BRIDGE_QUIET="1", PYTHONWARNINGS="ignore")
                if nproc == 1:  # a plain process makes its own group of one on a free port, as --standalone did
                    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                                "MASTER_PORT"):
                        env.pop(var, None)
                ran += 1
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                lines = [l for l in proc.stdout.splitlines() if l.strip()]
                print(lines[-1] if lines else f"{model_name(model):<12} {layout.short():<16} {dtype:<5} no report",
                      flush=True)
                if proc.returncode != 0:
                    failed.append(f"{model_name(model)} {layout.short()} {dtype}")
                    if not lines or "FAIL" not in lines[-1]:  # crashed rather than failed a threshold
                        print(_tail(proc.stderr), file=sys.stderr, flush=True)
    from verify.report_html import render_all

    if not report_dir.exists():  # every case crashed before writing its page
        print(f"mcore-bridge verify: 0/{ran} cases passed; none wrote a report (each case's error is above)",
              file=sys.stderr, flush=True)
        return 1
    render_all(report_dir)
    print(f"{ran - len(failed)}/{ran} cases passed; reports in {report_dir}/index.html", flush=True)
    code = 1 if failed else 0
    if args.baseline:
        from verify.regression import main as regression_main

        code = max(code, regression_main(["--baseline", args.baseline, "--current", str(report_dir)]))
    return code


def _case_launcher(nproc: int) -> list[str]:
    """What starts one verification case: a single process needs no torchrun agent (one interpreter
    and one ``import torch`` fewer per case); several processes start under torchrun."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone"]


def _tail(text: str, n: int = 25) -> str:
    """The end of a crashed case's stderr, led by each worker's own last error line: under torchrun
    the end is the agent's summary (ChildFailedError), which does not say what went wrong."""
    lines = [l for l in text.splitlines() if "Warning" not in l and "warnings.warn" not in l]
    errors: dict[str, str] = {}  # rank -> its last error line
    for l in lines:
        m = re.match(r"\[(rank\d+)\]:\s*\S*(Error|Exception)\b", l)
        if m:
            errors[m.group(1)] = l
    tail = lines[-n:]
    return "\n".join([e for e in errors.values() if e not in tail] + tail)


def cmd_report(args, argv) -> int:
    if args.render:
        from verify.report_html import render_all

        render_all(Path(args.render))
        print(f"rendered {Path(args.render) / 'index.html'}")
        return 0
    if not (args.baseline and args.current):
        raise SystemExit("mcore-bridge report: pass --render DIR, or --baseline OLD --current NEW")
    from verify.regression import main as regression_main

    extra = (["--rel-tol", args.rel_tol] if args.rel_tol else []) + (["--json", args.json] if args.json else [])
    return regression_main(["--baseline", args.baseline, "--current", args.current, *extra])


def cmd_plan(args, argv) -> int:
    from .sizing import cmd_plan as run

    return run(args, _layout(args))


def cmd_zoo(args, argv) -> int:
    from . import zoo

    for name in zoo.names():
        print(f"builtin:{name}")
    return 0


def _say(msg: str):
    from .runtime.dist import rank

    if rank() == 0 and msg:
        print(msg, flush=True)


def _own_process(command: str):
    """Commands that import megatron run it with ``compat.compile_off`` (this process is ours:
    megatron's jit helpers stay uncompiled and TorchInductor is never imported). ``plan`` builds
    on the meta device and never runs a helper; ``verify``'s workers enter it themselves."""
    import contextlib

    if command not in ("export", "demo", "plan"):
        return contextlib.nullcontext()
    from .runtime import compat

    return compat.compile_off()


def quiet_library_warnings():
    """megatron-core warns at import about TransformerEngine/Apex being absent and torch about
    deprecated collectives megatron calls; none of it is actionable for a conversion."""
    import warnings

    if os.environ.get("MCORE_BRIDGE_WARNINGS"):
        return
    warnings.filterwarnings("ignore", module=r"megatron(\..*)?$")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed(\..*)?$")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    quiet_library_warnings()
    handler = {"export": cmd_export, "demo": cmd_demo, "zoo": cmd_zoo, "verify": cmd_verify,
               "report": cmd_report, "plan": cmd_plan}[args.command]
    try:
        with _own_process(args.command):
            return handler(args, argv)
    except USER_ERRORS as e:
        prefix = "mcore-bridge: error"
        if under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            prefix += f" [rank {os.environ.get('RANK')}]"
        print(f"{prefix}: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # (--help, zoo, report never import torch)
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
