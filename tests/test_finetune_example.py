"""``examples/finetune_hf.py``: its chat data set (rendered by the model's tokenizer and chat
template, loss on the answer tokens only) and one short CPU run (megatron-core 0.17+; on older
megatron-core the example exits with the requirement named)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_MLM = importlib.util.find_spec("megatron.training") is not None
sys.path.insert(0, str(ROOT / "examples"))
import finetune_hf  # noqa: E402


def test_chat_dataset_masks_answers_only(zoo_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo_model("qwen3"))
    path = finetune_hf.make_dataset(tmp_path / "train.jsonl", n=20)
    data = finetune_hf.ChatDataset(path, tok, seq=32)
    assert len(data) == 20
    for s in data.samples:
        answer = [tok.decode([int(t)]) for t, m in zip(s["labels"], s["loss_mask"]) if m]
        assert len(answer) == 2 and answer[0].isdigit() and answer[1] == "<|im_end|>", answer
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        question = tok.decode(s["tokens"][s["tokens"] != tok.pad_token_id].tolist())
        assert f"first of {answer[0]} and" in question  # the answer follows from the prompt
    assert len(finetune_hf.ChatDataset(path, tok, seq=32, length=50)) == 50  # repeated for Megatron-LM's sampler
    with pytest.raises(ValueError, match="longer than --seq-length 8"):
        finetune_hf.ChatDataset(path, tok, seq=8)


def test_example_runs_on_cpu(zoo_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29731",
           str(ROOT / "examples" / "finetune_hf.py"), "--hf_model", str(zoo_model("qwen3")),
           "--save", str(tmp_path / "ft"), "--train-iters", "4", "--save-interval", "2", "--log-interval", "1"]
    if not HAS_MLM:  # refused before anything distributed starts: no torchrun needed to see it
        r = subprocess.run([sys.executable] + cmd[7:], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 1 and "megatron-core 0.17+" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not (tmp_path / "ft").exists()
        return
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in r.stdout.splitlines() if line.startswith("iteration ")]
    assert len(losses) == 4 and losses[-1] < losses[0], r.stdout[-2000:]
    import transformers

    for it in (2, 4):
        out = tmp_path / "ft" / "hf" / f"iter_{it:07d}"
        _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
    assert (tmp_path / "ft" / "data" / "train.jsonl").is_file()
