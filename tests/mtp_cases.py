"""Shared scaffolding of the MTP tests of the families whose MTP layer is stored as Qwen3-Next
publishes it (top-level ``mtp.*``; ``families/qwen3_next.QwenNextMTP``): Qwen3-Next, Qwen3.5 and
Qwen3.5-MoE (tests/test_qwen3_next_mtp.py, tests/test_qwen3_5_mtp.py, tests/test_qwen3_5_moe_mtp.py).

Each helper asserts what every one of those families must show; the family's own expectations
(its tensor names, its refusals, its published configs) stay in its test file."""

from __future__ import annotations

import json

import pytest

from mcore_bridge.families import family_for
from mcore_bridge.plan import MappingError, check_names, expected_hf_names, inventory
from tests import cases, verify_cases

# the MTP layer's own tensors (the rest of it are decoder-layer tensors under mtp.layers.0.*)
MTP_OWN = ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight")


def config(zoo_model, model: str) -> dict:
    return json.loads((zoo_model(model) / "config.json").read_text())


def saved(zoo_model, model: str) -> set[str]:
    from mcore_bridge.hf_io import HFCheckpoint

    return set(HFCheckpoint(zoo_model(model)).names())


def adapted(raw_config: dict, names):
    fam = family_for(raw_config)
    fam.adapt(names)
    return fam


def rows(fam) -> dict:
    """The family's rules by megatron name, 0.19's ``mtp_model_layer`` spelled as 0.16's ``transformer_layer``."""
    return {r.mcore.replace(".mtp_model_layer.", ".transformer_layer."): r for r in fam.rules()}


def check_rules_name_the_mtp_tensors(fam, embed: str) -> dict:
    """The MTP layer's own rows name the published tensors; the embedding and head are the main
    model's (no copies). Returns the rows for the family's own checks."""
    r = rows(fam)
    assert r["mtp.layers.0.eh_proj.weight"].hf == ("mtp.fc.weight",)
    assert r["mtp.layers.0.enorm.weight"].hf == ("mtp.pre_fc_norm_embedding.weight",)
    assert r["mtp.layers.0.hnorm.weight"].hf == ("mtp.pre_fc_norm_hidden.weight",)
    assert r["mtp.layers.0.final_layernorm.weight"].hf == ("mtp.norm.weight",)
    assert r["embedding.word_embeddings.weight"].hf == (embed,)  # no copies stored
    assert r["output_layer.weight"].hf == ("lm_head.weight",)
    return r


def check_rules_cover(zoo_model, model: str, layouts, main_prefix: str) -> set[str]:
    """Every saved tensor is claimed, nothing more, in every layout; the MTP layer lives on the last
    pipeline stage's last virtual chunk. Returns the saved names."""
    names = saved(zoo_model, model)
    assert set(MTP_OWN) <= names and "mtp.layers.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith(f"{main_prefix}layers.4.") for n in names)  # not stored as a 5th main layer
    fam = adapted(config(zoo_model, model), names)
    for layout in layouts:
        units = inventory(fam, layout)
        assert expected_hf_names(units) == names, layout.short()
        mtp = [u for u in units if u.rule.mcore.startswith("mtp.")]
        assert {u.owner[0] for u in mtp} == {layout.pp - 1} and {u.chunk for u in mtp} == {layout.vpp - 1}
        assert {h for u in mtp for h in u.hf_names} >= set(MTP_OWN)
    return names


def check_nothing_dropped(zoo_model, model: str) -> None:
    """Strict accounting: an MTP tensor missing, or a second MTP layer, refused by name; a checkpoint
    without any mtp.* tensor converts as the main model alone; some MTP tensors but not all: the
    rest is missing."""
    from mcore_bridge import ParallelLayout as L

    names, raw = saved(zoo_model, model), config(zoo_model, model)
    units = inventory(adapted(raw, names), L())
    with pytest.raises(MappingError, match=r"missing 1 tensor\(s\): mtp\.pre_fc_norm_hidden\.weight"):
        check_names(units, names - {"mtp.pre_fc_norm_hidden.weight"}, "ckpt")
    with pytest.raises(MappingError, match=r"unexpected tensor\(s\).*mtp\.layers\.1\.input_layernorm\.weight"):
        check_names(units, names | {"mtp.layers.1.input_layernorm.weight"}, "ckpt")
    main = {n for n in names if not n.startswith("mtp.")}
    stripped = adapted(raw, main)
    assert stripped.mtp_layers == 0 and "mtp_num_layers" not in stripped.architecture.config
    assert expected_hf_names(inventory(stripped, L())) == main
    partial = adapted(raw, main | {"mtp.fc.weight"})
    with pytest.raises(MappingError, match=r"missing \d+ tensor\(s\): mtp\."):
        check_names(inventory(partial, L()), main | {"mtp.fc.weight"}, "ckpt")


def roundtrip(pools, world: int, layout, src, out) -> list[str]:
    """HF -> megatron -> HF on a pool of ``world`` ranks: every rank receives every tensor once,
    byte-identical, and the saved checkpoint holds the same bytes; the MTP layer's own tensors are
    among them. Returns the source's names."""
    results = pools.get(world).run(cases.roundtrip, timeout=300, source=str(src), layout=layout.to_dict(),
                                   out_dir=str(out))
    expected = cases.check_roundtrip(results, src, out)
    assert set(MTP_OWN) <= set(expected)
    return expected


def verify(pools, src, layout, ref_cache: str, world: int = 2, **kw) -> dict:
    """verify's fp32 report (rank 0's; exactly one rank reports)."""
    out = pools.get(world).run(verify_cases.verify, timeout=600, source=str(src), layout=layout.to_dict(),
                               reference_cache=ref_cache, **kw)
    reports = [r for r in out if r is not None]
    assert len(reports) == 1
    return reports[0]


def check_mtp_head_passes(r: dict, moe: bool) -> dict:
    """The report passes, the main model within 1e-4, and the one MTP depth against our reference of
    the formula (verify/mtp.py) within 1e-4 with every top-1 token agreeing; an MoE MTP layer (``moe``)
    routes every token to the same experts as transformers' layer (a dense one reports no routing),
    and the markdown report shows it. Returns the depth."""
    from verify.report import render_markdown, validate_report

    assert r["verdict"] == "pass", r["failures"]
    assert r["metrics"]["max_diff"] < 1e-4
    (depth,) = r["mtp"]["depths"]
    assert r["mtp"]["reference"].startswith("ours")
    assert depth["ok"] and depth["max_diff"] < 1e-4 and depth["top1_agreement"] == 1.0
    assert depth["rel_mean_diff"] < 1e-5
    assert depth.get("router_agreement") == (1.0 if moe else None)
    markdown = render_markdown(validate_report(r))
    assert "## Multi-token prediction heads" in markdown and ("router_agreement" in markdown.split("## Multi")[1]) == moe
    return depth


def check_mtp_control_located(r: dict, hf_name: str) -> None:
    """Negative control on an MTP weight: the main model stays exact, the MTP head fails, and the
    first divergence is located at ``mtp.0`` with ``hf_name`` among its HF tensors."""
    assert r["verdict"] == "fail"
    assert r["metrics"]["max_diff"] < 1e-4 and all(x["ok"] for x in r["layers"])  # the main model is untouched
    first = r["first_diverging"]
    assert first["probe"] == "mtp.0" and hf_name in first["hf_params"], first
    assert not r["mtp"]["depths"][0]["ok"] and any(f.startswith("mtp.0 ") for f in r["failures"])
