"""Megatron distributed checkpoints (torch_dist) through megatron-core's dist_checkpointing:
Megatron-LM's directory layout, resharding between layouts (dense and MoE), checkpoints without
mcore-bridge's metadata, and checkpoint pickles that would run code."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from mcore_bridge import ParallelLayout as L
from mcore_bridge import dist_ckpt
from mcore_bridge.hf_io import CheckpointError, HFCheckpoint
from tests import cases


def assert_same_hf(src, out):
    a, b = HFCheckpoint(src), HFCheckpoint(out)
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert cases.same_bytes(a.read(n), b.read(n)), n


def save(pools, src, layout, world, out):
    pools.get(world).run(cases.mcore_save, timeout=300, source=str(src), layout=layout.to_dict(), out_dir=str(out))


def to_hf(pools, ckpt, layout, world, out, hf_dir=None):
    pools.get(world).run(cases.mcore_to_hf, timeout=300, ckpt=str(ckpt), layout=layout.to_dict(), out_dir=str(out),
                         hf_dir=None if hf_dir is None else str(hf_dir))


PAIRS = [  # (model, written at (world, layout), read at (world, layout))
    ("qwen3", (4, L(tp=2, pp=2)), (4, L(pp=4))),
    ("llama", (2, L(pp=2, vpp=2)), (2, L(tp=2, sp=True))),
    ("qwen2", (2, L(tp=2, sp=True)), (1, L())),
    ("qwen3_moe", (2, L(tp=2, sp=True, ep=2, etp=1)), (4, L(ep=4))),
    ("mixtral", (2, L(ep=2)), (4, L(tp=2, sp=True, ep=2))),
    ("deepseek_v3", (4, L(tp=2, sp=True, ep=2)), (4, L(pp=2, ep=2))),
    ("qwen2_moe", (4, L(pp=2, ep=2)), (2, L(tp=2, sp=True))),
    ("olmoe", (2, L(tp=2, sp=True)), (2, L(ep=2))),  # the full-width q/k norms, split over TP
]


@pytest.mark.parametrize("model,a,b", [pytest.param(m, a, b, id=f"{m}-{a[1].short()}-to-{b[1].short()}",
                                                    marks=pytest.mark.world(a[0])) for m, a, b in PAIRS])
def test_reshard_through_torch_dist_is_byte_exact(model, a, b, pools, zoo_model, tmp_path):
    src = zoo_model(model)
    ckpt, out = tmp_path / "mcore", tmp_path / "hf"
    save(pools, src, a[1], a[0], ckpt)
    to_hf(pools, ckpt, b[1], b[0], out)
    assert_same_hf(src, out)


@pytest.mark.world(2)
def test_megatron_lm_layout_and_foreign_checkpoints(pools, zoo_model, tmp_path):
    src = zoo_model("qwen3_moe")
    ckpt = tmp_path / "mcore"
    save(pools, src, L(ep=2), 2, ckpt)
    # Megatron-LM's resume layout: a release holding the distributed checkpoint
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    meta = json.loads((ckpt / "release" / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    # megatron-core 0.16 writes common.pt, 0.19 a "common_state" object inside the torch_dist files:
    # read through megatron's own entry point, which knows both
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    common = load_common_state_dict(str(ckpt / "release"))
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt / "release")).read_metadata().state_dict_metadata
    # megatron's own sharded keys, as Megatron-LM writes them (no "model." prefix inside)
    assert "embedding.word_embeddings.weight" in keys and not any(k.startswith("model.") for k in keys)
    assert any("experts" in k for k in keys)

    # as if written by Megatron-LM (no mcore-bridge metadata, an iteration instead of a release)
    foreign = tmp_path / "foreign"
    shutil.copytree(ckpt / "release", foreign / "iter_0000005")
    (foreign / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(CheckpointError, match="pass --model HF_DIR"):
        from mcore_bridge import checkpoint

        checkpoint.bridge_from_mcore(foreign)
    out = tmp_path / "hf"
    to_hf(pools, foreign, L(ep=2), 2, out, hf_dir=src)
    assert_same_hf(src, out)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_in_checkpoint_pickles_is_never_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "release").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("release")
    (ckpt / "release" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    marker = tmp_path / "pwned"
    (ckpt / "release" / ".metadata").write_bytes(pickle.dumps({"x": _Payload(str(marker))}))
    with pytest.raises(CheckpointError, match="refusing to unpickle posix.mkdir"):
        dist_ckpt.check_metadata(dist_ckpt.resolve(ckpt))
    assert not marker.exists()
    # common.pt: dist_checkpointing reads it with torch.load, whose default is weights_only=True
    # (0.16 through TorchCommonLoadStrategy, 0.19 as a legacy file next to the torch_dist files)
    torch.save({"checkpoint_version": 3.0, "evil": _Payload(str(marker))}, ckpt / "release" / "common.pt")
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_common_state_dict(str(ckpt / "release"))
    assert not marker.exists()


def test_resolve_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="not a Megatron distributed checkpoint"):
        dist_ckpt.resolve(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="names '7' but .*iter_0000007 holds no checkpoint"):
        dist_ckpt.resolve(tmp_path)
