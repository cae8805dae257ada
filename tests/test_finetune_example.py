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
    for it in (2, 4):  # Megatron-LM's own checkpoints beside the HF directories
        assert (tmp_path / "ft" / f"iter_{it:07d}").is_dir()
    assert (tmp_path / "ft" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_vl_dataset_and_packed_rows(zoo_model, tmp_path):
    """Image chat samples: the image's tokens where the chat template put the marker (as many as the
    image processor's grid gives), the loss on the answer (the colour's index) only, 3-D positions
    from transformers' get_rope_index; packed rows: the samples of one micro-batch without their
    padding, cu_seqlens at their bounds, one padding segment, vision inputs in order."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from mcore_bridge import Bridge

    src = zoo_model("qwen3_vl")
    family = Bridge(src).family
    tok = AutoTokenizer.from_pretrained(src)
    path = finetune_hf.make_vl_dataset(tmp_path / "vl.jsonl", n=6)
    data = finetune_hf.VLChatDataset(path, tok, Qwen2VLImageProcessorPil.from_pretrained(src), family, seq=32)
    image = family.vision_settings().image_token_id
    for s, line in zip(data.samples, open(path)):
        n = int(s["n_tokens"])
        assert int((s["tokens"] == image).sum()) == int(s["image_grid_thw"].prod()) // 4 == 4
        answer = [tok.decode([int(t)]) for t, m in zip(s["labels"], s["loss_mask"]) if m]
        assert answer == [str(__import__("json").loads(line)["colour"]), "<|im_end|>"], answer
        assert s["position_ids"].shape == (3, 32) and s["pixel_values"].shape[0] == 16
        assert s["position_ids"][:, :n].max() < n - 1  # the image's 2x2 grid shares positions
    rows = finetune_hf.PackedRows(data, 3)
    assert len(rows) == 2
    r = rows[1]
    lengths = [int(data[i]["n_tokens"]) for i in (3, 4, 5)]
    assert r["cu_seqlens"].tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths), 96]
    assert r["tokens"].shape == (96,) and r["loss_mask"][sum(lengths):].sum() == 0
    assert torch.equal(r["tokens"][lengths[0]:sum(lengths[:2])], data[4]["tokens"][:lengths[1]])
    assert torch.equal(r["position_ids"][:, lengths[0]:sum(lengths[:2])], data[4]["position_ids"][:, :lengths[1]])
    assert torch.equal(r["pixel_values"], torch.cat([data[i]["pixel_values"] for i in (3, 4, 5)]))
