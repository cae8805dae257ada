"""Megatron-LM's own training loop (``megatron.training.pretrain``, shipped in megatron-core 0.17+
wheels) as a client of our checkpoints, both directions. Driver: ``bench/megatron_lm_loop.sh``.

    train   (torchrun, 1 GPU) Megatron-LM's loop with a GPT model built by our bridge's family/config
            code (local spec), synthetic token data, ``--load`` our ``export --to-mcore`` output as a
            fine-tuning start, a few iterations, ``--save`` a full Megatron-LM checkpoint (model +
            optimizer + RNG + args). Records the per-token losses of the first step, the loss of
            every step, and megatron-core's forward (fp32 and bf16) on the trained weights.
    check   (plain process) the HF model's per-token losses on the same first batch; the HF model
            converted back from Megatron-LM's checkpoint (``export --load SAVE --to-hf``) against
            megatron's forward on the trained weights; a negative control (the untrained HF model).

Only dense GPT families (Llama, Qwen, Mistral shapes). Writes JSON; no asserts: the driver gates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

CAPTURED = []  # the GPTModel(s) Megatron-LM trains (our model provider's output)
RECORD = {"step_losses": [], "first_batch": None}


def family_of(hf_dir):
    from mcore_bridge import Bridge

    bridge = Bridge(hf_dir)  # the bridge's own family detection + layout validation (TP1)
    if bridge.family.num_experts or "vision" in bridge.family.model_settings():
        raise SystemExit("megatron_lm_loop covers dense text models only")
    return bridge


def megatron_lm_argv(bridge, a) -> list[str]:
    """Megatron-LM command-line arguments describing the same model as our config (Megatron-LM keeps
    them in the checkpoint's ``args`` and checks num_layers / hidden / heads on resume)."""
    s = bridge.family.model_settings()
    c, m = s["config"], s["model"]
    if c.get("activation") != "silu" or not c.get("gated_linear_unit") or c.get("normalization") != "RMSNorm":
        raise SystemExit(f"unsupported MLP/norm for this bench: {c}")
    argv = ["--num-layers", c["num_layers"], "--hidden-size", c["hidden_size"],
            "--ffn-hidden-size", c["ffn_hidden_size"], "--num-attention-heads", c["num_attention_heads"],
            "--kv-channels", c["kv_channels"], "--normalization", "RMSNorm", "--norm-epsilon", c["layernorm_epsilon"],
            "--swiglu", "--position-embedding-type", "rope", "--rotary-base", int(m["rotary_base"]),
            "--rotary-percent", m.get("rotary_percent", 1.0), "--max-position-embeddings", m["max_sequence_length"],
            "--vocab-size", m["vocab_size"], "--tokenizer-type", "NullTokenizer",
            "--seq-length", a.seq, "--micro-batch-size", a.mbs, "--global-batch-size", a.mbs,
            "--train-iters", a.iters, "--save-interval", a.iters, "--eval-iters", 0, "--eval-interval", 1000,
            "--log-interval", 1, "--lr", a.lr, "--min-lr", a.lr, "--lr-decay-style", "constant",
            "--lr-warmup-iters", 0, "--weight-decay", 0.0, "--clip-grad", 1.0, "--adam-beta2", 0.95,
            "--bf16", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
            "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
            "--attention-dropout", 0.0, "--hidden-dropout", 0.0, "--seed", 1234,
            "--ckpt-format", "torch_dist", "--load", a.load, "--save", a.save, "--finetune",
            "--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 1,
            "--distributed-timeout-minutes", 5]
    if c["num_query_groups"] != c["num_attention_heads"]:
        argv += ["--group-query-attention", "--num-query-groups", c["num_query_groups"]]
    if c.get("qk_layernorm"):
        argv.append("--qk-layernorm")
    if not c.get("add_bias_linear"):
        argv.append("--disable-bias-linear")
    if c.get("add_qkv_bias"):
        argv.append("--add-qkv-bias")
    if not m["share_embeddings_and_output_weights"]:
        argv.append("--untie-embeddings-and-output-weights")
    if a.dist_opt:
        argv.append("--use-distributed-optimizer")
    return [str(x) for x in argv]


class SyntheticTokens(torch.utils.data.Dataset):
    """Random token sequences, deterministic per index; needs no compiled dataset helpers."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        self.n, self.seq, self.vocab, self.seed = n, seq, vocab, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        x = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        return {"tokens": x[:-1], "labels": x[1:]}


def forward_step(data_iterator, model):
    """Megatron-LM's forward_step contract: (per-token loss, loss_func -> (sum, tokens, report))."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    out = model(tokens, pos, None, labels=labels)  # per-token loss [b, s]
    if RECORD["first_batch"] is None:
        RECORD["first_batch"] = {"tokens": tokens.cpu(), "labels": labels.cpu(),
                                 "per_token_loss": out.detach().float().cpu()}

    def loss_func(output_tensor):
        losses = output_tensor.view(-1).float()
        loss = torch.sum(losses * loss_mask.view(-1))
        n = loss_mask.sum().to(torch.int)
        RECORD["step_losses"].append((loss / n).item())
        return loss, n, {"lm loss": torch.cat([loss.detach().view(1), n.view(1).float()])}

    return out, loss_func


def skip_helper_compile():
    """Megatron-LM's initialisation runs ``make`` on the dataset C++ helpers; the wheel ships them
    prebuilt (``helpers_cpp``) without the Makefile, so ``make`` fails ("Failed to compile the C++
    dataset helper functions") and the job exits. This bench's dataset uses no helpers: the compile
    step is replaced by its barrier, and the note says whether the prebuilt module imports."""
    from megatron.training import initialize

    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
        note = "prebuilt helpers_cpp imports"
    except ImportError as e:
        note = f"prebuilt helpers_cpp does not import ({e})"

    def compile_dependencies():
        torch.distributed.barrier()

    initialize._compile_dependencies = compile_dependencies
    return note + "; Megatron-LM's make step skipped (the synthetic dataset needs no helpers)"


def train(a):
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from mcore_bridge.model import build_model

    bridge = family_of(a.hf)
    vocab = bridge.hf_config["vocab_size"]
    sys.argv = [sys.argv[0]] + megatron_lm_argv(bridge, a)
    helper_note = skip_helper_compile()

    def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        # Our bridge's model: same TransformerConfig and local spec as every conversion uses.
        chunk = build_model(bridge.family, bridge.layout, torch.bfloat16, "cuda")[0]
        CAPTURED.append(chunk)
        return chunk

    def datasets_provider(num_samples):
        train_n = max(int(num_samples[0]), a.mbs * a.iters)
        return SyntheticTokens(train_n, a.seq, vocab, seed=1), None, None

    datasets_provider.is_distributed = True

    args = parse_and_validate_args()
    cfg = pretrain_cfg_container_from_args(args)
    t0 = time.time()
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)
    t_train = time.time() - t0

    # megatron-core's own forward on the trained weights: the trained bf16 chunk itself, and the
    # same weights in an fp32 model built the same way (for a compare free of bf16 rounding).
    from verify.forward import megatron_logits

    trained = CAPTURED[-1]
    gen = torch.Generator().manual_seed(7)
    probe = torch.randint(0, vocab, (2, a.seq), generator=gen)
    trained.eval()
    logits_bf16 = megatron_logits([trained], probe, vocab)
    m32 = build_model(bridge.family, bridge.layout, torch.float32, "cuda")[0]
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in trained.state_dict().items()
             if isinstance(v, torch.Tensor)}
    m32.load_state_dict(state, strict=True)
    logits_fp32 = megatron_logits([m32], probe, vocab)
    import megatron.core

    torch.save({"probe": probe, "megatron_fp32": logits_fp32, "megatron_bf16": logits_bf16,
                "first_batch": RECORD["first_batch"]}, a.tensors)
    result = {"megatron_core": megatron.core.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(), "distributed_optimizer": a.dist_opt,
              "argv": sys.argv[1:], "helpers": helper_note,
              "step_losses": RECORD["step_losses"], "train_s": round(t_train, 1),
              "vocab": vocab, "padded_vocab": trained.embedding.word_embeddings.weight.shape[0]}
    Path(a.result).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "argv"}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def checkpoint_contents(save: Path) -> dict:
    """What Megatron-LM wrote: the iteration directory, common.pt's keys and the sharded keys by
    their first component (model / optimizer / rng_state ...). Reads our own run's files."""
    from torch.distributed.checkpoint import FileSystemReader

    tag = (save / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = save / f"iter_{int(tag):07d}"
    md = FileSystemReader(str(it_dir)).read_metadata()
    groups: dict[str, int] = {}
    for k in md.state_dict_metadata:
        head = k.split(".", 1)[0] if not k.startswith("optimizer") else ".".join(k.split(".")[:2])
        groups[head] = groups.get(head, 0) + 1
    out = {"tracker": tag, "dir": it_dir.name, "files": sorted(f.name for f in it_dir.iterdir()),
           "sharded_key_groups": groups, "bytes": sum(f.stat().st_size for f in it_dir.iterdir() if f.is_file())}
    if (it_dir / "common.pt").exists():  # older megatron-core; 0.19 keeps the common state in the DCP files
        common = torch.load(it_dir / "common.pt", map_location="cpu", weights_only=False)
        out.update(common_keys=sorted(common), iteration=common.get("iteration"))
    return out


def check(a):
    from verify.forward import hf_model

    train_res = json.loads(Path(a.result).read_text())
    t = torch.load(a.tensors, map_location="cpu", weights_only=False)
    fb = t["first_batch"]
    out = {"checkpoint": checkpoint_contents(Path(a.save))}

    def per_token_loss(model, tokens, labels):
        # Megatron-LM's loss runs over the padded vocabulary (pad rows are zero, their logits 0);
        # the same padding here (none when the vocabulary is a multiple of 128, as Qwen3's is)
        with torch.no_grad():
            logits = model(input_ids=tokens.cuda(), use_cache=False).logits.float()
        logits = torch.nn.functional.pad(logits, (0, train_res["padded_vocab"] - logits.shape[-1]))
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.cuda(), reduction="none").cpu()

    # (a) the first step's loss: Megatron-LM (bf16, weights loaded from our torch_dist export)
    #     against the HF model on the same batch
    meg = fb["per_token_loss"]
    first = {"megatron_lm_step1_loss": train_res["step_losses"][0], "per_token_loss_std": meg.std().item()}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        hf = hf_model(a.hf, dtype, "cuda")
        ref = per_token_loss(hf, fb["tokens"], fb["labels"])
        first[f"hf_{name}_loss"] = ref.mean().item()
        first[f"abs_diff_vs_hf_{name}"] = abs(ref.mean().item() - train_res["step_losses"][0])
        first[f"per_token_max_abs_diff_vs_hf_{name}"] = (ref - meg).abs().max().item()
        first[f"per_token_mean_abs_diff_vs_hf_{name}"] = (ref - meg).abs().mean().item()
        if name == "fp32":
            untrained32 = hf.float()
        else:
            del hf
    torch.cuda.empty_cache()
    out["first_step"] = first

    # (b) Megatron-LM's checkpoint -> HF (our CLI), against megatron's forward on the trained weights
    probe = t["probe"]
    trained_hf = hf_model(a.trained_hf, torch.float32, "cuda")
    with torch.no_grad():
        got = trained_hf(input_ids=probe.cuda(), use_cache=False).logits.float().cpu()
        before = untrained32(input_ids=probe.cuda(), use_cache=False).logits.float().cpu()
    m32, m16 = t["megatron_fp32"], t["megatron_bf16"]
    out["trained_logits"] = {
        "max_abs_diff_hf_fp32_vs_megatron_fp32": (got - m32).abs().max().item(),
        "mean_abs_diff_hf_fp32_vs_megatron_fp32": (got - m32).abs().mean().item(),
        "max_abs_diff_hf_fp32_vs_megatron_bf16": (got - m16).abs().max().item(),
        "top1_agreement_vs_megatron_fp32": (got.argmax(-1) == m32.argmax(-1)).float().mean().item(),
        "logit_std": m32.std().item(),
        # negative control: the model before training differs from the trained megatron forward
        "control_max_abs_diff_untrained_hf_vs_megatron_fp32": (before - m32).abs().max().item(),
        "control_mean_abs_diff_untrained_hf_vs_megatron_fp32": (before - m32).abs().mean().item(),
    }
    # exported weights: every tensor in HF form, bf16 like the training weights
    from mcore_bridge.hf_io import HFCheckpoint

    src, back = HFCheckpoint(a.hf), HFCheckpoint(a.trained_hf)
    changed = sum(not torch.equal(src.read(n), back.read(n)) for n in src.names())
    out["exported"] = {"tensors": len(back.names()), "same_names_as_source": sorted(src.names()) == sorted(back.names()),
                       "tensors_changed_by_training": changed,
                       "dtypes": sorted({str(back.read(n).dtype) for n in back.names()})}
    merged = {**train_res, **out}
    Path(a.result).write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps(out, indent=1), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["train", "check"])
    ap.add_argument("--hf", required=True, help="the HF checkpoint our export --to-mcore converted")
    ap.add_argument("--load", help="our export --to-mcore output (train)")
    ap.add_argument("--save", required=True, help="Megatron-LM's --save directory")
    ap.add_argument("--trained-hf", help="export --load SAVE --to-hf output (check)")
    ap.add_argument("--result", required=True, help="JSON (train writes it, check adds to it)")
    ap.add_argument("--tensors", required=True, help="scratch .pt: first batch, probe logits")
    ap.add_argument("--dist-opt", action="store_true", help="--use-distributed-optimizer")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    a = ap.parse_args()
    (train if a.mode == "train" else check)(a)


if __name__ == "__main__":
    main()
