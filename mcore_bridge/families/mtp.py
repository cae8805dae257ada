"""Multi-token prediction (MTP) layers, for any family whose config has ``num_nextn_predict_layers``
(DeepSeek-V3, GLM-4.5): list ``MTPMixin`` first in the family's bases. A family that stores its MTP
layers otherwise (Qwen3-Next and Qwen3.5: ``mtp.*``, ``qwen3_next.QwenNextMTP``) overrides the hooks: ``mtp_declared`` (how many),
``mtp_hf_prefix`` / ``mtp_hf_names`` (its names; embedding / head copies or None), ``mtp_rule_layer``
(which decoder layer's rules the MTP layer has), ``mtp_norm`` (its norm class, e.g. ``(1 + w)``) and
``mtp_reference_kwargs`` (how transformers loads its decoder layers for verify/mtp.py).

HF checkpoints store MTP layer ``k`` after the decoder layers, as ``layers.{num_hidden_layers + k}.``:
a full decoder layer (its attention, MLP or MoE, norms) plus ``enorm`` (norm of the next token's
embedding), ``hnorm`` (norm of the previous depth's hidden state), ``eh_proj`` ([hidden, 2 x hidden],
applied to ``cat(enorm(emb), hnorm(h))``), ``shared_head.norm`` (the final norm before the head) and
two copies of main-model tensors, ``embed_tokens`` and ``shared_head.head`` (DeepSeek-V3's
README_WEIGHTS: "shared with the main model"). transformers builds none of it.

megatron-core builds the same module as ``MultiTokenPredictionBlock`` (``GPTModel(mtp_block_spec=...)``,
config ``mtp_num_layers``) on the last pipeline stage (last virtual chunk): ``mtp.layers.{k}.enorm``,
``.hnorm``, ``.eh_proj`` (column-parallel), ``.transformer_layer.*`` (0.16; ``.mtp_model_layer.*``
in 0.19: the spec of the stage's last decoder layer) and ``.final_layernorm``; it shares the main model's embedding and output layer, so
the HF copies load into those and must equal the main tensors (checked on load, by name), and are
written back from them on export. A checkpoint that holds no MTP tensor at all converts without MTP
(nothing to drop); one that holds some but not all is refused by strict accounting.
"""

from __future__ import annotations

import dataclasses

from ..transforms import COLUMN, REPLICATED, Copies
from .base import Layers, UnsupportedConfig, rule

DECODER_LAYER = "decoder.layers.{L}."


def mtp_layer_attribute() -> str:
    """What megatron-core calls an MTP layer's decoder layer: ``transformer_layer`` (0.16.1);
    ``mtp_model_layer`` (0.19.2, which can also hold a hybrid stack there). Feature-detected on the
    spec's submodules dataclass."""
    import dataclasses as dc

    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules

    fields = {f.name for f in dc.fields(MultiTokenPredictionLayerSubmodules)}
    for name in ("mtp_model_layer", "transformer_layer"):
        if name in fields:
            return name
    raise RuntimeError(f"megatron-core's MultiTokenPredictionLayerSubmodules has neither mtp_model_layer nor "
                       f"transformer_layer (fields: {sorted(fields)}): the MTP layout changed, update families/mtp.py")


