"""`mcore-bridge demo`, the README's first command, on a dense and a MoE model at its default tp 2:
both round trips byte-exact and logits within tolerance; the MoE model runs at expert-TP 1 (its
parallel state re-created for it), which gpt-oss's expert biases need."""

from __future__ import annotations

import subprocess
import sys


def test_demo_round_trips_a_dense_and_a_moe_model():
    proc = subprocess.run([sys.executable, "-m", "mcore_bridge.cli", "demo", "--models", "llama,gpt_oss",
                           "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if " -> HF: " in ln}
    assert set(lines) == {"llama", "gpt_oss"}, proc.stdout
    assert "tp2-pp1 " in lines["llama"] and "tp2-pp1-etp1" in lines["gpt_oss"]
    assert all("byte-exact" in ln and ln.rstrip().split("[")[0].strip().endswith("PASS") for ln in lines.values()), lines
