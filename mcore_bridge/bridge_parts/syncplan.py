"""The sync planner: export plans kept across the steps of an RL loop, and the groups of receiver sets."""

from __future__ import annotations

import torch.distributed as dist

from ..export import make_buckets
from ..runtime import dist as rt


class SyncPlanner:
    """Plans ``export_weights`` / ``export_buckets`` once per model and options: an RL loop
    syncing every step pays for the plan only on its first step. ``plans`` holds at most one
    (models rebuilt and options changed rarely); ``leader_groups`` one process group per receiver
    set (created collectively, once). ``forget`` drops the kept plan (the model changed)."""

    def __init__(self, layout, writer):
        self.layout, self.writer = layout, writer
        self.plans: dict = {}
        self.leader_groups: dict = {}

    def forget(self):
        self.plans.clear()

    def plan(self, models, dtype, bucket_bytes, all_ranks, merge_lora, peft_format, receivers, tensor_of=None):
        """(exporter, receivers, buckets) for these options; ``tensor_of`` plans afresh and keeps nothing."""
        from .. import sync

        recv = sync.resolve_receivers(receivers, rt.world_size()) if receivers is not None else (
            "all" if all_ranks else None)
        merge = merge_lora and not peft_format and tensor_of is None
        key = (tuple(id(m) for m in models), dtype, peft_format, merge, bucket_bytes)
        if key not in self.plans or tensor_of is not None:  # other tensors: planned afresh, not kept
            exporter, _ = self.writer.exporter(models, dtype, lora=peft_format, merge=merge, tensor_of=tensor_of)
            if tensor_of is not None:
                return exporter, recv, make_buckets(exporter.units, bucket_bytes)
            self.plans.clear()  # one plan kept: models are rebuilt rarely, options change rarely
            self.plans[key] = exporter, make_buckets(exporter.units, bucket_bytes)
        exporter, buckets = self.plans[key]
        return exporter, recv, buckets

    def stream(self, exporter, buckets, recv):
        """``exporter.iterate_buckets`` with this layout's owner ranks and the receivers' group."""
        world = rt.world_size()
        if isinstance(recv, list) and world == 1:
            recv = "all"

        def owner_rank(owner):
            stage, ep_owner = owner
            if ep_owner is None:
                return self.layout.stage_rank(world, stage)
            return self.layout.expert_rank(world, stage, ep=ep_owner)

        leaders = None
        if isinstance(recv, list) and len(recv) > 1:
            if tuple(recv) not in self.leader_groups:  # collective: every rank creates it, once per set
                self.leader_groups[tuple(recv)] = dist.new_group(recv)
            leaders = self.leader_groups[tuple(recv)]
        return exporter.iterate_buckets(buckets, recv, owner_rank=owner_rank, leaders=leaders)
