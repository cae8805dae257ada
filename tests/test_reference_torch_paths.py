"""The fp32 reference runs transformers' plain-torch functions where transformers would dispatch to an
optional kernel package (fla's TF32 gated delta rule on a GPU: reports/gpu-h200/published-issue19.md).
Checked with transformers' own decorator, on a package that is always importable."""

from __future__ import annotations

import json
import sys
import textwrap
import types

import pytest
import torch

from verify import forward

hub_kernels = pytest.importorskip("transformers.integrations.hub_kernels")


@pytest.fixture()
def fake_model_module():
    """A ``transformers.models.*`` module whose ``dedent`` is decorated as transformers decorates the
    delta rule: the package (textwrap) exists, so calls go to the package's function."""
    name = "transformers.models._mcore_bridge_probe"
    module = types.ModuleType(name)

    @hub_kernels.use_kernel_func_from_hub_with_fallback("dedent", "textwrap")
    def dedent(text):
        return "torch:" + text

    @hub_kernels.use_kernel_func_from_hub_with_fallback("no_such_function", "no_such_package_xyz")
    def missing(text):
        return "torch-only:" + text

    module.dedent, module.missing, module.plain = dedent, missing, textwrap.indent
    sys.modules[name] = module
    yield module
    del sys.modules[name]


def test_the_reference_calls_the_torch_original_and_restores_the_kernel(fake_model_module):
    m = fake_model_module
    kernel = m.dedent
    assert m.dedent("  x") == "x"  # outside: transformers dispatches to the package
    with forward.reference_torch_paths() as swapped:
        assert m.dedent("  x") == "torch:  x"
        assert "transformers.models._mcore_bridge_probe.dedent" in swapped
        # a wrapper already on its torch path, and an undecorated function, are left as they are
        assert not any(s.endswith((".missing", ".plain")) for s in swapped)
        assert m.missing("y") == "torch-only:y" and m.plain is textwrap.indent
    assert m.dedent is kernel and m.dedent("  x") == "x"


def test_restored_after_an_exception(fake_model_module):
    kernel = fake_model_module.dedent
    with pytest.raises(RuntimeError), forward.reference_torch_paths():
        raise RuntimeError("forward failed")
    assert fake_model_module.dedent is kernel


def test_hf_forward_switches_only_for_an_fp32_model(fake_model_module, monkeypatch):
    seen = []

    class Model(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

        def forward(self, input_ids, use_cache=False, **kw):
            seen.append(fake_model_module.dedent("  x"))
            return types.SimpleNamespace(logits=torch.zeros(1))

    forward.hf_forward(Model(torch.float32), torch.zeros(1, 2, dtype=torch.long))
    forward.hf_forward(Model(torch.bfloat16), torch.zeros(1, 2, dtype=torch.long))
    assert seen == ["torch:  x", "x"]  # fp32: the torch original; bf16: the kernel as the user runs it


def test_the_delta_rule_is_decorated_the_way_the_switch_expects():
    """The installed transformers' Qwen3-Next rule is the kind of wrapper the switch recognises (were
    transformers to change its mechanism, this fails instead of the GPU reference silently using fla)."""
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    fn = mod.torch_chunk_gated_delta_rule
    assert "use_kernel_func_from_hub_with_fallback" in fn.__code__.co_qualname
    assert fn.__wrapped__.__name__ == "torch_chunk_gated_delta_rule"


def test_the_mtp_reference_runs_on_the_main_reference_s_paths(zoo_model, monkeypatch):
    """verify.mtp's formula re-runs the main model and runs the MTP layer on the same HF model: both
    under the same switch as ``hf_forward`` (on an H200 its absence left the MTP reference on fla's TF32
    delta rule: MTP drift 1.3e-3 against a main model at 1.6e-6)."""
    import contextlib
    import importlib

    from verify import inputs, run

    active = []

    @contextlib.contextmanager
    def recording():
        active.append(True)
        try:
            yield []
        finally:
            active.pop()

    monkeypatch.setattr(forward, "reference_torch_paths", recording)
    mod = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")
    inside = {"delta": [], "attention": []}
    for key, cls in (("delta", mod.Qwen3NextGatedDeltaNet), ("attention", mod.Qwen3NextAttention)):
        original = cls.forward

        def spy(self, *a, _original=original, _key=key, **k):
            inside[_key].append(bool(active))
            return _original(self, *a, **k)

        monkeypatch.setattr(cls, "forward", spy)
    src = zoo_model("qwen3_next_mtp")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    out = run.hf_reference(src, [inputs.random_sample(vocab, 12, seed=1)], torch.float32, "cpu")
    assert len(next(iter(out.values()))["mtp"]) == 1
    # main forward (delta-net + attention), the MTP formula's main forward again, and its MTP layer (attention)
    assert len(inside["delta"]) >= 2 and len(inside["attention"]) >= 3
    assert all(inside["delta"]) and all(inside["attention"]), inside
