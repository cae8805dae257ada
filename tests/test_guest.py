"""The bridge as a guest in someone else's process (issue 16, part 4).

A host -- a stand-in for a trainer -- initialises torch.distributed and megatron's parallel state
itself (tests/guest_cases.py, in a bare pool: nothing set up by us), then loads, exports, saves and
syncs through the public API. Afterwards its process must be as it was: torch.compile compiles,
no TorchFunctionMode is left on the stack, no environment variable appeared, megatron's groups are
the very objects the host created and every attribute compat patches is back. Context parallelism
(weights replicated over CP ranks) round-trips byte-exactly; forward verification at cp > 1 is
refused with the reason (megatron-core's local spec has no CP attention).
"""

from __future__ import annotations

import pytest

from tests import cases, guest_cases

CASE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def host_pool(bridge_cache):
    from verify.pool import Pool

    with Pool(2, bare=True) as pool:
        yield pool


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2)], ids=["tp2", "cp2"])
def test_guest_in_a_host_process(tp, cp, host_pool, zoo_model, tmp_path):
    src = zoo_model("llama")
    out = tmp_path / "saved"
    results = host_pool.run(guest_cases.host, timeout=CASE_TIMEOUT_S, source=str(src), tp=tp, cp=cp,
                            out_dir=str(out))
    names = sorted(cases.HFCheckpoint(src).names())
    for r in results:
        where = f"rank {r['rank']}"
        assert (r["layout"]["tp"], r["layout"]["cp"], r["layout"]["pp"]) == (tp, cp, 1), where
        assert r["layout_from_models"]["tp"] == tp and r["layout_from_models"]["cp"] == cp, where
        # a layout that does not match the host's state is refused, naming both; nothing destroyed
        assert r["mismatch_error"] and "tp" in r["mismatch_error"] and "from_parallel_state" in r["mismatch_error"]
        mine, other = r["shorts"]
        assert f"parallel state in this process is {mine} " in r["mismatch_error"], r["mismatch_error"]
        assert f"the bridge's layout is {other}:" in r["mismatch_error"], r["mismatch_error"]
        assert r["groups_after_mismatch"], where
        # export: every tensor once, byte-exact; the host's code between items runs outside the scope
        e = r["export"]
        assert e["names"] == names and e["count"] == len(names) and e["mismatches"] == [], where
        assert e["mode_stack_between_items"] == [0], where
        assert e["host_frames_compiled"] == 1, where
        # sync to ranks 0 and 1, twice: exact, and the leader group is created once
        assert [s["names"] for s in r["sync"]] == [names, names] and all(s["exact"] for s in r["sync"]), where
        assert r["sync"][0]["process_groups"] == r["sync"][1]["process_groups"], where
        a = r["after"]
        assert a["compile_is_identity"] is False and a["compiled_frames"] == 1, where
        assert a["mode_stack"] == 0, where
        assert a["env_added"] == [] and a["env_changed"] == [], where
        assert all(a["groups_same"].values()), (where, a["groups_same"])
        assert a["host_process_groups_alive"], where
        assert a["cuda_current_device_restored"] and a["cuda_synchronize_restored"], where
        assert a["patched_not_restored"] == [] and a["compat_active"] == [], where
        # control: inside a scope the same things are changed (so the checks above can fail)
        i = r["inside"]
        assert i["mode_stack"] == 1 and i["cuda_current_device_patched"], where
        assert i["compiled_frames"] == 0 and i["dynamo_frames_delta"] == 0, where
        assert i["megatron_helper_is_compiled"], where  # torch.compile-wrapped, yet ran eagerly above
    saved = cases.HFCheckpoint(out)
    assert sorted(saved.names()) == names
    source = cases.HFCheckpoint(src)
    assert all(cases.same_bytes(saved.read(n), source.read(n)) for n in names)


# ---- context parallelism ------------------------------------------------------------------------

@pytest.mark.parametrize("model,world,layout", [
    pytest.param("llama", 2, {"cp": 2}, id="llama-cp2", marks=pytest.mark.world(2)),
    pytest.param("qwen3_moe", 2, {"cp": 2, "ep": 2}, id="qwen3_moe-cp2-ep2", marks=pytest.mark.world(2)),
    pytest.param("llama", 4, {"tp": 2, "cp": 2}, id="llama-tp2-cp2", marks=pytest.mark.world(4)),
])
def test_context_parallel_roundtrip(model, world, layout, pools, zoo_model, tmp_path):
    """Weights replicated over the CP ranks: every rank gets every tensor byte-exactly, the saved
    checkpoint is written once (no duplicate shards from CP replicas) and equals the source."""
    src = zoo_model(model)
    out = tmp_path / "converted"
    results = pools.get(world).run(cases.roundtrip, timeout=CASE_TIMEOUT_S, source=str(src), layout=layout,
                                   out_dir=str(out))
    assert len(results) == world
    cases.check_roundtrip(results, src, out)