class MTPMixin:
    """MTP settings, model kwargs and weight rules on top of a family (list it first in the bases)."""

    mtp = True  # False: this checkpoint holds no MTP tensors (``adapt``)

    @property
    def mtp_layers(self) -> int:
        return self.mtp_declared() if self.mtp else 0

    # -- per-family hooks (DeepSeek-V3's naming below; Qwen3-Next overrides them) ---------------
    def mtp_declared(self) -> int:
        """MTP layers the config declares."""
        return int(self.cfg.get("num_nextn_predict_layers", default=0))

    def mtp_hf_prefix(self, k: int) -> str:
        """Prefix of MTP layer ``k``'s decoder-layer tensors in the checkpoint."""
        return self.hf_layer_prefix.replace("{L}", str(self.num_layers + k))

    def mtp_rule_layer(self, k: int) -> int:
        """The HF layer index whose per-layer rules (and kind) MTP layer ``k``'s decoder layer has."""
        return self.num_layers + k

    def mtp_hf_names(self, k: int) -> dict:
        """HF names of MTP layer ``k``'s own tensors: ``enorm``, ``hnorm``, ``eh_proj``, ``final_norm``,
        and ``embed`` / ``head`` (the copies of the main model's tensors it stores, or None)."""
        H = self.mtp_hf_prefix(k)
        return {"enorm": H + "enorm.weight", "hnorm": H + "hnorm.weight", "eh_proj": H + "eh_proj.weight",
                "final_norm": H + "shared_head.norm.weight", "embed": H + "embed_tokens.weight",
                "head": H + "shared_head.head.weight"}

    def fp8_unquantized(self) -> frozenset[str]:
        """The MTP layers' projection and their copies of the embedding and head stay unquantised
        in an FP8 export, as in DeepSeek-V3's published FP8 checkpoint (engines build ``eh_proj``
        and the shared head as plain bf16 layers; a head copy must stay equal to ``lm_head``)."""
        names = (self.mtp_hf_names(k) for k in range(self.mtp_layers))
        return super().fp8_unquantized() | {n[key] for n in names for key in ("eh_proj", "embed", "head") if n[key]}

    def mtp_norm(self):
        """The norm class of the MTP layer's enorm / hnorm / final_layernorm (None: megatron's)."""
        return None

    def mtp_reference_kwargs(self, n: int) -> dict:
        """``from_pretrained`` keyword arguments that make transformers build and load the decoder
        layers of ``n`` MTP layers as its layers ``num_layers .. num_layers + n - 1``
        (verify/mtp.py)."""
        return {"num_hidden_layers": self.num_layers + n}

    # -- config and model ---------------------------------------------------------------------
    def check_lora(self) -> None:
        if self.mtp_layers:
            from ..errors import AdapterError

            raise AdapterError(f"LoRA on a model with multi-token-prediction layers ({self.name}, "
                               f"num_nextn_predict_layers={self.mtp_layers}) is not supported yet: PEFT's model has "
                               f"no MTP layer to hold adapters; convert a copy of the checkpoint without the "
                               f"model.layers.{self.num_layers}.* tensors")
        super().check_lora()

    def extend_settings(self, settings: dict) -> dict:
        settings = super().extend_settings(settings)
        if not self.mtp_layers:
            return settings
        last = self.layer_kind(self.num_layers - 1)
        for k in range(self.mtp_layers):
            kind = self.layer_kind(self.mtp_rule_layer(k))
            if kind != last:
                raise UnsupportedConfig(
                    f"num_nextn_predict_layers={self.mtp_layers}: HF's MTP layer {self.mtp_rule_layer(k)} is a {kind} "
                    f"layer, but megatron-core builds its MTP transformer layer from the spec of the last decoder "
                    f"layer, a {last} layer")
        settings["config"]["mtp_num_layers"] = self.mtp_layers
        return settings

    def chunk_kwargs(self, config, spec, vp_stage, pp_rank) -> dict:
        kw = super().chunk_kwargs(config, spec, vp_stage, pp_rank)
        if not self.mtp_layers:
            return kw
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        # None off the last stage; built from the spec of this chunk's last decoder layer
        block = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage,
                                       pp_rank=pp_rank)
        norm = self.mtp_norm()
        if block is not None and norm is not None:
            block = dataclasses.replace(block, layer_specs=[dataclasses.replace(s, submodules=dataclasses.replace(
                s.submodules, enorm=norm, hnorm=norm, layer_norm=norm)) for s in block.layer_specs])
        return {**kw, "mtp_block_spec": block}

    # -- checkpoint ---------------------------------------------------------------------------
    def adapt(self, hf_names) -> None:
        super().adapt(hf_names)
        if self.mtp_declared():
            prefixes = tuple(self.mtp_hf_prefix(k) for k in range(self.mtp_declared()))
            prefixes += tuple(v for k in range(self.mtp_declared()) for v in self.mtp_hf_names(k).values() if v)
            if not any(n.startswith(prefixes) for n in hf_names):
                self.mtp = False  # published without its MTP weights: the main model alone

    # -- weights ------------------------------------------------------------------------------
    def rules(self):
        rows = super().rules()
        if not self.mtp_layers:
            return rows
        names = [self.mtp_hf_names(k) for k in range(self.mtp_layers)]
        heads = [n["head"] for n in names if n["head"]]
        embeds = [n["embed"] for n in names if n["embed"]]
        out = []
        for r in rows:
            if r.mcore == "embedding.word_embeddings.weight":  # tied: the heads are embedding copies too
                r = _with_copies(r, embeds + (heads if self.tied else []))
            elif r.mcore == "output_layer.weight" and not self.tied:
                r = _with_copies(r, heads)
            out.append(r)
        for k in range(self.mtp_layers):
            out += self.mtp_layer_rules(k, [r for r in rows if r.per_layer])
        return out

    def mtp_layer_rules(self, k: int, per_layer):
        """MTP layer ``k``: its own norms and projection, then the decoder-layer rules of HF layer
        ``num_layers + k`` under ``mtp.layers.{k}.<transformer_layer | mtp_model_layer>.``."""
        M, H, layer, n = f"mtp.layers.{k}.", self.mtp_hf_prefix(k), self.mtp_rule_layer(k), self.mtp_hf_names(k)
        prefix = self.hf_layer_prefix.replace("{L}", str(layer))
        rows = [rule(M + "enorm.weight", n["enorm"], REPLICATED),
                rule(M + "hnorm.weight", n["hnorm"], REPLICATED),
                rule(M + "eh_proj.weight", n["eh_proj"], COLUMN)]
        inner = M + mtp_layer_attribute() + "."
        for r in per_layer:
            if not r.applies(self, layer):
                continue
            if not r.mcore.startswith(DECODER_LAYER):
                raise AssertionError(f"per-layer rule {r.mcore} is not under {DECODER_LAYER}")
            rows.append(dataclasses.replace(
                r, mcore=inner + r.mcore[len(DECODER_LAYER):],
                hf=tuple(_rebase(h.replace("{L}", str(layer)), prefix, H) for h in r.hf), when=Layers.ALL,
                mixer="all"))
        rows.append(rule(M + "final_layernorm.weight", n["final_norm"], REPLICATED))
        return rows


def _with_copies(r, copies: list[str]):
    """``r`` reading its HF tensor and the copies of it (checked equal on load, all written on export)."""
    return dataclasses.replace(r, hf=r.hf + tuple(copies), transform=Copies(r.transform, 1 + len(copies)))


def _rebase(name: str, prefix: str, new: str) -> str:
    if not name.startswith(prefix):
        raise AssertionError(f"per-layer HF name {name} is not under {prefix}")
    return new + name[len(prefix):]
