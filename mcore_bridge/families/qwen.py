"""Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm, head_dim independent of hidden/heads)."""

from __future__ import annotations

from .llama import Llama


class Qwen2(Llama):
    model_types = ("qwen2",)
    name = "qwen2"

    @property
    def qkv_bias(self) -> bool:
        return True


class Qwen3(Llama):
    model_types = ("qwen3",)
    name = "qwen3"

    @property
    def qk_norm(self) -> bool:
        return True
