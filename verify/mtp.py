"""Multi-token prediction (MTP) heads: our reference and the comparison.

transformers runs no MTP layer (it does not even build one), so the reference here is ours: the
published MTP formula (DeepSeek-V3 technical report, section 2.2) on the HF checkpoint's weights,
with the concatenation order of the released weights as the serving engines apply them (vLLM's and
SGLang's DeepSeek-V3 / GLM-4.5 MTP: ``eh_proj(cat(enorm(emb), hnorm(h)))``, embedding first), which
is also megatron-core's order:

    h_0      = the main model's last hidden state after its final norm, h_0[i] for token i
    x_k[i]   = eh_proj_k(cat(enorm_k(embed(t[i + k + 1])), hnorm_k(h_k[i])))
    h_{k+1}  = shared_head.norm_k(decoder_layer_k(x_k))       (causal, RoPE positions 0..S-1)
    logits_k = shared_head.head_k(h_{k+1})                    (predicts t[i + k + 2])

The decoder layer is transformers' own decoder-layer class of the model (built for layer index
``num_hidden_layers + k``, so it is MoE where HF's layer of that index would be), run inside a
one-layer instance of transformers' own base model (its causal mask and rotary embedding). The
family names the MTP tensors and how transformers loads the decoder layers (``MTPMixin``'s hooks
``mtp_hf_names`` / ``mtp_reference_kwargs``); the norms are the model's own norm class (so a
``(1 + w)`` family's MTP norms are ``(1 + w)`` too); where the checkpoint stores no embedding or head
copy, the main model's are used.
Positions ``i >= S - k - 1`` have no real token ``t[i + k + 1]`` and are not compared.
An MoE MTP layer's expert choice is recorded on both sides (``verify.probes``' routing hooks; megatron's
``mtp.{k}.router``) and compared as the decoder layers' are: ``router_agreement`` per depth, gated by
the MoE limit (a flipped choice would otherwise show only as drift of the layer's output).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

REFERENCE = ("ours (verify/mtp.py): the published MTP formula on the HF weights, with transformers' decoder "
             "layer; transformers has no MTP forward")


def family(model_dir: Path):
    """The bridge family of ``model_dir``, adapted to its checkpoint's names."""
    import json

    from mcore_bridge.families import family_for
    from mcore_bridge.hf_io import HFCheckpoint

    fam = family_for(json.loads((Path(model_dir) / "config.json").read_text()))
    fam.adapt(set(HFCheckpoint(model_dir).names()))
    return fam


def depths(model_dir: Path) -> int:
    """MTP layers the checkpoint holds (0 when the config declares none or the tensors are absent)."""
    import json

    fam = family(model_dir)
    return int(getattr(fam, "mtp_layers", 0))


def _text(model):
    """The language model inside ``model`` (a vision-language model's ``language_model``)."""
    return getattr(model.model, "language_model", model.model)


