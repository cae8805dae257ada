"""LoRA functions run inside the ranks of a ``verify.pool.Pool`` (see ``tests/cases.py``).

Each returns small picklable results; logits come from the first tensor-parallel rank of the last
pipeline stage (``None`` elsewhere), the assertions live in ``tests/test_lora.py``.
"""

from __future__ import annotations

import torch

from mcore_bridge.lora import LoraSpec
from mcore_bridge.runtime import dist as rt
from tests.cases import BATCH, SEQ, _loaded


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _logits(bridge, models):
    from megatron.core import parallel_state as ps

    from verify.forward import megatron_logits

    got = megatron_logits(models, input_ids(int(bridge.hf_config["vocab_size"])), int(bridge.hf_config["vocab_size"]))
    if got is None or ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        return None
    return got


def lora_export(source: str, layout: dict, out_dir: str, spec: dict, peft_experts: str = "parameters") -> dict:
    """Megatron LoRA with non-zero B -> PEFT directory and merged HF weights; the base weights
    must be untouched by the merge."""
    bridge, models = _loaded(source, layout)
    bridge.apply_lora(models, LoraSpec.from_dict(spec), random_b=True)
    before = {k: v.detach().clone() for k, v in bridge.state(models).items()}
    got = _logits(bridge, models)
    bridge.save_weights(models, f"{out_dir}/adapter", peft_format=True, overwrite=True, peft_experts=peft_experts)
    bridge.save_weights(models, f"{out_dir}/merged", overwrite=True)
    unchanged = all(torch.equal(before[k], v) for k, v in bridge.state(models).items())
    return {"rank": rt.rank(), "logits": got, "unchanged": unchanged}


def lora_import(source: str, layout: dict, adapter: str, out_dir: str) -> dict:
    """A PEFT directory -> megatron LoRA -> PEFT directory again."""
    bridge, models = _loaded(source, layout)
    bridge.load_adapter(models, adapter)
    got = _logits(bridge, models)
    bridge.save_weights(models, out_dir, peft_format=True, overwrite=True)
    return {"rank": rt.rank(), "logits": got, "per_projection": bridge.lora.per_projection,
            "targets": list(bridge.lora.targets)}


def lora_grads(source: str, layout: dict, out_dir: str, spec: dict) -> dict:
    """LoRA gradients of a summed LM loss, exported in HF names: each factor's parameter is
    replaced by its gradient before the (shard-gathering) PEFT export. Layouts without data
    parallel replicas only (pp=1), so a rank's gradient is the whole gradient."""
    bridge, models = _loaded(source, layout)
    bridge.apply_lora(models, LoraSpec.from_dict(spec), random_b=True)
    model = models[0]
    ids = input_ids(int(bridge.hf_config["vocab_size"]))
    labels = torch.roll(ids, -1, dims=1)
    position_ids = torch.arange(SEQ).unsqueeze(0)
    loss = model(ids, position_ids, None, labels=labels)  # per-token loss [B, S], vocab-parallel CE
    loss.sum().backward()
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and ".lora_" not in n]
    with torch.no_grad():
        for t in bridge.state(models, lora=True).values():
            t.copy_(t.grad)
    bridge.save_weights(models, out_dir, peft_format=True, overwrite=True)
    return {"rank": rt.rank(), "frozen_with_grad": frozen}


def lora_error(source: str, layout: dict, adapter: str | None = None, spec: dict | None = None,
               grouped: bool = False) -> str | None:
    """The error a LoRA operation raises (type and message), or None."""
    try:
        bridge, models = _loaded(source, layout, grouped=grouped)
        if adapter:
            bridge.load_adapter(models, adapter)
        else:
            bridge.apply_lora(models, LoraSpec.from_dict(spec))
    except Exception as e:  # noqa: BLE001 -- the test inspects it
        return f"{type(e).__name__}: {e}"
    return None
