"""Hooks for Megatron-LM's own training loop (``megatron.training.pretrain``): start from HF
safetensors and write HF safetensors, beside Megatron-LM's ``--save``/``--load`` (torch_dist, with
optimizer), which keep working for resumption.

    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from mcore_bridge import megatron_lm

    args = parse_and_validate_args(extra_args_provider=megatron_lm.add_arguments)
    hooks = megatron_lm.HFHooks.from_args(args)           # --hf_model DIR --load_safetensors true ...
    with megatron_lm.saving_safetensors(hooks):          # HF safetensors at every --save
        pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
                 forward_step, model_provider=hooks.model_provider)

* ``hooks.model_provider`` -- the ``model_provider(pre_process, post_process, vp_stage=None,
  config=None, pg_collection=None)`` that ``pretrain`` calls (megatron-core 0.19.2's ``get_model``):
  the model is the one the HF checkpoint's family decides (our local-spec GPTModel), built for
  megatron's parallel state (``ParallelLayout.from_parallel_state``). With ``--load_safetensors true``
  each rank fills its chunks from the HF safetensors, reading only its slices, before Megatron-LM
  wraps the model and builds the optimizer from it. When ``--load`` holds a Megatron-LM checkpoint
  (resumption) the HF read is skipped: Megatron-LM's load overwrites the weights anyway.
* ``saving_safetensors(hooks)`` -- HF safetensors (or, with LoRA, the PEFT adapter alone) under
  ``--save_safetensors_dir`` (default ``<--save>/hf``) as ``iter_NNNNNNN/`` at every persistent save
  of Megatron-LM's (``--save-interval``, the end of training, exit signals and durations): the owning
  ranks write into a staging directory that is renamed into place after every rank succeeded
  (``Bridge.save_weights``). Why a context manager: megatron.training 0.19.2's ``pretrain`` takes no
  save callback; every save goes through ``save_checkpoint_and_time``, which calls the name
  ``save_checkpoint`` of ``megatron.training.training``. The context wraps that one name (the
  original runs first, unchanged) and restores it on exit; nothing else is touched.
* ``add_arguments`` -- the ``extra_args_provider`` adding the seed's spellings
  (``--load_safetensors true --save_safetensors true``, ``--packing true``, ``--freeze_vit true``,
  ``--freeze_aligner true``, ``--freeze_llm true``; dashes work too).
* Training options: ``HFHooks.from_args`` builds the model with ``training_options(args)``:
  Megatron-LM's recomputation arguments (granularity, method, num layers, modules) and MoE ones
  (grouped GEMM, permute fusion, capacity factor, pad to capacity, drop policy, load balancing,
  aux / z loss coefficients) under their own names, and the freeze flags as ``TrainOptions.freeze``.
  With ``--packing true`` the local core attention of our chunks takes THD ``packed_seq_params``
  (``vl_train.enable_packed_attention``, on these module instances only).
* ``model_arguments(hf_dir)`` -- Megatron-LM's own model arguments describing the same model (it
  keeps them in its checkpoints and checks them on resume); for a Qwen-VL family, its language
  model's with ``--position-embedding-type mrope --mrope-section ...``.

``megatron.training`` ships in megatron-core 0.17+ wheels; without it every entry point here
raises ``UsageError`` saying so (this module itself imports anywhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's tracker file in --load / --save


def require_megatron_training():
    """The ``megatron.training`` package, or a ``UsageError`` naming what is missing."""
    try:
        import megatron.training as mt  # noqa: F401
        from megatron.training import training  # noqa: F401
    except ImportError as e:
        import megatron.core

        raise UsageError(
            f"mcore_bridge.megatron_lm needs Megatron-LM's training loop, the package megatron.training "
            f"(shipped in megatron-core 0.17+ wheels, which need Python >= 3.12); this megatron-core "
            f"{megatron.core.__version__} has none ({e}). Install megatron-core>=0.17, or train with "
            f"megatron-core's own pieces and Bridge.load_weights / Bridge.save_weights.") from None
    return mt


def _bool(text: str) -> bool:
    v = str(text).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_bool.__name__ = "true/false"  # argparse names the type in its error message


def add_arguments(parser):
    """Megatron-LM's ``extra_args_provider``: the HF flags (seed spellings with underscores; dashes too)."""
    g = parser.add_argument_group("mcore-bridge: HF safetensors")
    g.add_argument("--hf_model", "--hf-model", dest="hf_model", default=None,
                   help="HF model directory (config.json + safetensors) or builtin:NAME; its family decides the model")
    g.add_argument("--load_safetensors", "--load-safetensors", dest="load_safetensors", type=_bool, default=False,
                   metavar="{true,false}", help="fill the model from --hf_model's safetensors at start")
    g.add_argument("--save_safetensors", "--save-safetensors", dest="save_safetensors", type=_bool, default=False,
                   metavar="{true,false}", help="write HF safetensors at every --save (needs --save)")
    g.add_argument("--save_safetensors_dir", "--save-safetensors-dir", dest="save_safetensors_dir", default=None,
                   help="where the HF directories go (iter_NNNNNNN/); default <--save>/hf")
    g.add_argument("--hf_lora_rank", "--hf-lora-rank", dest="hf_lora_rank", type=int, default=0,
                   help="train LoRA (rank r, base frozen) on every linear; 0: full fine-tuning")
    g.add_argument("--hf_lora_alpha", "--hf-lora-alpha", dest="hf_lora_alpha", type=float, default=32.0)
    g.add_argument("--save_safetensors_adapter_only", "--save-safetensors-adapter-only",
                   dest="save_safetensors_adapter_only", type=_bool, default=False, metavar="{true,false}",
                   help="with LoRA: write the PEFT adapter alone (adapter_model.safetensors) instead of merged weights")
    g.add_argument("--packing", dest="packing", type=_bool, default=False, metavar="{true,false}",
                   help="train on packed (THD) rows: the model's local attention takes packed_seq_params")
    for flag, part in FREEZE_FLAGS.items():
        g.add_argument(f"--{flag}", f"--{flag.replace('_', '-')}", dest=flag, type=_bool, default=False,
                       metavar="{true,false}", help=f"freeze the {part} part (no gradient, no update)")
    return parser


