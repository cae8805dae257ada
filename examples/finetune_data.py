"""The data of ``finetune_hf.py``: small local chat data sets it makes itself, rendered by the
model's tokenizer and chat template (loss on the answer tokens only), packing into THD rows,
Megatron-LM's ``forward_step``, and a per-iteration loss log.

* Text models: a question about two digits, the answer the first of them.
* Vision-language models (Qwen-VL families): a solid-colour image (one of ``COLOURS``, sides that
  tile into the vision tower's patches) and the question "what is this ?"; the answer is the
  colour's index, so it follows from the image alone. The chat template renders the text; the
  image's place in the prompt is the model's ``<vision_start> <image_pad> x n <vision_end>``, with
  ``n`` from the model's image processor (``preprocessor_config.json``), which makes the pixels
  too; 3-D mRoPE positions come from transformers' ``get_rope_index`` of the model.

Packing (``--packing true``): ``PackedRows`` puts the samples of one unpacked micro-batch into
one row (each sample's tokens without its padding, then one padding segment up to
``samples x seq``), with ``cu_seqlens``; the model sees THD ``PackedSeqParams``, each sample's
positions start again at 0, and the loss mask is per token, so the per-token losses, and the
loss of every micro-batch, are those of the unpacked run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

IMAGE = "<image>"  # where the image goes in the rendered prompt (replaced by its tokens, never tokenized)
COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 30), (240, 240, 240), (10, 10, 10)]


# ---- text ------------------------------------------------------------------------------------------
def make_dataset(path: Path, n: int = 512, seed: int = 0) -> Path:
    """A small local chat data set (JSONL, one ``{"messages": [...]}`` per line), written once."""
    if path.exists():
        return path
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randrange(10), rng.randrange(10)
            messages = [{"role": "user", "content": f"what is the first of {a} and {b} ?"},
                        {"role": "assistant", "content": str(a)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def _render(tokenizer, messages, image_ids=None) -> tuple[list[int], int]:
    """(token ids of the whole chat, how many of them are the prompt). ``image_ids``: the ids that
    replace ``IMAGE`` in the rendered text (the text around it is tokenized piecewise)."""
    def ids(text):
        if image_ids is None:
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        before, sep, after = text.partition(IMAGE)
        if not sep:
            raise ValueError(f"the chat template dropped the image marker {IMAGE!r}: {text!r}")
        return ids_plain(before) + list(image_ids) + ids_plain(after)

    def ids_plain(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    full = ids(tokenizer.apply_chat_template(messages, tokenize=False))
    prompt = ids(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
    if full[: len(prompt)] != prompt:
        raise ValueError(f"the rendered prompt is not a prefix of the sample: {messages!r}")
    return full, len(prompt)


def _sample(ids: list[int], n_prompt: int, seq: int, pad: int, where) -> dict:
    if len(ids) > seq + 1:
        raise ValueError(f"{where}: the sample ({len(ids)} tokens) is longer than --seq-length {seq}")
    x = torch.full((seq + 1,), pad, dtype=torch.long)
    x[: len(ids)] = torch.tensor(ids)
    mask = torch.zeros(seq)
    mask[n_prompt - 1: len(ids) - 1] = 1.0  # label i is token i + 1: the answer's tokens
    return {"tokens": x[:-1], "labels": x[1:], "loss_mask": mask, "n_tokens": torch.tensor(len(ids) - 1)}


class ChatDataset(torch.utils.data.Dataset):
    """Chat samples as Megatron-LM's GPT data sets give them: ``tokens``, ``labels`` (shifted by
    one), a ``loss_mask`` that is 1 only where the label is an answer token (the assistant turn
    after the prompt the chat template renders), padded to ``seq``; ``n_tokens``: the tokens before
    the padding. ``length``: the samples Megatron-LM's sampler asks for (the file is repeated)."""

    def __init__(self, path: Path, tokenizer, seq: int, length: int = 0):
        self.length = length
        self.samples = []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for line in open(path):
            ids, n_prompt = _render(tokenizer, json.loads(line)["messages"])
            self.samples.append(_sample(ids, n_prompt, seq, pad, path))

    def __len__(self):
        return max(self.length, len(self.samples))

    def __getitem__(self, i):
        return self.samples[i % len(self.samples)]


# ---- vision-language ---------------------------------------------------------------------------------
def make_vl_dataset(path: Path, n: int = 256, seed: int = 0) -> Path:
    """JSONL of ``{"colour": k, "messages": [...]}``: the user turn holds ``IMAGE`` and the question,
    the answer is ``k`` (the image is drawn from ``COLOURS[k]`` when the sample is rendered)."""
    if path.exists():
        return path
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randrange(len(COLOURS))
            messages = [{"role": "user", "content": f"{IMAGE} what is this ?"},
                        {"role": "assistant", "content": str(k)}]
            f.write(json.dumps({"colour": k, "messages": messages}) + "\n")
    return path


