"""``verify.pytest_plugin``: the helpers other projects use to assert alignment in their own test
suites, used here as a user would (subprocesses under torch.distributed.run), with a negative
control: an injected ×1.01 fault raises AssertionError naming the layer."""

from __future__ import annotations

import pytest

from verify.pytest_plugin import assert_aligned, mcore_bridge_assert_aligned, mcore_bridge_matrix  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def shared_ref(tmp_path_factory):
    return tmp_path_factory.mktemp("plugin-reference-cache")


@mcore_bridge_matrix(["builtin:qwen3"], "tp=1,2", check_model=False)
def test_builtin_qwen3_is_aligned(model, layout, bridge_cache, shared_ref, tmp_path):
    report = assert_aligned(model, layout, report_dir=tmp_path, reference_cache=shared_ref)
    assert report["layout_id"] == layout.short() and report["world_size"] == layout.min_world_size
    assert report["detection"]["caught"] and report["detection"]["located"], report["detection"]
    assert list(tmp_path.rglob("*.md")), "the report is written where the test asked"


def test_injected_fault_raises_naming_the_layer(bridge_cache, shared_ref, mcore_bridge_assert_aligned):
    with pytest.raises(AssertionError, match=r"first diverging layer: layer\.1 .*model\.layers\.1\."):
        mcore_bridge_assert_aligned("builtin:qwen3", {}, control="scale:decoder.layers.1.mlp.linear_fc2.weight:1.01",
                                    reference_cache=shared_ref)


def test_matrix_ids_and_model_check(zoo_model):
    mark = mcore_bridge_matrix(["builtin:qwen3"], "tp=1,2 pp=1,8", check_model=False)
    assert [p.id for p in mark.args[1]] == ["qwen3-tiny[tp1-pp1]", "qwen3-tiny[tp1-pp8]", "qwen3-tiny[tp2-pp1]",
                                            "qwen3-tiny[tp2-pp8]"]
    checked = mcore_bridge_matrix([str(zoo_model("qwen3"))], "tp=1,2 pp=1,8")  # 4 layers: pp 8 does not apply
    assert [p.values[1].short() for p in checked.args[1]] == ["tp1-pp1", "tp2-pp1"]
