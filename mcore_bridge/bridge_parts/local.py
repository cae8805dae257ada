"""This rank's side of the plan: process groups, parameter views and plan items."""

from __future__ import annotations

import torch.distributed as dist

from ..errors import UsageError
from ..export import Groups
from ..plan import MappingError, local_items


class LocalPlan:
    """Per rank: which megatron parameters this rank holds and which HF tensors stand behind
    them. ``adapters`` (an ``AdapterState``) supplies the table of the LoRA factors (``lora=True``)."""

    def __init__(self, family, layout, units, adapters):
        self.family, self.layout, self.units, self.adapters = family, layout, units, adapters

    def groups(self) -> Groups:
        """This rank's position in megatron's parallel groups (a single process without torch.distributed)."""
        if not dist.is_initialized():
            return Groups()
        from megatron.core import parallel_state as ps

        ep_group = ps.get_expert_model_parallel_group()
        pp_group = ps.get_pipeline_model_parallel_group()
        return Groups(
            pp_rank=ps.get_pipeline_model_parallel_rank(), tp=self.layout.tp,
            # replicas of the dense weights: the dp ranks and, within each, the context-parallel ranks
            tp_rank=ps.get_tensor_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            etp=self.layout.etp, etp_rank=ps.get_expert_tensor_parallel_rank(), ep=self.layout.ep,
            ep_rank=ps.get_expert_model_parallel_rank(), edp_rank=ps.get_expert_data_parallel_rank(),
            tp_group=ps.get_tensor_model_parallel_group(), etp_group=ps.get_expert_tensor_parallel_group(),
            ep_group=ep_group, pp_group=pp_group, pp_ranks=dist.get_process_group_ranks(pp_group),
            ep_ranks=dist.get_process_group_ranks(ep_group))

    def state(self, models, lora: bool = False) -> dict:
        """(chunk, name) -> tensor: the base weights, or with ``lora`` the LoRA factors."""
        from ..model import param_views

        return param_views(models, self.family, self.layout, lora)

    def table(self, lora: bool = False):
        """(family, units) of the base weights, or with ``lora`` of the adapter's factors."""
        if lora:
            return self.adapters.family, self.adapters.units
        return self.family, self.units

    def items(self, models, state, lora: bool = False) -> list:
        """This rank's ``plan.LocalItem``s for ``state``; every unit the layout gives this rank
        must have its parameter (a model built for another layout or config is an error)."""
        g = self.groups()
        names = [[n for (c, n) in state if c == chunk] for chunk in range(len(models))]
        if len(models) != self.layout.vpp:
            raise UsageError(f"expected {self.layout.vpp} model chunks (vpp), got {len(models)}")
        family, units = self.table(lora)
        items = local_items(family, self.layout, g.pp_rank, names, g.ep_rank)
        have = {it.unit.key for it in items}
        lacking = [u for u in units if g.holds(u.owner) and u.key not in have]
        if lacking:  # a model built for another layout or config: its HF tensors would go unused
            raise MappingError(f"the model on pp rank {g.pp_rank} has no parameter for "
                               f"{len(lacking)} unit(s) this layout gives it, e.g. {lacking[0].rule.mcore} "
                               f"(layer {lacking[0].layer}); was it built for this layout"
                               f"{' and with this LoRA' if lora else ''}?")
        return items