class VLChatDataset(ChatDataset):
    """Image + question chat samples: the text fields of ``ChatDataset`` plus ``position_ids [3, seq]``
    (mRoPE), ``pixel_values`` and ``image_grid_thw`` from the model's image processor. Every image
    has the same size (``tiles`` x ``tiles`` tiles of patch x merge pixels), so Megatron-LM's
    default collation stacks them."""

    def __init__(self, path: Path, tokenizer, processor, family, seq: int, length: int = 0, tiles: int = 2):
        from PIL import Image

        from mcore_bridge.families.qwen_vl import hf_config
        from mcore_bridge.families.vl_model import mrope_position_ids

        self.length = length
        self.samples = []
        cfg = hf_config(family.full_config)
        vision = family.vision_settings()
        side = tiles * cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for line in open(path):
            row = json.loads(line)
            image = Image.new("RGB", (side, side), COLOURS[row["colour"]])
            px = processor(images=[image], return_tensors="pt")
            n_image = int(px["image_grid_thw"].prod()) // cfg.vision_config.spatial_merge_size ** 2
            image_ids = [int(cfg.vision_start_token_id)] + [vision.image_token_id] * n_image + [
                int(cfg.vision_end_token_id)]
            ids, n_prompt = _render(tokenizer, row["messages"], image_ids)
            s = _sample(ids, n_prompt, seq, pad, path)
            pos = mrope_position_ids(family, torch.tensor(ids)[None], px["image_grid_thw"])[:, 0]  # [3, L]
            n = int(s["n_tokens"])
            tail = pos[:, n - 1:n].max() + 1 + torch.arange(seq - n)  # padding: positions go on (never seen)
            s["position_ids"] = torch.cat([pos[:, :n], tail.expand(3, -1)], dim=1)
            s["pixel_values"], s["image_grid_thw"] = px["pixel_values"], px["image_grid_thw"]
            self.samples.append(s)


# ---- packing -----------------------------------------------------------------------------------------
class PackedRows(torch.utils.data.Dataset):
    """Row ``i`` packs samples ``i*k .. i*k+k-1`` of ``data`` (the ones unpacked micro-batch ``i`` of
    size ``k`` holds, under Megatron-LM's sequential sampler): each sample's ``n_tokens`` tokens, then
    padding to ``k * seq`` (loss mask 0, a segment of its own). ``cu_seqlens`` has ``k + 2`` entries
    always (a padding segment of length 0 repeats the last), so rows collate."""

    def __init__(self, data, k: int):
        self.data, self.k = data, k

    def __len__(self):
        return len(self.data) // self.k

    def __getitem__(self, i):
        parts = [self.data[i * self.k + j] for j in range(self.k)]
        seq = parts[0]["tokens"].shape[0]
        total = self.k * seq
        out, cu = {}, [0]
        for p in parts:
            cu.append(cu[-1] + int(p["n_tokens"]))
        cu.append(total)
        pad = total - cu[-2]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            if key not in parts[0]:
                continue
            pieces = [p[key][..., : int(p["n_tokens"])] for p in parts]
            filler = parts[0][key][..., -1:]  # a padding entry of the first sample
            if key == "loss_mask":
                filler = torch.zeros_like(filler)
            if key == "position_ids":
                filler = torch.arange(pad).expand(filler.shape[0], -1)
            else:
                filler = filler.expand(*filler.shape[:-1], pad)
            out[key] = torch.cat(pieces + [filler], dim=-1)
        for key in ("pixel_values", "image_grid_thw"):
            if key in parts[0]:
                out[key] = torch.cat([p[key] for p in parts])
        out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
        out["n_tokens"] = torch.tensor(cu[-2])
        return out


# ---- the run's data set; the final model's logits on a fixed sample ------------------------------------
def dataset(args, data_dir: Path, length: int = 0):
    """This run's data set (text or image chat, made on rank 0 once), ``length`` rows; packed
    rows of ``args.samples_per_row`` samples when ``--packing true``."""
    from transformers import AutoTokenizer

    from mcore_bridge import Bridge

    bridge = Bridge(args.hf_model)
    tokenizer = AutoTokenizer.from_pretrained(bridge.source)
    vl = getattr(bridge.family, "multimodal", False)
    path = data_dir / ("vl_train.jsonl" if vl else "train.jsonl")
    if torch.distributed.get_rank() == 0:
        (make_vl_dataset if vl else make_dataset)(path)
    torch.distributed.barrier()
    k, seq = args.samples_per_row, args.sample_seq_length
    if vl:
        from transformers import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil.from_pretrained(bridge.source)
        data = VLChatDataset(path, tokenizer, processor, bridge.family, seq, length * k)
    else:
        data = ChatDataset(path, tokenizer, seq, length * k)
    return PackedRows(data, k) if args.packing else data


