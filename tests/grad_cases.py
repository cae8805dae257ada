"""``verify --grad`` / ``--train-steps`` cases run inside ``verify.pool.Pool`` ranks (one call per rank)."""

from __future__ import annotations

from mcore_bridge import ParallelLayout


def verify_grad(source: str, layout: dict, control: str | None = None, grad: bool = True, train_steps: int = 0,
                adapter: str | None = None, reference_cache: str | None = None) -> dict | None:
    """The full report (forward, ``grad``, ``train``) on rank 0, ``None`` on the other ranks."""
    from verify.run import run_layout

    return run_layout(source, ParallelLayout(**layout), "fp32", "cpu", control, reference_cache, lengths=(32, 64),
                      adapter=adapter, grad=grad, train_steps=train_steps)
