"""The core knows no architecture (issue 17): what a model is lives in ``mcore_bridge/families/``,
what a transform means for export, LoRA and slicing is a property of the transform.

Checked by reading the core modules' syntax trees (comments and docstrings may name examples):
  * no family name (llama, qwen, deepseek, mixtral, mla) in an identifier, import or string;
  * no string that matches on "vision", "visual" or "router" (module-name matching);
  * no ``isinstance`` / ``issubclass`` against a class of ``transforms``;
  * ``Bridge`` and its parts keep no caches in ``__dict__`` (``cached_property``, ``__dict__`` tricks);
  * ``checkpoint``, ``verify``, ``bench`` and the tests call no private member of a bridge or its parts.
Each check is shown to fail on a planted violation.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mcore_bridge"
# te_layout is not listed: it translates megatron's own local layer-spec keys into its
# TransformerEngine ones, and megatron's MLA and router modules have keys of their own there.
CORE = ["bridge", "plan", "export", "hf_io", "model", "checkpoint", "dist_ckpt", "sync", "stacked",
        "layout"]
CORE_DIRS = ["lora", "bridge_parts", "sync_transport", "transforms"]
FAMILY_NAMES = re.compile(r"llama|qwen|deepseek|mixtral|(?<![a-z])mla(?![a-z])", re.I)
MODULE_MATCH = re.compile(r"vision|visual|router", re.I)


def core_files() -> list[Path]:
    files = [PKG / f"{m}.py" for m in CORE]
    for d in CORE_DIRS:
        files += sorted((PKG / d).glob("*.py"))
    return files


def transform_classes() -> set[str]:
    trees = [ast.parse(f.read_text()) for f in sorted((PKG / "transforms").glob("*.py"))]
    return {n.name for tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def _docstrings(tree) -> set[int]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def violations(source: str, where: str = "<string>", transforms: set[str] | None = None) -> list[str]:
    """What in ``source`` breaks the core's boundary, one line per finding."""
    transforms = transform_classes() if transforms is None else transforms
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for n in ast.walk(tree):
        words = []
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            words.append(n.value)
            if MODULE_MATCH.search(n.value):
                found.append(f"{where}:{n.lineno}: string matches a module by name: {n.value[:60]!r}")
        elif isinstance(n, ast.Name):
            words.append(n.id)
        elif isinstance(n, ast.Attribute):
            words.append(n.attr)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.append(n.name)
        elif isinstance(n, ast.alias):
            words += [n.name, n.asname or ""]
        elif isinstance(n, ast.ImportFrom):
            words.append(n.module or "")
        elif isinstance(n, ast.arg):
            words.append(n.arg)
        for w in words:
            if FAMILY_NAMES.search(w):
                found.append(f"{where}:{getattr(n, 'lineno', '?')}: architecture name: {w[:60]!r}")
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("isinstance", "issubclass")
                and len(n.args) == 2):
            named = {x.id if isinstance(x, ast.Name) else x.attr
                     for x in ast.walk(n.args[1]) if isinstance(x, (ast.Name, ast.Attribute))}
            if named & transforms:
                found.append(f"{where}:{n.lineno}: {n.func.id} on transform class(es) {sorted(named & transforms)}")
    return found


def dict_caches(source: str, where: str = "<string>") -> list[str]:
    """``cached_property`` or ``__dict__`` use: caches that are not explicit attributes."""
    found = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Attribute) and n.attr in ("__dict__", "cached_property"):
            found.append(f"{where}:{n.lineno}: {n.attr}")
        elif isinstance(n, (ast.Name, ast.alias)) and getattr(n, "id", getattr(n, "name", None)) == "cached_property":
            found.append(f"{where}:{getattr(n, 'lineno', '?')}: cached_property")
    return found


BRIDGE_NAMES = {"bridge", "reader", "self.bridge"}
PARTS = {"reader", "local", "adapters", "loader", "writer", "syncplan"}


