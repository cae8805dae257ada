"""Parallel matrices: ``"tp=1,2 pp=1,2 sp=0,1"`` -> the valid layouts, with reasons for the rest,
and pytest parametrization with ids like ``qwen3-tiny[tp2-pp2-sp]``.

    from verify.matrix import params
    @pytest.mark.parametrize("model,layout", params(["qwen3"], "tp=1,2 pp=1,2 sp=0,1"))
    def test_something(model, layout): ...
"""

from __future__ import annotations

import itertools

from mcore_bridge.errors import UsageError

from mcore_bridge.layout import LayoutError, ParallelLayout

AXES = {  # matrix key -> (ParallelLayout field, parser)
    "tp": ("tp", int), "pp": ("pp", int), "vpp": ("vpp", int),
    "sp": ("sp", lambda v: v.lower() in ("1", "true", "yes", "on")),
    "first": ("first_stage_layers", int), "last": ("last_stage_layers", int),
    "ep": ("ep", int), "etp": ("etp", int), "cp": ("cp", int),
}


def parse(text: str) -> list[dict]:
    """All combinations of the axes in ``text`` (space-separated ``key=v1,v2``)."""
    axes = []
    for part in text.split():
        if "=" not in part:
            raise UsageError(f"--matrix: expected key=values, got {part!r} (keys: {', '.join(AXES)})")
        key, values = part.split("=", 1)
        if key not in AXES:
            raise UsageError(f"--matrix: unknown axis {key!r} (known: {', '.join(AXES)})")
        field, conv = AXES[key]
        try:
            axes.append([(field, conv(v)) for v in values.split(",") if v])
        except ValueError:
            raise UsageError(f"--matrix: {key}={values!r} is not a comma-separated list of numbers; axes are "
                             f"separated by spaces, e.g. \"tp=1,2 pp=1,2 sp=0,1\"") from None
    return [dict(combo) for combo in itertools.product(*axes)]


def expand(text: str, dims: dict | None = None, check=None) -> tuple[list[ParallelLayout], list[tuple[dict, str]]]:
    """Valid layouts of the matrix (checked against a model's ``dims`` when given, and by ``check``,
    e.g. ``Family.check_layout``) and the skipped combinations with the reason, in matrix order,
    without duplicates."""
    valid, skipped, seen = [], [], set()
    for fields in parse(text):
        try:
            layout = ParallelLayout(**fields)
            if dims is not None:
                layout.validate(**dims)
            if check is not None:
                check(layout)
        except LayoutError as e:
            skipped.append((fields, str(e)))
            continue
        if layout not in seen:
            seen.add(layout)
            valid.append(layout)
    return valid, skipped


def applicable(dims: dict, up_to: int = 8) -> dict[str, list[int]]:
    """Per axis (tp, pp, and ep for a model with experts), the values ``1..up_to`` that a layout
    may take on the model of ``dims`` (``Family.layout_dims()``), the other axes left at 1: what
    to suggest when no layout of a matrix applies (tp=1 pp=1 always does)."""
    keys = ["tp", "pp"] + (["ep"] if dims.get("num_experts") else [])
    out = {}
    for key in keys:
        out[key] = []
        for value in range(1, up_to + 1):
            try:
                ParallelLayout(**{AXES[key][0]: value}).validate(**dims)
            except LayoutError:
                continue
            out[key].append(value)
    return out


def matrix_text(axes: dict[str, list]) -> str:
    """``{"tp": [1, 2], "pp": [1]}`` -> ``"tp=1,2 pp=1"`` (the ``--matrix`` syntax)."""
    return " ".join(f"{key}={','.join(str(v) for v in values)}" for key, values in axes.items())


def case_id(model: str, layout: ParallelLayout) -> str:
    return f"{model}[{layout.short()}]"


def params(models, matrix: str, *, dims_of=None):
    """pytest params ``(model, layout)`` for each built-in model name and each valid layout.
    Each param carries ``pytest.mark.world(n)`` (n = the layout's smallest world size) so pools are grouped by size."""
    import pytest

    out = []
    for model in models:
        dims = dims_of(model) if dims_of else None
        for layout in expand(matrix, dims)[0]:
            out.append(pytest.param(model, layout, id=case_id(f"{model}-tiny", layout),
                                    marks=pytest.mark.world(layout.min_world_size)))
    return out
