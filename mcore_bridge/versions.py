"""The version line: ``mcore-bridge X (megatron-core Y, torch Z, transformers W)``, printed by
``mcore-bridge --version`` and first by ``verify`` and ``export``. Read from the installed
packages' metadata: none of them is imported."""

from __future__ import annotations

import argparse
import os


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {installed(name)}" for name in ("megatron-core", "torch", "transformers"))
    return f"mcore-bridge {__version__} ({deps})"


class VersionAction(argparse.Action):
    """``--version``: print the version line on stdout and exit 0."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def print_header():
    """The version line at the top of a command's output, from rank 0 only (torch.distributed is
    not set up yet: torchrun's RANK tells)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(version_line(), flush=True)
