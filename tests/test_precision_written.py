"""``--test-convert-precision`` judges what was written, in both directions: with a writer that
scales one tensor by 1.01 (the converted model itself untouched) the check fails; without the
fault it passes (the control)."""

from __future__ import annotations

import pytest

from tests import writer_fault_cases as wfc
from tests.test_megatron_lm_ckpt import llama_adapter  # noqa: F401  (a fixture)

MCORE_NAME = "decoder.layers.1.mlp.linear_fc2.weight"
HF_NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.world(1)
@pytest.mark.parametrize("fmt", ["torch_dist", "plain"])
def test_to_mcore_precision_check_loads_what_was_written(pools, zoo_model, tmp_path, fmt):
    src = str(zoo_model("llama"))
    pool = pools.get(1)
    argv = ["export", "--model", src, "--to-mcore", "--ckpt-format", fmt, "--device", "cpu",
            "--test-convert-precision"]
    clean = pool.run(wfc.export_with_writer_fault, argv=argv + ["--save", str(tmp_path / "clean")], fault=None,
                     name=MCORE_NAME)[0]
    assert clean == {"code": 0, "faulted": []}
    if fmt == "plain":  # the plain writer is the HF writer's write_shard
        faulty = pool.run(wfc.export_with_writer_fault, argv=argv + ["--save", str(tmp_path / "faulty")], fault="hf",
                          name=f"chunk0.{MCORE_NAME}")[0]
    else:
        faulty = pool.run(wfc.export_with_writer_fault, argv=argv + ["--save", str(tmp_path / "faulty")],
                          fault="torch_dist", name=MCORE_NAME)[0]
    assert faulty["faulted"] and faulty["code"] == 1, faulty


@pytest.mark.world(1)
def test_to_hf_precision_check_loads_what_was_written(pools, zoo_model, tmp_path):
    src = str(zoo_model("llama"))
    pool = pools.get(1)
    argv = ["export", "--model", src, "--to-hf", "--device", "cpu", "--test-convert-precision"]
    clean = pool.run(wfc.export_with_writer_fault, argv=argv + ["--save", str(tmp_path / "clean")], fault=None,
                     name=HF_NAME)[0]
    assert clean == {"code": 0, "faulted": []}
    faulty = pool.run(wfc.export_with_writer_fault, argv=argv + ["--save", str(tmp_path / "faulty")], fault="hf",
                      name=HF_NAME)[0]
    assert faulty["faulted"] == [HF_NAME] and faulty["code"] == 1, faulty


@pytest.mark.world(1)
def test_to_mcore_adapter_precision_check_loads_the_written_factors(pools, zoo_model, llama_adapter, tmp_path):
    """An adapter-only checkpoint: the check puts the written factors on the HF base weights."""
    src = str(zoo_model("llama"))
    pool = pools.get(1)
    argv = ["export", "--model", src, "--adapters", str(llama_adapter), "--to-mcore", "--device", "cpu",
            "--test-convert-precision"]
    name = "decoder.layers.1.mlp.linear_fc2.lora_B.default.weight"
    clean = pool.run(wfc.export_with_writer_fault, argv=argv + ["--save", str(tmp_path / "clean")], fault=None,
                     name=name)[0]
    assert clean == {"code": 0, "faulted": []}
    faulty = pool.run(wfc.export_with_writer_fault, argv=argv + ["--save", str(tmp_path / "faulty")],
                      fault="torch_dist", name=name, factor=2.0)[0]
    assert faulty["faulted"] == [name] and faulty["code"] == 1, faulty
