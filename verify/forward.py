"""Forward passes on both sides: the reference HF model and the sharded megatron model."""

from __future__ import annotations

import torch


def megatron_logits(models, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits ``[B, S, vocab]`` of a sharded megatron model, on the last pipeline
    stage (``None`` elsewhere). Runs megatron's own pipeline schedule, one sample per micro-batch."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = input_ids.shape
    device = next(models[0].parameters()).device
    input_ids = input_ids.to(device)
    position_ids = torch.arange(seq, device=device).unsqueeze(0)
    collected = []

    def step(data_iterator, model):
        sample = next(data_iterator)
        out = model(sample, position_ids, None)

        def loss_func(logits):
            collected.append(gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float())
            return logits.new_zeros(()), {}

        return out, loss_func

    samples = [input_ids[i:i + 1] for i in range(batch)]
    if len(models) > 1:  # the interleaved schedule wants at least pp micro-batches: repeat the last
        samples += samples[-1:] * max(0, ps.get_pipeline_model_parallel_world_size() - batch)
    iters = [iter(samples) for _ in models]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters if len(models) > 1 else iters[0],
            model=models if len(models) > 1 else models[0], num_microbatches=len(samples), seq_length=seq,
            micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(collected[:batch], dim=0).cpu()


def hf_logits(hf_dir, input_ids: torch.Tensor, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Logits of the real transformers model (the reference), returned on the CPU in fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        return model(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()
