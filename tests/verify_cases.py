"""Verification cases run inside ``verify.pool.Pool`` ranks (one call per rank)."""

from __future__ import annotations

from mcore_bridge import ParallelLayout


def verify(source: str, layout: dict, dtype: str = "fp32", control: str | None = None,
           reference_cache: str | None = None, grouped: bool = False, detection: bool = False,
           fp32_calibration: bool | None = None) -> dict | None:
    """The full report on rank 0, ``None`` on the other ranks. ``detection``: also the standard
    positive controls (off by default here: the suite's time; tests/test_detection.py covers them)."""
    from verify.run import run_layout

    return run_layout(source, ParallelLayout(**layout), dtype, "cpu", control, reference_cache,
                      lengths=(32, 384), grouped_experts=grouped, detection=detection,
                      fp32_calibration=fp32_calibration)