# the seed's freeze flags -> train_options.PARTS
FREEZE_FLAGS = {"freeze_vit": "vision", "freeze_aligner": "projector", "freeze_llm": "language"}
# Megatron-LM arguments (TransformerConfig names) that TrainOptions carries to the bridge's model
TRAIN_FIELDS = ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
                "moe_grouped_gemm", "moe_permute_fusion", "moe_expert_capacity_factor",
                "moe_pad_expert_input_to_capacity", "moe_token_drop_policy", "moe_router_load_balancing_type",
                "moe_aux_loss_coeff", "moe_z_loss_coeff")


def training_options(args):
    """``TrainOptions`` from Megatron-LM's parsed arguments (or a TransformerConfig built from them):
    recomputation, MoE training options under Megatron-LM's own names, and the seed's freeze flags.
    Megatron-LM's defaults pass through as they are (e.g. its ``--moe-router-load-balancing-type``
    default ``aux_loss`` with ``--moe-aux-loss-coeff 0.0``)."""
    from .train_options import TrainOptions

    kw = {}
    for name in TRAIN_FIELDS:
        if hasattr(args, name):
            v = getattr(args, name)
            kw[name] = tuple(v) if name == "recompute_modules" and v is not None else v
    kw["freeze"] = tuple(part for flag, part in FREEZE_FLAGS.items() if getattr(args, flag, False))
    return TrainOptions(**kw)


