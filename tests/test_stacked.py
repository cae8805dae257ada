"""Stacked expert storage (``experts.gate_up_proj [E, ...]``, ``experts.down_proj``): read through
per-expert views (only a rank's rows of the stack), exported stacked by default when the source was
stacked, and convertible both ways."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mcore_bridge import ParallelLayout as L
from mcore_bridge import stacked
from mcore_bridge.families import family_for
from mcore_bridge.hf_io import HFCheckpoint
from tests import cases

EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def make_stacked(src, dst, orientation: str):
    """Rewrite a per-expert checkpoint with stacked experts, independently of the bridge: stack
    gate and up along the intermediate axis, in nn.Linear orientation (out_in) or transposed (in_out)."""
    ckpt = HFCheckpoint(src)
    plain, experts = {}, {}
    for name in ckpt.names():
        m = EXPERT.match(name)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = ckpt.read(name).clone()
        else:
            plain[name] = ckpt.read(name).clone()
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        gate_up = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)])
        down = torch.stack([parts[(e, "down")] for e in range(n)])
        if orientation == stacked.IN_OUT:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        plain[f"{prefix}.gate_up_proj"] = gate_up.contiguous()
        plain[f"{prefix}.down_proj"] = down.contiguous()
    dst.mkdir()
    save_file(plain, str(dst / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def stacks(zoo_model, tmp_path_factory):
    src = zoo_model("qwen3_moe")
    root = tmp_path_factory.mktemp("stacked")
    return {"per_expert": src, **{o: make_stacked(src, root / o, o) for o in stacked.ORIENTATIONS}}


def test_detects_orientation_and_refuses_misfit_stacks(stacks):
    fam = family_for(json.loads((stacks["per_expert"] / "config.json").read_text()))
    for o in stacked.ORIENTATIONS:
        ckpt = HFCheckpoint(stacks[o])
        assert stacked.detect(fam, {n: (i.shape, i.dtype) for n, i in ckpt.tensors.items()}) == o
        view, found = stacked.open_checkpoint(ckpt, fam)
        assert found == o and "model.layers.2.mlp.experts.5.up_proj.weight" in view.names()
        src = HFCheckpoint(stacks["per_expert"])
        for name in ("model.layers.2.mlp.experts.5.up_proj.weight", "model.layers.0.mlp.experts.0.down_proj.weight"):
            assert torch.equal(view.read(name), src.read(name))
            assert torch.equal(view.read(name, (slice(8, 24), slice(None))), src.read(name)[8:24])
    tensors = {n: (i.shape, i.dtype) for n, i in HFCheckpoint(stacks[stacked.IN_OUT]).tensors.items()}
    name = "model.layers.1.mlp.experts.gate_up_proj"
    tensors[name] = ((7,) + tuple(tensors[name][0][1:]), tensors[name][1])  # 7 experts, config says 8
    with pytest.raises(Exception, match="fit neither"):
        stacked.detect(fam, tensors)


CASES = [  # (source, export storage, what the export must equal)
    (stacked.IN_OUT, "source", stacked.IN_OUT),
    (stacked.OUT_IN, "source", stacked.OUT_IN),
    (stacked.IN_OUT, "per_expert", "per_expert"),
    ("per_expert", stacked.IN_OUT, stacked.IN_OUT),
]


@pytest.mark.world(4)
@pytest.mark.parametrize("source,storage,expected", CASES, ids=[f"{a}-to-{c}" for a, _, c in CASES])
def test_stacked_roundtrips_and_conversions(source, storage, expected, stacks, pools, tmp_path):
    layout = L(tp=2, sp=True, ep=2)
    out = tmp_path / "out"
    results = pools.get(4).run(cases.export_against, timeout=300, source=str(stacks[source]),
                               layout=layout.to_dict(), reference=str(stacks[expected]),
                               expert_storage=storage, out_dir=str(out))
    want = sorted(HFCheckpoint(stacks[expected]).names())
    for r in results:
        assert r["mismatches"] == [] and r["names"] == want, r["rank"]
    saved, ref = HFCheckpoint(out), HFCheckpoint(stacks[expected])
    assert sorted(saved.names()) == want
    assert all(torch.equal(saved.read(n), ref.read(n)) for n in want)


@pytest.mark.world(4)
def test_stacked_source_loads_the_same_parameters(stacks, pools, tmp_path):
    layout = L(ep=2, etp=2).to_dict()
    digests = []
    for source in ("per_expert", stacked.IN_OUT):
        out = pools.get(4).run(cases.export_against, timeout=300, source=str(stacks[source]), layout=layout,
                               reference=str(stacks[source]), expert_storage="source",
                               out_dir=str(tmp_path / source))
        digests.append([r["digest"] for r in sorted(out, key=lambda r: r["rank"])])
    assert digests[0] == digests[1]


@pytest.mark.world(4)
def test_stacked_reads_touch_only_the_ranks_rows(stacks, pools):
    results = pools.get(4).run(cases.stacked_reads, timeout=300, source=str(stacks[stacked.IN_OUT]),
                               layout=L(ep=2, etp=2).to_dict())
    for r in results:  # 8 experts over ep 2, intermediate 32 over etp 2; in_out: [E, H, 2F]
        mine = list(range(4 * r["ep_rank"], 4 * r["ep_rank"] + 4))
        assert r["experts"] == mine, r
        f0 = 16 * r["etp_rank"]
        assert r["gate_up_cols"] == [(f0, f0 + 16), (32 + f0, 32 + f0 + 16)], r
        assert r["whole_stack_reads"] == 0
