"""The flagship checkpoints' real ``config.json`` files (``tests/published``, every field as
published) are accepted, planned at their real size on a layout people train them with, and the
plan's parameter count equals transformers' own count of the same config (its model built on the
meta device: an independent computation) or, where transformers has no class for it, the count on
the model card. Memory per rank is printed (``-s``) and written by ``bench/published_plans.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PUBLISHED = sorted((HERE / "published").glob("*.json"))

# Layouts these models are trained on (the example for DeepSeek-V3: PP16 x EP8); a config
# not listed is planned at pp = 2 (or 1) with ep = 2 for MoE models.
LAYOUTS = {
    "deepseek-ai__DeepSeek-V3.json": dict(pp=16, ep=8, first_stage_layers=1),
    "deepseek-ai__DeepSeek-V3.1.json": dict(pp=16, ep=8, first_stage_layers=1),
    "moonshotai__Kimi-K2-Instruct.json": dict(pp=16, ep=16, first_stage_layers=1),
    "moonshotai__Moonlight-16B-A3B-Instruct.json": dict(pp=3, ep=8),
    "zai-org__GLM-4.5.json": dict(tp=2, pp=8, ep=8, sp=True, last_stage_layers=8),  # 92: 7 x 12 + 8 (+ MTP, head)
    "zai-org__GLM-4.5-Air.json": dict(pp=4, ep=8, last_stage_layers=10),  # 46 layers: 12+12+12+10
    "openai__gpt-oss-120b.json": dict(tp=2, pp=4, ep=8, etp=1, sp=True),
    "openai__gpt-oss-20b.json": dict(ep=8),
    "Qwen__Qwen3-235B-A22B.json": dict(pp=4, ep=32, first_stage_layers=4),
    "Qwen__Qwen3-Next-80B-A3B-Instruct.json": dict(pp=4, ep=8),  # Megatron-Bridge's recipe: TP1 PP4 EP8
    "Qwen__Qwen3.6-35B-A3B.json": dict(pp=4, ep=8),  # Qwen3-Next-80B-A3B's layout for the same hybrid MoE
}
# Model-card totals (billions of weights, main model) for configs transformers cannot build.
CARD_TOTALS_B = {"kimi_k2": 1040}


def layout_for(path: Path, raw: dict) -> dict:
    if path.name in LAYOUTS:
        return LAYOUTS[path.name]
    moe = any(raw.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    layers = raw.get("num_hidden_layers") or (raw.get("text_config") or {}).get("num_hidden_layers", 1)
    return dict(pp=2 if layers % 2 == 0 else 1, **(dict(ep=2) if moe else {}))


@pytest.fixture(scope="module")
def plans():
    if not PUBLISHED:
        pytest.fail("tests/published holds no config.json: the flagship configs are part of the test suite")
    args = [f"{p}={json.dumps(layout_for(p, json.loads(p.read_text())))}" for p in PUBLISHED]
    proc = subprocess.run([sys.executable, str(HERE / "published_cases.py"), *args], capture_output=True, text=True,
                          timeout=1200)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PLANS ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("PLANS "):])


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_published_config_is_planned_at_its_real_size(plans, path):
    raw = json.loads(path.read_text())
    result = plans[str(path)]
    plan, hf = result["plan"], result["hf_params"]
    if hf is not None:
        main = plan["total_params"] - plan["mtp_params"]  # transformers builds no MTP layer
        assert main == hf, (f"{path.name}: megatron model holds {main} weights (+ {plan['mtp_params']} in MTP "
                            f"layers), transformers' model of the same config {hf}")
    else:
        card = CARD_TOTALS_B[raw["model_type"]] * 1e9
        assert abs(plan["total_params"] - plan["mtp_params"] - card) / card < 0.03, (plan["total_params"], card)
    # every stage holds something; the largest rank is what the layout divides the model into
    assert all(r["dense_params"] + r["expert_params"] > 0 for r in plan["ranks"])
    assert plan["max_rank_params"] < plan["total_params"] or plan["world_size"] == 1
    if raw.get("num_nextn_predict_layers") or (raw.get("text_config") or {}).get("mtp_num_hidden_layers"):
        # the MTP layers are converted, hence planned
        assert plan["mtp_params"] > 0
    print(f"\n{path.stem}: {plan['total_params'] / 1e9:.2f}B weights ({plan['mtp_params'] / 1e9:.2f}B MTP), layout {plan['layout']}, "
          f"{plan['world_size']} ranks, largest rank {plan['max_rank_weight_bytes_bf16'] / 1e9:.2f} GB bf16")


def test_the_plan_command_refuses_a_layout_the_model_cannot_take(tmp_path):
    """The same refusal a conversion gives, before anything is built (the plan reuses the checks)."""
    if not PUBLISHED:
        pytest.fail("tests/published is empty")
    path = PUBLISHED[0]
    proc = subprocess.run([sys.executable, "-m", "mcore_bridge.cli", "plan", "--model", str(path), "--tp", "7"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tp=7" in proc.stderr and "Traceback" not in proc.stderr
