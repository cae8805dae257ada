"""Verification: HF and megatron forwards side by side."""
