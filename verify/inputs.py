"""Deterministic verification inputs: random token runs of several lengths (one a few hundred
tokens long, so long-range RoPE behaviour shows) and, when the model has a tokenizer, a
chat-formatted conversation. Prompt tokens carry label -100."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

LENGTHS = (32, 128, 384)
ALIGN = 8  # sequence lengths are multiples of this, so sequence parallel splits them (tp <= 8)

CHAT = [
    {"role": "system", "content": "you are a model that can convert weight and check the tensor ."},
    {"role": "user", "content": "what is the first layer of the model ? convert it to parallel pipeline ."},
    {"role": "assistant", "content": "the first layer is the one that people see first . it can be in "
                                     "any pipeline and the expert will check each tensor ."},
]


@dataclasses.dataclass
class Sample:
    name: str
    input_ids: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [S], -100 where no loss

    @property
    def loss_tokens(self) -> int:
        return int((self.labels[1:] != -100).sum())

    def describe(self) -> dict:
        return {"name": self.name, "tokens": int(self.input_ids.numel()), "loss_tokens": self.loss_tokens}


def random_sample(vocab: int, length: int, seed: int, prompt_fraction: float = 0.375) -> Sample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=g)
    labels = ids.clone()
    labels[: int(length * prompt_fraction)] = -100
    return Sample(f"random-{length}", ids, labels)


def chat_sample(model_dir: Path, vocab: int) -> Sample | None:
    """The conversation through the model's own tokenizer and chat template; loss on the reply."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tok, "chat_template", None):
        return None
    prompt = tok.apply_chat_template(CHAT[:-1], tokenize=True, add_generation_prompt=True)
    full = tok.apply_chat_template(CHAT, tokenize=True)
    prompt, full = _ids(prompt), _ids(full)
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    while len(full) % ALIGN:
        full.append(pad)
    ids = torch.tensor(full, dtype=torch.long)
    if int(ids.max()) >= vocab:
        return None
    labels = ids.clone()
    labels[: len(prompt)] = -100
    return Sample("chat", ids, labels)


def _ids(out) -> list[int]:
    if hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def default_samples(vocab: int, model_dir: Path | None = None, lengths=LENGTHS) -> list[Sample]:
    samples = [random_sample(vocab, n, seed=1000 + n) for n in lengths]
    chat = chat_sample(model_dir, vocab) if model_dir is not None else None
    return samples + ([chat] if chat is not None else [])
