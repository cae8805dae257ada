"""The command line's fixed cost (issue 16, item 5): what each command imports.

Timings are measured by ``bench/startup_bench.py`` and never asserted (the machine's load swings
them); what is asserted is the cause of the cost: which modules a command pulls in. Each check runs
a fresh interpreter and reads its ``sys.modules``; a negative control shows that the probe sees
the import it looks for when it does happen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
argv = json.loads(sys.argv[1])
if argv is not None:
    from mcore_bridge.cli import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, None), code
else:
    exec(sys.argv[2])
prefixes = json.loads(sys.argv[3])
print(json.dumps({p: sorted(m for m in sys.modules if m == p or m.startswith(p + ".")) for p in prefixes}))
"""

HEAVY = ["torch", "megatron", "transformers", "safetensors", "peft"]


def loaded(argv, prefixes, code: str = "", timeout: int = 300) -> dict[str, list[str]]:
    """The modules under each of ``prefixes`` that a fresh process holds after ``main(argv)`` (or
    after running ``code`` when ``argv`` is None)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               MCORE_BRIDGE_QUIET="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), code, json.dumps(prefixes)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_importing_the_cli_and_building_its_parser_imports_nothing_heavy():
    found = loaded(None, HEAVY, "import mcore_bridge.cli as c; c.build_parser()")
    assert found == {p: [] for p in HEAVY}
    # control: the probe does see torch once something imports it
    assert "torch" in loaded(None, ["torch"], "import mcore_bridge.runtime.compat")["torch"]


def test_help_of_every_command_imports_nothing_heavy():
    for argv in (["--help"], ["export", "--help"], ["verify", "--help"], ["plan", "--help"], ["zoo"]):
        found = loaded(argv, HEAVY)
        assert found == {p: [] for p in HEAVY}, (argv, {p: m[:3] for p, m in found.items() if m})


def test_plan_builds_without_torch_compile_machinery(zoo_model, tmp_path):
    """``plan`` builds the model on the meta device: megatron decorates its fused helpers with
    torch.compile at import, which (outside ``compat.compile_off``) imports TorchDynamo and
    TorchInductor, seconds of start-up for helpers a plan never runs. Nor are transformers' model
    classes needed to read a config.json."""
    cfg = tmp_path / "config.json"
    cfg.write_text((Path(zoo_model("llama")) / "config.json").read_text())
    found = loaded(["plan", "--model", str(cfg), "--tp", "2"],
                   ["torch._dynamo", "torch._inductor", "transformers.models", "megatron.core.models.gpt"])
    assert found["megatron.core.models.gpt"], "plan built no megatron model: the check below proves nothing"
    # (measured: without compile_off this same plan holds ~100 torch._dynamo and ~180 torch._inductor
    # modules; a control here would cost 5 s of CPU for TorchDynamo's import alone)
    assert found["torch._dynamo"] == found["torch._inductor"] == found["transformers.models"] == []


def test_export_imports_neither_transformers_nor_torch_compile(zoo_model, tmp_path):
    """Converting reads safetensors and builds megatron: transformers (its model classes above
    all) and TorchInductor stay out of the process."""
    src = zoo_model("llama")
    found = loaded(["export", "--model", str(src), "--to-mcore", "--device", "cpu", "--save", str(tmp_path / "m")],
                   ["transformers", "torch._dynamo", "torch._inductor", "megatron.core.models.gpt"])
    assert (tmp_path / "m").is_dir() and found["megatron.core.models.gpt"]
    assert found["transformers"] == found["torch._dynamo"] == found["torch._inductor"] == []


def test_a_single_process_verify_case_starts_no_torchrun_agent():
    """One process needs no torchrun agent (an interpreter and an ``import torch`` per case); the
    verify end-to-end test in test_cli.py runs both kinds of case (tp1 direct, tp2 under torchrun)."""
    from mcore_bridge.cli import _case_launcher

    assert _case_launcher(1) == [sys.executable]
    two = _case_launcher(2)
    assert two[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc-per-node=2" in two
