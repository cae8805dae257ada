"""One exception root: every deliberate error is a ``BridgeError`` the CLI prints on one line
(exit 2); anything else is a bug and keeps its traceback (exit 1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mcore_bridge import cli, errors, zoo

LEGACY_HOMES = {  # name -> module it was defined in before errors.py (still importable there)
    "UnsupportedConfig": "mcore_bridge.families.base",
    "LayoutError": "mcore_bridge.layout",
    "MappingError": "mcore_bridge.plan",
    "CheckpointError": "mcore_bridge.hf_io",
    "AdapterError": "mcore_bridge.lora",
}


def test_every_error_class_has_the_one_root_and_keeps_its_old_home_and_base():
    import importlib

    for name, home in LEGACY_HOMES.items():
        cls = getattr(importlib.import_module(home), name)
        assert cls is getattr(errors, name)
        assert issubclass(cls, errors.BridgeError) and issubclass(cls, ValueError), name
    from mcore_bridge.transforms import ShapeMismatch
    from verify.report import ReportError

    assert issubclass(ShapeMismatch, errors.MappingError) and issubclass(ReportError, errors.BridgeError)
    assert issubclass(errors.OutputExists, FileExistsError) and issubclass(errors.UnsupportedConfig, errors.ConfigError)


def test_cli_prints_a_bridge_error_on_one_line(monkeypatch, capsys):
    def refuse():
        raise errors.UsageError("--foo 3: choose 1 or 2")

    monkeypatch.setattr(zoo, "names", refuse)
    assert cli.main(["zoo"]) == 2
    assert capsys.readouterr().err == "mcore-bridge: error: --foo 3: choose 1 or 2\n"


@pytest.mark.parametrize("bug", [KeyError, ValueError, OSError, RuntimeError])
def test_an_internal_bug_is_not_swallowed(bug, monkeypatch):
    def broken():
        raise bug("internal bug")

    monkeypatch.setattr(zoo, "names", broken)
    with pytest.raises(bug, match="internal bug"):
        cli.main(["zoo"])


def _run(code: str):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_cli_process_exit_codes_and_traceback(tmp_path):
    missing = tmp_path / "no_such_model"
    r = _run(f"""
        import sys
        from mcore_bridge.cli import main
        sys.exit(main(["export", "--model", {str(missing)!r}, "--to-mcore", "--save", {str(tmp_path / 'out')!r}]))
    """)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"mcore-bridge: error: --model {missing}: not a directory" in r.stderr
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    r = _run(f"""
        import sys
        from mcore_bridge.cli import main
        sys.exit(main(["export", "--model", {str(bad)!r}, "--to-mcore", "--save", {str(tmp_path / 'out')!r}]))
    """)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{bad / 'config.json'} cannot be read as JSON" in r.stderr
    r = _run("""
        import sys
        from mcore_bridge import cli, zoo
        def broken():
            return {}["missing key"]  # an internal bug
        zoo.names = broken
        sys.exit(cli.main(["zoo"]))
    """)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "KeyError: 'missing key'" in r.stderr
    assert "mcore-bridge: error" not in r.stderr