def model_arguments(hf_dir) -> list[str]:
    """Megatron-LM's command-line model arguments for the HF model's megatron config (dense GPT and
    MoE GPT families with RMSNorm + SwiGLU and RoPE; vision-language families with mRoPE: their
    language model, ``--position-embedding-type mrope --mrope-section ...``); anything else is
    refused by name."""
    from .bridge import Bridge

    bridge = Bridge(hf_dir)
    s = bridge.family.model_settings()
    c, m = s["config"], s["model"]
    act = getattr(c.get("activation_func"), "__name__", None)
    if act != "silu" or not c.get("gated_linear_unit") or c.get("normalization") != "RMSNorm":
        raise UsageError(f"model_arguments: {bridge.family.name} uses activation={act}, gated_linear_unit="
                         f"{c.get('gated_linear_unit')}, normalization={c.get('normalization')}; only RMSNorm + "
                         f"SwiGLU models map to Megatron-LM arguments here: pass them yourself")
    pos = m.get("position_embedding_type")
    vl = "vision" in m or "vision" in s
    if pos == "mrope" and vl and c.get("mrope_section"):
        # a vision-language model: its language model's arguments. Megatron-LM builds no model
        # here (hooks.model_provider does); it keeps these in its checkpoints, checks them on
        # resume and sizes its estimates with them. mRoPE positions come from the data (forward_step)
        rope = ["--position-embedding-type", "mrope", "--mrope-section", *c["mrope_section"]]
    elif pos == "rope" and not vl:
        rope = ["--position-embedding-type", "rope"]
    else:
        raise UsageError(f"model_arguments: {bridge.family.name} is neither a RoPE text model nor an mRoPE "
                         f"vision-language model (position embedding {pos!r}): pass its arguments yourself")
    argv = ["--num-layers", c["num_layers"], "--hidden-size", c["hidden_size"],
            "--ffn-hidden-size", c["ffn_hidden_size"], "--num-attention-heads", c["num_attention_heads"],
            "--kv-channels", c["kv_channels"], "--normalization", "RMSNorm", "--norm-epsilon", c["layernorm_epsilon"],
            "--swiglu", *rope, "--rotary-base", int(m["rotary_base"]),
            "--rotary-percent", m.get("rotary_percent", 1.0), "--max-position-embeddings", m["max_sequence_length"],
            "--vocab-size", m["vocab_size"]]
    if c["num_query_groups"] != c["num_attention_heads"]:
        argv += ["--group-query-attention", "--num-query-groups", c["num_query_groups"]]
    argv += ["--qk-layernorm"] if c.get("qk_layernorm") else []
    argv += [] if c.get("add_bias_linear") else ["--disable-bias-linear"]
    argv += ["--add-qkv-bias"] if c.get("add_qkv_bias") else []
    argv += [] if m["share_embeddings_and_output_weights"] else ["--untie-embeddings-and-output-weights"]
    if c.get("num_moe_experts"):
        if c.get("moe_shared_expert_intermediate_size") or any(f != 1 for f in c.get("moe_layer_freq") or [1]):
            raise UsageError("model_arguments: shared experts / dense layers between MoE layers: pass them yourself")
        argv += ["--num-experts", c["num_moe_experts"], "--moe-router-topk", c["moe_router_topk"],
                 "--moe-ffn-hidden-size", c["moe_ffn_hidden_size"],
                 "--moe-router-score-function", c.get("moe_router_score_function", "softmax")]
        argv += ["--moe-router-pre-softmax"] if c.get("moe_router_pre_softmax") else []
    return [str(x) for x in argv]