@pytest.mark.world(2)
def test_context_parallel_torch_dist(pools, zoo_model, tmp_path):
    """A torch_dist checkpoint saved at cp=2 loads at cp=1 (dp=2) and gives the source bytes back."""
    src = zoo_model("llama")
    pool = pools.get(2)
    pool.run(cases.mcore_save, timeout=CASE_TIMEOUT_S, source=str(src), layout={"cp": 2}, out_dir=str(tmp_path / "m"))
    pool.run(cases.mcore_to_hf, timeout=CASE_TIMEOUT_S, ckpt=str(tmp_path / "m"), layout={},
             out_dir=str(tmp_path / "hf"), hf_dir=str(src))
    source, back = cases.HFCheckpoint(src), cases.HFCheckpoint(tmp_path / "hf")
    assert sorted(back.names()) == sorted(source.names())
    assert all(cases.same_bytes(back.read(n), source.read(n)) for n in source.names())


@pytest.mark.world(2)
def test_local_spec_has_no_cp_attention(pools, zoo_model):
    """The fact behind the refusal below, measured on the installed megatron-core."""
    errors = pools.get(2).run(guest_cases.cp_attention_probe, timeout=CASE_TIMEOUT_S, source=str(zoo_model("llama")))
    assert all(e and "Context parallelism" in e for e in errors), errors


def test_verify_refuses_context_parallel(tmp_path, bridge_cache):
    from tests.test_cli import run_cli

    r = run_cli("verify", "--model", "builtin:llama", "--matrix", "tp=1 cp=2", "--device", "cpu",
                "--report", tmp_path / "reports")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cp=2" in r.stderr and "megatron.core.transformer.dot_product_attention.DotProductAttention" in r.stderr
    assert not (tmp_path / "reports").exists()  # refused before any case ran
    r = run_cli("export", "--model", "builtin:llama", "--to-hf", "--cp", "2", "--test-convert-precision",
                "--save", tmp_path / "out")
    assert r.returncode == 2 and "DotProductAttention" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# ---- compat.scope itself (in this process) ------------------------------------------------------

def test_scope_restores_nests_and_refuses_undeclared_patches(monkeypatch):
    import sys
    import types

    from mcore_bridge.runtime import compat

    fake = types.ModuleType("mcore_bridge_test_owner")
    fake.a, fake.b = 1, 2
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    @compat._patches(f"{fake.__name__}:a,c")
    def declared():
        fake.a, fake.c = 10, 30  # c did not exist: removed again on exit

    @compat._patches(f"{fake.__name__}:a")
    def undeclared():
        fake.a, fake.b = 10, 20

    none = {c: [] for c in ("local_spec", "cpu", "no_te", "no_grouped_gemm")}
    monkeypatch.setattr(compat, "_ADAPTATIONS", dict(none, local_spec=[declared]))
    with compat.scope("cuda") as installed:
        assert "local_spec" in installed and (fake.a, fake.c) == (10, 30)
        with compat.scope("cuda") as inner:
            assert inner == [] and fake.a == 10  # nested: nothing installed twice
        assert fake.a == 10  # the inner scope restored nothing it did not install
    assert fake.a == 1 and not hasattr(fake, "c") and compat.active() == []

    monkeypatch.setattr(compat, "_ADAPTATIONS", dict(none, local_spec=[undeclared]))
    with pytest.raises(RuntimeError, match=r"undeclared changed .*\.b without declaring it"):
        with compat.scope("cuda"):
            pass
    assert fake.a == 1 and compat.active() == []  # the declared part was rolled back


def test_cli_export_at_context_parallel(tmp_path, bridge_cache):
    """`export --cp 2` starts two processes (torchrun) and writes the source bytes back."""
    from mcore_bridge import zoo
    from tests.test_cli import assert_same_weights, run_cli

    r = run_cli("export", "--model", "builtin:llama", "--to-hf", "--context_parallel_size", "2", "--device", "cpu",
                "--save", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layout tp1-pp1-cp2" in r.stdout
    assert_same_weights(zoo.materialize("llama"), tmp_path / "out")
