"""Training settings for ``Bridge.build_model(training=TrainOptions(...))``: activation
recomputation, MoE training options and frozen parts. They are execution settings, not the
model: the weights, their names and the bridge's plans are the same with or without them.

Every megatron setting here goes into the ``TransformerConfig`` under megatron's own name, and
megatron-core validates it (a refused combination raises ``UsageError`` naming the option and
quoting megatron's reason). Without ``training`` the bridge builds as it always did: no
recomputation, MoE without auxiliary losses or token dropping (conversion and verification need
routing equal to the HF model's).
"""

from __future__ import annotations

import dataclasses

from .errors import UsageError

PARTS = ("vision", "projector", "language")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    # activation recomputation (megatron's names and meanings)
    recompute_granularity: str | None = None  # "full" | "selective"
    recompute_method: str | None = None  # "uniform" | "block" (full only)
    recompute_num_layers: int | None = None  # layers per checkpointed chunk (full only)
    recompute_modules: tuple[str, ...] | None = None  # selective: e.g. ("core_attn",), megatron's default
    # MoE (used only by models with experts)
    moe_grouped_gemm: bool = False  # grouped-GEMM experts where megatron-core's local spec has them
    moe_permute_fusion: bool = False  # needs TransformerEngine's fused permute (megatron checks)
    moe_expert_capacity_factor: float | None = None
    moe_pad_expert_input_to_capacity: bool = False
    moe_token_drop_policy: str = "probs"
    moe_router_load_balancing_type: str = "none"  # "aux_loss" | "seq_aux_loss" | "global_aux_loss" | "none"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    # parameters that get no gradient (requires_grad=False before the DDP wrap / optimizer)
    freeze: tuple[str, ...] = ()  # subset of PARTS; "vision"/"projector" only on vision-language models
    packed: bool = False  # the model takes THD packed sequences (--packing): Family.runtime_config sees it

    def __post_init__(self):
        unknown = [p for p in self.freeze if p not in PARTS]
        if unknown:
            raise UsageError(f"TrainOptions.freeze={self.freeze!r}: unknown part(s) {unknown}; choose from {PARTS}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise UsageError(f"TrainOptions.recompute_granularity={self.recompute_granularity!r}: use 'full', "
                             f"'selective' or None")

    def config_kwargs(self, moe: bool) -> dict:
        """The ``TransformerConfig`` fields these options set (MoE ones only when ``moe``)."""
        kw = {}
        if self.recompute_granularity is not None:
            kw.update(recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                      recompute_num_layers=self.recompute_num_layers)
            if self.recompute_modules is not None:
                kw["recompute_modules"] = list(self.recompute_modules)
        if moe:
            kw.update(moe_grouped_gemm=self.moe_grouped_gemm, moe_permute_fusion=self.moe_permute_fusion,
                      moe_expert_capacity_factor=self.moe_expert_capacity_factor,
                      moe_pad_expert_input_to_capacity=self.moe_pad_expert_input_to_capacity,
                      moe_token_drop_policy=self.moe_token_drop_policy,
                      moe_router_load_balancing_type=self.moe_router_load_balancing_type,
                      moe_aux_loss_coeff=self.moe_aux_loss_coeff, moe_z_loss_coeff=self.moe_z_loss_coeff)
        return kw

    def set_fields(self) -> list[str]:
        """The options that differ from their defaults (for error messages)."""
        return [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]


# megatron-side names: the vision tower and its projector(s) live under ``visual.`` (first stage)
PROJECTOR_PREFIXES = ("visual.merger.", "visual.deepstack_merger_list.", "visual.multi_modal_projector.")


def part_of(name: str) -> str:
    """``vision`` (the vision tower), ``projector`` (the merger(s) into the language model's
    width) or ``language``, for a megatron-side parameter name."""
    if name.startswith(PROJECTOR_PREFIXES):
        return "projector"
    if name.startswith("visual."):
        return "vision"
    return "language"


def check_freeze(family, parts) -> None:
    """A vision part frozen on a model without one is a mistake: refuse it, naming the family."""
    wrong = [p for p in parts if p != "language"]
    if wrong and not getattr(family, "multimodal", False):
        raise UsageError(f"freeze {tuple(parts)}: {family.name} has no vision tower or projector; only "
                         f"'language' applies to a text model")


def freeze(models, parts) -> int:
    """``requires_grad=False`` on the parameters of ``parts`` (see ``PARTS``, ``part_of``) in this
    rank's chunks; call it before wrapping the chunks in megatron's DDP (which allocates gradient
    buffers only for trainable parameters, as megatron's optimizer takes only those). Returns how
    many tensors were frozen on this rank (a pipeline stage without the vision tower freezes none
    of it)."""
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise UsageError(f"freeze: unknown part(s) {unknown}; choose from {PARTS}")
    frozen = 0
    for chunk in models:
        module = getattr(chunk, "module", chunk)
        for name, p in module.named_parameters():
            if part_of(name) in parts:
                p.requires_grad_(False)
                frozen += 1
    return frozen