def _unwrap(chunk):
    """The GPTModel inside Megatron-LM's wrappers (DistributedDataParallel, Float16Module)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


@dataclass
class HFHooks:
    """What the training run reads and writes as HF safetensors. ``dtype``: the model's parameter
    dtype (Megatron-LM's ``--bf16``/``--fp16``: bfloat16/float16, else float32). ``resume_dir``:
    Megatron-LM's ``--load``; a checkpoint there (its tracker file) means resumption: no HF read."""

    hf_model: str
    load: bool = True
    save_dir: str | None = None
    dtype: torch.dtype = torch.float32
    lora_rank: int = 0
    lora_alpha: float = 32.0
    adapter_only: bool = False
    resume_dir: str | None = None
    training: object = None  # train_options.TrainOptions; None: from pretrain's config if given, else none
    packing: bool = False  # THD packed rows: the local attention of our chunks takes packed_seq_params

    def __post_init__(self):
        if not self.hf_model:
            raise UsageError("--hf_model is required with the HF hooks: the HF directory (config.json + "
                             "safetensors) whose family decides the model")
        if self.adapter_only and not self.lora_rank:
            raise UsageError("--save_safetensors_adapter_only true needs LoRA (--hf_lora_rank R)")
        self.bridge = None
        self.chunks = None  # this rank's GPTModel chunks, as built (unwrapped)
        self.saved = []  # (iteration, directory) this process wrote into

    @classmethod
    def from_args(cls, args) -> "HFHooks":
        """From Megatron-LM's parsed arguments (``add_arguments`` added the HF ones)."""
        require_megatron_training()
        save_dir = None
        if args.save_safetensors:
            if not (args.save_safetensors_dir or args.save):
                raise UsageError("--save_safetensors true needs --save (HF directories are written at Megatron-LM's "
                                 "saves) or --save_safetensors_dir")
            save_dir = args.save_safetensors_dir or str(Path(args.save) / "hf")
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        return cls(args.hf_model, load=args.load_safetensors, save_dir=save_dir, dtype=dtype,
                   lora_rank=args.hf_lora_rank, lora_alpha=args.hf_lora_alpha,
                   adapter_only=args.save_safetensors_adapter_only, resume_dir=args.load,
                   training=training_options(args), packing=args.packing)

    def resuming(self) -> bool:
        return bool(self.resume_dir) and (Path(self.resume_dir) / TRACKER).is_file()

    def model_provider(self, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        """Megatron-LM's model provider: this rank's chunk ``vp_stage`` (all chunks are built, and
        filled from HF, at the first call)."""
        if self.chunks is None:
            self.chunks = self.build(config)
        chunk = self.chunks[vp_stage or 0]
        if (chunk.pre_process, chunk.post_process) != (pre_process, post_process):
            raise UsageError(f"model_provider: Megatron-LM asks for chunk {vp_stage} with pre_process={pre_process}, "
                             f"post_process={post_process}; the layout built it with {chunk.pre_process}, "
                             f"{chunk.post_process} (pipeline stage sizes differ between Megatron-LM's arguments "
                             f"and the bridge)")
        return chunk

    def build(self, config=None) -> list:
        """This rank's chunks for megatron's parallel state, filled from HF unless resuming."""
        from .bridge import Bridge
        from .layout import ParallelLayout
        from .lora import LoraSpec

        self.bridge = Bridge(self.hf_model, ParallelLayout.from_parallel_state(config=config))
        self.bridge.setup(reinit=False)  # adopt Megatron-LM's groups; never re-create them
        training = self.training
        if training is None and config is not None:  # built by hand: the options of pretrain's config
            training = training_options(config)
        if self.packing:
            self.bridge.family.check_packing(self.dtype)
            from .train_options import TrainOptions

            training = dataclasses.replace(training or TrainOptions(), packed=True)
        chunks = self.bridge.build_model(self.dtype, training=training)
        if self.packing:
            from .families.vl_train import enable_packed_attention

            for chunk in chunks:  # these module instances only (the VL model does it itself)
                enable_packed_attention(chunk.decoder)
        if self.load and not self.resuming():
            self.bridge.load_weights(chunks)
        if self.lora_rank:
            self.bridge.apply_lora(chunks, LoraSpec(r=self.lora_rank, alpha=self.lora_alpha))
        return chunks

    def save(self, iteration: int, model=None) -> Path | None:
        """Write HF safetensors (or the adapter) of ``model`` (Megatron-LM's wrapped chunks; default:
        the chunks built here) as ``<save_dir>/iter_NNNNNNN``, in the dtype the model trains in
        (``dtype``): what was trained is what is written, never rounded to the source checkpoint's
        dtype (an fp32 run from a bf16 checkpoint writes fp32). Collective: every rank calls it."""
        if self.save_dir is None:
            return None
        if self.bridge is None:
            raise UsageError("HFHooks.save: no model was built through hooks.model_provider in this process "
                             "(pass model_provider=hooks.model_provider to pretrain)")
        chunks = [_unwrap(m) for m in model] if model is not None else self.chunks
        out = Path(self.save_dir) / f"iter_{int(iteration):07d}"
        self.bridge.save_weights(chunks, out, dtype=self.dtype, overwrite=True, peft_format=self.adapter_only)
        self.saved.append((int(iteration), out))
        return out


@contextlib.contextmanager
def saving_safetensors(hooks: HFHooks):
    """Inside: every persistent save of Megatron-LM's loop also writes HF safetensors (``hooks.save``).
    Wraps ``megatron.training.training.save_checkpoint`` only, restored on exit (see the module doc)."""
    require_megatron_training()
    from megatron.training import training

    original = training.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(iteration, model, *args, **kwargs):
        result = original(iteration, model, *args, **kwargs)
        if not kwargs.get("non_persistent_ckpt", False):
            hooks.save(iteration, model)
        return result

    training.save_checkpoint = save_checkpoint
    try:
        yield hooks
    finally:
        training.save_checkpoint = original