def write_probe(args, hooks, data) -> None:
    """``--probe_out FILE``: the first sample of the data set (unpadded) and the final model's fp32
    logits on it (megatron's own forward; the last stage's rank 0 writes)."""
    if not args.probe_out:
        return
    from megatron.core import parallel_state as ps

    from verify.forward import megatron_logits

    s = data.data[0] if isinstance(data, PackedRows) else data[0]
    n = int(s["n_tokens"])
    ids = s["tokens"][:n][None]
    pos = s["position_ids"][:, :n][:, None] if "position_ids" in s else None
    vision = {k: s[k] for k in ("pixel_values", "image_grid_thw") if k in s}
    chunks = hooks.chunks
    for c in chunks:
        c.eval()
    with torch.no_grad():
        logits = megatron_logits(chunks, ids, int(hooks.bridge.family.cfg.require("vocab_size")), pos, vision or None)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        Path(args.probe_out).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"input_ids": ids, "position_ids": pos, "vision": vision, "logits": logits.float().cpu()},
                   args.probe_out)



# ---- Megatron-LM's forward_step ------------------------------------------------------------------------
class LossLog:
    """Per micro-batch ``{"iteration", "sum", "tokens"}`` lines (JSONL; tensor-parallel rank 0 of
    the last stage writes; data-parallel rank r > 0 into ``<path>.dp<r>``). ``iteration`` is set by
    the loop (Megatron-LM's ``args.curr_iteration + 1`` in ``pretrain``)."""

    def __init__(self):
        self.path, self.iteration = None, 0

    def add(self, loss_sum: float, tokens: float):
        if self.path is None:
            return
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_rank() != 0:
            return
        dp = ps.get_data_parallel_rank()
        path = f"{self.path}.dp{dp}" if dp else self.path
        with open(path, "a") as f:
            f.write(json.dumps({"iteration": self.iteration, "sum": loss_sum, "tokens": tokens}) + "\n")


LOSSES = LossLog()


def read_losses(path) -> dict[int, float]:
    """``{iteration: answer loss}`` from a ``LossLog`` (every data-parallel file, every micro-batch)."""
    path = Path(path)
    sums: dict[int, list[float]] = {}
    for f in [path] + sorted(path.parent.glob(path.name + ".dp*")):
        for line in open(f):
            r = json.loads(line)
            s = sums.setdefault(int(r["iteration"]), [0.0, 0.0])
            s[0] += r["sum"]
            s[1] += r["tokens"]
    return {it: s / n for it, (s, n) in sorted(sums.items())}


def model_inputs(b: dict, device) -> tuple:
    """``(tokens, position_ids, extra kwargs)`` of the model for a collated micro-batch: packed rows
    (``cu_seqlens``) as THD ``PackedSeqParams``; vision inputs flattened in sample order, 3-D
    position ids ``[3, B, S]``."""
    tokens = b["tokens"].to(device)
    extra = {}
    if "cu_seqlens" in b:
        from megatron.core.packed_seq_params import PackedSeqParams

        if tokens.shape[0] != 1:
            raise ValueError(f"packed rows go one per micro-batch (--micro-batch-size 1), got {tokens.shape[0]}")
        cu = torch.unique_consecutive(b["cu_seqlens"][0]).to(device=device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        extra["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                     max_seqlen_q=longest, max_seqlen_kv=longest)
    if "position_ids" in b:  # [B, 3, S] -> [3, B, S]
        pos = b["position_ids"].transpose(0, 1).contiguous().to(device)
    else:
        pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    if "pixel_values" in b:
        extra["pixel_values"] = b["pixel_values"].reshape(-1, b["pixel_values"].shape[-1]).to(device)
        extra["image_grid_thw"] = b["image_grid_thw"].reshape(-1, 3).to(device)
    return tokens, pos, extra


def forward_step(data_iterator, model):
    """Megatron-LM's forward_step: per-token losses and a loss function over the answer tokens
    (``(sum, tokens, report)``: Megatron-LM divides by the tokens of each micro-batch)."""
    b = next(data_iterator)
    device = next(model.parameters()).device
    tokens, pos, extra = model_inputs(b, device)
    labels, mask = b["labels"].to(device), b["loss_mask"].to(device)
    out = model(tokens, pos, None, labels=labels, **extra)

    def loss_func(output):
        loss = (output.float().reshape(-1) * mask.reshape(-1)).sum()
        n = mask.sum()
        LOSSES.add(float(loss.detach().double()), float(n))
        return loss, n.to(torch.int), {"lm loss": torch.stack([loss.detach(), n.float()])}

    return out, loss_func