def private_calls(source: str, where: str = "<string>") -> list[str]:
    """``bridge._x`` / ``bridge.writer._x``: private members of a bridge or its parts, used from outside."""
    found = []
    for n in ast.walk(ast.parse(source)):
        if not (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")):
            continue
        owner = ast.unparse(n.value)
        if owner in BRIDGE_NAMES or owner.split(".")[-1] in PARTS and owner.split(".")[0] in BRIDGE_NAMES:
            found.append(f"{where}:{n.lineno}: {owner}.{n.attr}")
    return found


def outside_files() -> list[Path]:
    files = [PKG / "checkpoint.py"]
    for d in ("verify", "bench", "tests"):
        files += sorted((ROOT / d).glob("*.py"))
    return files


# -- the code as it is --------------------------------------------------------------------------
def test_core_modules_exist():
    missing = [f for f in core_files() if not f.exists()]
    assert not missing and len(core_files()) > len(CORE), missing


def test_core_names_no_architecture_and_tests_no_transform_class():
    found = [v for f in core_files() for v in violations(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, "\n".join(found)


def test_the_vision_language_model_class_lives_with_its_families():
    assert not (PKG / "multimodal.py").exists()
    assert (PKG / "families" / "vl_model.py").exists()


def test_bridge_and_its_parts_keep_no_dict_caches():
    files = [PKG / "bridge.py", *sorted((PKG / "bridge_parts").glob("*.py"))]
    found = [v for f in files for v in dict_caches(f.read_text(), f.name)]
    assert not found, "\n".join(found)


def test_no_private_bridge_members_used_outside_the_package():
    found = [v for f in outside_files() for v in private_calls(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, "\n".join(found)


# -- negative controls: each check catches a planted violation ----------------------------------------
@pytest.mark.parametrize("planted", [
    'if "vision" in settings:\n    pass',
    'FIRST_STAGE = ("embedding.", "visual.")',
    'ok = name.endswith("mlp.router")',
    'from .families.qwen_vl import VisionSettings',
    'def fix_llama_rope(x):\n    return x',
    'mla = kw.get("kv_lora_rank")',
    'name = "DeepSeek-V3"',
    'def f(t):\n    return isinstance(t, QKV)',
    'def f(t):\n    return isinstance(t, (transforms.Row, int))',
    'def f(t):\n    return issubclass(type(t), GatedMLP)',
])
def test_planted_violations_are_found(planted):
    assert violations(planted, transforms={"QKV", "Row", "GatedMLP"})


@pytest.mark.parametrize("allowed", [
    '"""Docstrings may name examples: Qwen3-VL, DeepSeek MLA, the MoE router."""',
    'x = 1  # comments too: llama, vision tower',
    'def f(t):\n    return isinstance(t, dict)',
    'ok = t.parallel_mode == "replicated"',
    'moe = dict(moe_router_topk=2)',  # a megatron config field: a keyword, not a string match
])
def test_allowed_code_passes(allowed):
    assert violations(allowed, transforms={"QKV", "Row", "GatedMLP"}) == []


def test_a_planted_violation_in_a_copy_of_a_real_core_module_fails(tmp_path):
    copy = tmp_path / "plan.py"
    shutil.copy(PKG / "plan.py", copy)
    assert violations(copy.read_text()) == []
    copy.write_text(copy.read_text() + '\n\ndef owner(r):\n    return r.mcore.startswith("visual.")\n')
    assert any("visual." in v for v in violations(copy.read_text(), "plan.py"))


@pytest.mark.parametrize("planted, check", [
    ("class B:\n    @functools.cached_property\n    def plans(self):\n        return {}", dict_caches),
    ("from functools import cached_property", dict_caches),
    ('def f(self):\n    return self.__dict__.setdefault("_plans", {})', dict_caches),
    ("state = bridge._state(models)", private_calls),
    ("e = bridge.writer._exporter(models)", private_calls),
    ("bridge.syncplan._plans.clear()", private_calls),
    ("n = self.bridge._groups()", private_calls),
])
def test_planted_caches_and_private_calls_are_found(planted, check):
    assert check(planted)


def test_public_seams_pass():
    assert private_calls("s = bridge.state(models)\ne, g = bridge.writer.exporter(models)\n"
                         "bridge.syncplan.forget()\nv = bridge.__class__") == []
    assert dict_caches("self.plans = {}") == []