def load(model_dir: Path, dtype, device, n: int):
    """The transformers model of ``model_dir`` with its MTP layers' decoder layers loaded by
    transformers itself (built as layers ``N .. N+n-1``, its own weight conversions applied), then
    split off: ``(model running the N main layers, [decoder layer of MTP depth k])``. A
    vision-language checkpoint: its image-text-to-text model, the settings applied to its
    ``text_config``."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging

    logging.disable_progress_bar()
    fam = family(model_dir)
    layers = fam.num_layers
    kwargs = dict(fam.mtp_reference_kwargs(n))
    cls = AutoModelForCausalLM
    if "vision_config" in json.loads((Path(model_dir) / "config.json").read_text()):
        cls, config = AutoModelForImageTextToText, AutoConfig.from_pretrained(model_dir)
        for key in [k for k in kwargs if k != "key_mapping"]:
            setattr(config.text_config, key, kwargs.pop(key))
        kwargs["config"] = config
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the MTP-only tensors (enorm, eh_proj, ...) are "unexpected" to it
    try:
        model = cls.from_pretrained(model_dir, dtype=dtype, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    from .forward import as_reference

    model = as_reference(model, dtype).to(device).eval()
    text = _text(model)
    mtp_layers = list(text.layers[layers:])
    text.layers = text.layers[:layers]
    text.config.num_hidden_layers = layers
    # (a hybrid's ``layer_types`` keeps the MTP layers' entries: ``reference`` reads them)
    return model, mtp_layers


def reference(model, mtp_layers, model_dir: Path, input_ids: torch.Tensor, position_ids=None,
              vision: dict | None = None) -> list[dict]:
    """Per MTP depth: ``{"hidden": [S, H], "logits": [S, V]}`` (fp32) for one sample ``[S]``
    (vision-language models: with its 3-D ``position_ids [3, 1, S]`` and vision inputs, which
    give the main model's hidden state; the MTP layer embeds the shifted tokens as text, as
    megatron's does, and runs on the same positions)."""
    from mcore_bridge.hf_io import HFCheckpoint

    from .probes import _hf_routing

    ckpt, fam = HFCheckpoint(model_dir), family(model_dir)
    inner = _text(model)
    cfg = inner.config
    layers = cfg.num_hidden_layers
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    ids = input_ids[None].to(device)
    one = copy.deepcopy(cfg)
    one.num_hidden_layers = 1
    out = []
    kw = {k: v.to(device) for k, v in (vision or {}).items()}
    pos = None if position_ids is None else position_ids.to(device)
    from .forward import reference_run

    # the main model's forward and the MTP layers on the paths of the main reference (hf_forward):
    # outside them, an fp32 reference on a GPU ran fla's TF32 delta rule (MTP drift 1.3e-3, H200)
    with torch.no_grad(), reference_run(model):
        # after the final norm
        h = model.model(input_ids=ids, position_ids=pos, use_cache=False, **kw).last_hidden_state
        for k, layer in enumerate(mtp_layers):
            names = fam.mtp_hf_names(k)
            if getattr(one, "layer_types", None):  # a hybrid: the MTP layer's own type
                one.layer_types = [cfg.layer_types[layers + k]]

            def w(role):
                return ckpt.read(names[role]).to(device=device, dtype=dtype)

            embed = (w("embed") if names["embed"] else inner.embed_tokens.weight)  # the layer's own copy, if any
            head = (w("head") if names["head"] else model.get_output_embeddings().weight)
            shifted = torch.roll(ids, -(k + 1), dims=-1)
            shifted[..., ids.shape[-1] - k - 1:] = 0  # no real token there (megatron rolls in 0s too)
            e = torch.nn.functional.embedding(shifted, embed)
            norm = type(inner.norm)
            enorm, hnorm, final = (norm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(device=device, dtype=dtype)
                                   for _ in range(3))
            enorm.weight.copy_(w("enorm"))
            hnorm.weight.copy_(w("hnorm"))
            final.weight.copy_(w("final_norm"))
            x = torch.nn.functional.linear(torch.cat([enorm(e), hnorm(h)], dim=-1), w("eh_proj"))
            with torch.device("meta"):  # a one-layer base model for its causal mask and RoPE; nothing allocated
                body = type(inner)(one)
            body.rotary_emb, body.norm = inner.rotary_emb, final
            body.layers = torch.nn.ModuleList([layer])
            routing = {}  # an MoE MTP layer's expert choice (probes' HF routing hooks; "router.0": its one layer)
            with _hf_routing([layer], routing):
                h = body.eval()(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
            logits = torch.nn.functional.linear(h, head)
            out.append({"hidden": h[0].float().cpu(), "logits": logits[0].float().cpu(),
                        **({"routing": routing["router.0"][0]} if "router.0" in routing else {})})
    return out


def _depth_metrics(samples, ref: dict, other, k: int) -> tuple[dict, float, float | None, tuple[int, int]]:
    """MTP depth ``k`` of ``other(sample name) -> (logits, hidden, routing)`` against ``ref``: (combined logit metrics, worst relative drift of the hidden state, router agreement
    or None, (positions compared, those of them with a loss label))."""
    from . import metrics

    per_input, weights, drift, agree, routed, with_loss = {}, {}, 0.0, 0.0, 0, 0
    for s in samples:
        keep = s.input_ids.numel() - k - 1  # positions with a real next token
        r = ref[s.name]["mtp"][k]
        logits, hidden, got_map = other(s.name)
        ref_map = r.get("routing")
        if (ref_map is None) != (got_map is None):
            raise RuntimeError(f"mtp.{k}: one side's MTP layer routes tokens, the other's does not")
        if ref_map is not None:  # [S, experts] on both sides
            agree += metrics.routing_agreement(ref_map[:keep], got_map[:keep]) * keep
            routed += keep
        labels = torch.roll(s.labels, -(k + 1))[:keep]  # position i's label read at i + 1: t[i + k + 2]
        per_input[s.name] = metrics.compare_logits(r["logits"][:keep], logits[:keep], labels)
        with_loss += int(metrics.loss_positions(labels).sum())
        weights[s.name] = keep
        drift = max(drift, metrics.probe_drift(r["hidden"][:keep], hidden[:keep])["rel_mean_diff"])
    return (metrics.combine(per_input, weights), drift, (agree / routed if routed else None),
            (sum(weights.values()), with_loss))


def compare(samples, ref: dict, got: dict, limits: dict, gate: str, bridge, calib: dict | None = None,
            dtype: str = "fp32") -> tuple[dict | None, list[str], dict | None]:
    """(report section, failures, first diverging) for the MTP depths of ``ref``/``got``.
    Without ``calib``: the main model's limits. With it (HF's own run at ``dtype`` -- bf16, or fp64 for
    a calibrated fp32 check -- its MTP heads through the same reference formula): each depth's limits
    come from HF's own drift at that depth, as the decoder layers' do. An MTP layer sees the main
    model's drifted hidden state, so in bf16 it drifts more than any decoder layer (GLM-4.5-Air on an
    H200: 3.1e-2, against the fixed 1e-3 it was judged by before)."""
    from . import metrics

    if not any(ref[s.name].get("mtp") for s in samples):
        return None, [], None
    n = len(ref[samples[0].name]["mtp"])
    section = {"reference": REFERENCE, "depths": []}
    fails, first = [], None
    for k in range(n):
        def mine(name, k=k):
            return (got[name]["mtp_logits"][k], got[name]["probes"][f"mtp.{k}"],
                    got[name]["probes"].get(f"mtp.{k}.router"))

        m, drift, agreement, positions = _depth_metrics(samples, ref, mine, k)
        depth_limits, drift_limit = dict(limits), limits["layer_rel_drift"]
        if calib is not None:  # this depth's own calibration
            def hf_own(name, k=k):
                c = calib[name]["mtp"][k]
                return c["logits"], c["hidden"], c.get("routing")

            cal, cal_drift, cal_agreement, _ = _depth_metrics(samples, ref, hf_own, k)
            if cal_agreement is not None:
                cal["router_agreement"] = cal_agreement
            depth_limits = metrics.thresholds(dtype, cal, moe=agreement is not None, gate=gate, tokens=positions)
            drift_limit = max(drift_limit, metrics.calibration_factor(dtype) * cal_drift)
        router_min = depth_limits.get("router_agreement_min")
        gated_limits = {key: v for key, v in depth_limits.items() if not key.startswith("router_agreement")}
        depth_fails = [f"mtp.{k} {f}" for f in metrics.failures(m, gated_limits, gate)]
        if drift > drift_limit:
            depth_fails.append(f"mtp.{k} drift {drift:.2e} > {drift_limit:.2e}")
        if agreement is not None:
            m["router_agreement"] = agreement
            if router_min is not None and agreement < router_min:
                depth_fails.append(f"mtp.{k} routing: {agreement:.3f} of tokens reach the same experts "
                                   f"(< {router_min:.3f})")
        section["depths"].append({"depth": k, "probe": f"mtp.{k}", "rel_mean_diff": drift, **m,
                                  "threshold": drift_limit, "ok": not depth_fails})
        if depth_fails and first is None:
            units = [u for u in bridge.units if u.rule.mcore.startswith(f"mtp.layers.{k}.")]
            first = {"probe": f"mtp.{k}", "layer": None, "rel_mean_diff": drift, "cause": "weights",
                     "hf_params": [x for u in units for x in u.hf_names],
                     "mcore_params": list(dict.fromkeys(u.rule.mcore for u in units)),
                     "threshold": drift_limit}
        fails += depth_fails
    return section, fails, first
