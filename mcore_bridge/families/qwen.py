"""Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm, head_dim independent of hidden/heads)."""

from __future__ import annotations

from .llama import Llama, windows_from_layer_types


class QwenWindows:
    """Qwen2/Qwen3 (and their MoE variants): ``sliding_window`` counts only with
    ``use_sliding_window``; without ``layer_types`` the layers from ``max_window_layers`` on slide
    (transformers' Qwen2Config/Qwen3Config, default 28)."""

    def sliding_window(self):
        return self.cfg.get("sliding_window") if self.cfg.get("use_sliding_window", default=False) else None

    def layer_windows(self) -> list:
        first = int(self.cfg.get("max_window_layers", default=28))
        return windows_from_layer_types(self.cfg, self.num_layers, self.sliding_window(), lambda i: i >= first)


class Qwen2(QwenWindows, Llama):
    model_types = ("qwen2",)
    name = "qwen2"

    @property
    def qkv_bias(self) -> bool:
        return True


class Qwen3(QwenWindows, Llama):
    model_types = ("qwen3",)
    name = "qwen3"

    @property
    def qk_norm(self) -> bool:
        return True
