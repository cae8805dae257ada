"""Parallel layout: what each rank holds, validated against a model before any weight is read.

Pure arithmetic, no torch.distributed: the conversion plan, the tests and error messages all use it
(``from_parallel_state`` reads a layout off megatron's parallel state, for a trainer's process).
Rank order follows megatron's default ``tp-cp-ep-dp-pp`` ordering: for dense parts tp fastest, then
cp, then dp, then pp; for experts (a second grid over the same ranks of a stage) etp fastest, then
ep, then expert-dp (which spans the dense grid's cp and dp).

Context parallelism (``cp``) splits the sequence, not the weights: every CP rank holds the same
weights as its dp-replica peers, so for loading and exporting a CP rank is one more replica.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .errors import LayoutError  # noqa: F401  (re-exported: its home before errors.py)


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    sp: bool = False
    first_stage_layers: Optional[int] = None  # seed: --decoder_first_pipeline_num_layers
    last_stage_layers: Optional[int] = None  # seed: --decoder_last_pipeline_num_layers
    ep: int = 1  # expert model parallel
    etp: Optional[int] = None  # expert tensor parallel; None: same as tp (megatron's default)
    cp: int = 1  # context parallel: weights replicated over the CP ranks

    # ---- basic checks that need no model -------------------------------------------------
    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        for name in ("tp", "pp", "vpp", "ep", "etp", "cp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.ep > 1 and self.tp > 1 and not self.sp:
            raise LayoutError(f"megatron-core needs sequence parallelism when tp={self.tp} is combined "
                              f"with ep={self.ep}: add --sp")
        if self.sp and self.tp == 1:
            raise LayoutError("sequence parallel (--sp) needs tensor parallelism: use --tp >= 2 or drop --sp")
        if self.vpp > 1 and self.pp == 1:
            raise LayoutError(f"--vpp {self.vpp} needs pipeline parallelism: use --pp >= 2 or --vpp 1")
        if (self.first_stage_layers is not None or self.last_stage_layers is not None) and self.pp == 1:
            raise LayoutError("uneven first/last pipeline stage sizes need --pp >= 2")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def dense_grid_size(self) -> int:
        """Ranks one replica of the dense weights spans together with its CP peers: tp * cp * pp."""
        return self.tp * self.cp * self.pp

    @property
    def expert_parallel_size(self) -> int:
        """Ranks one copy of the experts spans: etp * ep per stage, times pp."""
        return self.etp * self.ep * self.pp

    @property
    def min_world_size(self) -> int:
        import math

        return math.lcm(self.dense_grid_size, self.expert_parallel_size)

    def short(self) -> str:
        """Compact id used in test names and reports, e.g. ``tp2-pp2-vpp2-sp-first1``."""
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.sp:
            parts.append("sp")
        if self.first_stage_layers is not None:
            parts.append(f"first{self.first_stage_layers}")
        if self.last_stage_layers is not None:
            parts.append(f"last{self.last_stage_layers}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp != self.tp:
            parts.append(f"etp{self.etp}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- checks against a model ----------------------------------------------------------
    def validate(self, *, num_layers: int, num_attention_heads: int, num_query_groups: int,
                 ffn_hidden_size: Optional[int], world_size: Optional[int] = None, num_experts: int = 0,
                 expert_ffn_hidden_size: Optional[int] = None,
                 shared_expert_ffn_hidden_size: Optional[int] = None,
                 tp_split_dims: Optional[dict] = None) -> None:
        tp = self.tp
        if num_query_groups % tp:
            raise LayoutError(
                f"{num_query_groups} query groups (num_key_value_heads) cannot be split over tp={tp}: "
                f"choose --tp from {_divisors(num_query_groups)}")
        if num_attention_heads % tp:
            raise LayoutError(f"{num_attention_heads} attention heads cannot be split over tp={tp}: "
                              f"choose --tp from {_divisors(num_attention_heads)}")
        if ffn_hidden_size is not None and ffn_hidden_size % tp:
            raise LayoutError(f"intermediate size {ffn_hidden_size} cannot be split over tp={tp}")
        for what, size in (tp_split_dims or {}).items():  # family-specific column-split widths
            if size % tp:
                raise LayoutError(f"{what} = {size} cannot be split over tp={tp}: choose --tp from "
                                  f"{_divisors(size)}")
        if shared_expert_ffn_hidden_size and shared_expert_ffn_hidden_size % tp:
            raise LayoutError(f"shared expert intermediate size {shared_expert_ffn_hidden_size} cannot be "
                              f"split over tp={tp}")
        if num_experts:
            if num_experts % self.ep:
                raise LayoutError(f"{num_experts} experts cannot be split over ep={self.ep}: choose --ep "
                                  f"from {_divisors(num_experts)}")
            if expert_ffn_hidden_size % self.etp:
                raise LayoutError(f"expert intermediate size {expert_ffn_hidden_size} cannot be split over "
                                  f"etp={self.etp}: choose --etp from {_divisors(expert_ffn_hidden_size)}")
        elif self.ep > 1 or self.etp != self.tp:
            raise LayoutError("--ep/--etp apply to mixture-of-experts models; this model has no experts "
                              "(use --ep 1 and no --etp)")
        self.stage_layer_counts(num_layers)  # raises on impossible pipeline splits
        if world_size is not None and world_size % self.min_world_size:
            raise LayoutError(
                f"world size {world_size} is not a multiple of {'tp*cp*pp' if self.cp > 1 else 'tp*pp'}="
                f"{self.dense_grid_size} and "
                f"etp*ep*pp={self.expert_parallel_size}: launch a multiple of {self.min_world_size} "
                f"processes (--nproc-per-node)")

    def stage_layer_counts(self, num_layers: int) -> list[int]:
        """Number of transformer layers on each pipeline stage."""
        pp, first, last = self.pp, self.first_stage_layers, self.last_stage_layers
        if pp == 1:
            counts = [num_layers]
        else:
            fixed = [c for c in (first, last) if c is not None]
            middle_stages = pp - len(fixed)
            middle_layers = num_layers - sum(fixed)
            if any(c < 1 for c in fixed) or middle_layers < 0:
                raise LayoutError(f"first/last stage sizes {first}/{last} do not fit {num_layers} layers")
            if middle_stages == 0 and middle_layers:
                raise LayoutError(f"first+last stage sizes {first}+{last} != {num_layers} layers with pp=2")
            if middle_stages and middle_layers % middle_stages:
                what = "the remaining layers" if fixed else "the layers"
                raise LayoutError(
                    f"{what} ({middle_layers}) do not divide evenly over {middle_stages} pipeline "
                    f"stages: change --pp or set --decoder_first_pipeline_num_layers/"
                    f"--decoder_last_pipeline_num_layers")
            per = middle_layers // middle_stages if middle_stages else 0
            counts = [per] * pp
            if first is not None:
                counts[0] = first
            if last is not None:
                counts[-1] = last
        if self.vpp > 1:
            for stage, c in enumerate(counts):
                if c % self.vpp:
                    raise LayoutError(f"pipeline stage {stage} holds {c} layers, not divisible into "
                                      f"vpp={self.vpp} virtual chunks")
        if any(c == 0 for c in counts):
            raise LayoutError(f"{num_layers} layers leave an empty pipeline stage at pp={pp}")
        return counts

    def chunk_layers(self, num_layers: int, pp_rank: int, vpp_chunk: int = 0) -> range:
        """Global (0-based) layer indices held by virtual chunk ``vpp_chunk`` of stage ``pp_rank``.

        Chunks are laid out as megatron does: for each virtual stage in turn, every pipeline
        stage takes its next ``count // vpp`` layers.
        """
        counts = self.stage_layer_counts(num_layers)
        per_chunk = [c // self.vpp for c in counts]
        start = vpp_chunk * sum(per_chunk) + sum(per_chunk[:pp_rank])
        return range(start, start + per_chunk[pp_rank])

    def layer_owner(self, num_layers: int, layer: int) -> tuple[int, int]:
        """(pp_rank, vpp_chunk) holding global layer ``layer``."""
        for vp in range(self.vpp):
            for stage in range(self.pp):
                if layer in self.chunk_layers(num_layers, stage, vp):
                    return stage, vp
        raise IndexError(f"layer {layer} out of range for {num_layers} layers")

    def is_first(self, pp_rank: int, vpp_chunk: int) -> bool:
        return pp_rank == 0 and vpp_chunk == 0

    def is_last(self, pp_rank: int, vpp_chunk: int) -> bool:
        return pp_rank == self.pp - 1 and vpp_chunk == self.vpp - 1

    # ---- ranks ---------------------------------------------------------------------------
    def coords(self, rank: int, world_size: int) -> dict:
        """Coordinates of a global rank in megatron's default order: tp fastest, then cp, dp, pp for
        the dense grid; etp, ep, expert-dp inside the same pipeline stage for the expert grid."""
        dp = world_size // self.dense_grid_size
        per_stage = world_size // self.pp
        local = rank % per_stage
        return {"tp": rank % self.tp, "cp": (rank // self.tp) % self.cp, "dp": (rank // (self.tp * self.cp)) % dp,
                "pp": rank // per_stage, "etp": local % self.etp, "ep": (local // self.etp) % self.ep,
                "edp": local // (self.etp * self.ep)}

    def stage_rank(self, world_size: int, pp_rank: int, *, tp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """Global rank of the dense-grid position (tp, cp, dp) on stage ``pp_rank``."""
        return pp_rank * (world_size // self.pp) + (dp * self.cp + cp) * self.tp + tp

    def expert_rank(self, world_size: int, pp_rank: int, *, etp: int = 0, ep: int = 0, edp: int = 0) -> int:
        """Global rank of the expert-grid position (etp, ep, edp) on stage ``pp_rank``."""
        return pp_rank * (world_size // self.pp) + (edp * self.ep + ep) * self.etp + etp

    def same_grid(self, other: "ParallelLayout") -> bool:
        """Whether both need the same process groups (tp, pp, cp, ep, etp; vpp, sp and the stage
        sizes shape the model, not the groups)."""
        return all(getattr(self, k) == getattr(other, k) for k in ("tp", "pp", "cp", "ep", "etp"))

    @classmethod
    def from_parallel_state(cls, models=None, config=None) -> "ParallelLayout":
        """The layout of the parallel state a trainer initialised in this process (megatron's
        ``parallel_state``: tp, pp, vpp, cp, ep, etp; dp checked against the world size), with sp
        and the first/last stage sizes from the model config (``config``, else the first of
        ``models``' chunks), and vpp from the number of chunks where megatron does not record it.
        Checks the config and the chunks against the parallel state."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise LayoutError("from_parallel_state: megatron's parallel state is not initialised in this "
                              "process (parallel_state.initialize_model_parallel); pass a ParallelLayout")
        if config is None and models:
            config = getattr(models[0], "config", None) or getattr(getattr(models[0], "module", None), "config", None)
        sizes = dict(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                     cp=ps.get_context_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
                     etp=ps.get_expert_tensor_parallel_world_size())
        vpp = ps.get_virtual_pipeline_model_parallel_world_size() if hasattr(
            ps, "get_virtual_pipeline_model_parallel_world_size") else None
        vpp = vpp or (len(models) if models else None) or getattr(config, "virtual_pipeline_model_parallel_size", None)
        # without a config sp is unknown; megatron requires it where tp and ep meet (the groups are the same)
        fields = dict(sizes, vpp=vpp or 1, sp=sizes["tp"] > 1 and sizes["ep"] > 1)
        if config is not None:
            for key, attr in (("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
                              ("cp", "context_parallel_size"), ("ep", "expert_model_parallel_size")):
                value = getattr(config, attr, None)
                if value is not None and value != sizes[key] and not (key == "cp" and value == 1):
                    raise LayoutError(f"the model config's {attr}={value} != megatron's parallel state "
                                      f"{key}={sizes[key]}: the model was built for another layout")
            fields.update(sp=bool(getattr(config, "sequence_parallel", False)),
                          first_stage_layers=getattr(config, "num_layers_in_first_pipeline_stage", None),
                          last_stage_layers=getattr(config, "num_layers_in_last_pipeline_stage", None))
        if models is not None and len(models) != fields["vpp"]:
            raise LayoutError(f"{len(models)} model chunks on this rank, megatron's parallel state says "
                              f"vpp={fields['vpp']}")
        layout = cls(**fields)
        import torch.distributed as dist

        dp = ps.get_data_parallel_world_size()
        if dist.get_world_size() != layout.dense_grid_size * dp:
            raise LayoutError(f"world size {dist.get_world_size()} != tp*cp*pp*dp = {layout.dense_grid_size}*{dp}: "
                              f"a parallel state this bridge does not understand")
        return layout

    def expert_owner(self, num_experts: int, expert: int) -> tuple[int, int]:
        """(ep rank, local index) of global expert ``expert``."""
        per = num_experts // self.ep
        return expert // per, expert % per


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's rule: pad the vocabulary to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
