"""The errors a user of mcore-bridge meets, under one root.

Every error the library raises on purpose -- a setting it refuses, a checkpoint it cannot read, a
layout that does not fit, a bad option -- is a ``BridgeError``: its message names the parameter,
tensor or file and the fix, and the CLI prints it on one line (exit 2). Anything else is a bug
and keeps its traceback. Each class also derives from the built-in exception it used to be
(``ValueError``, ``FileExistsError``), so existing ``except ValueError`` callers keep working.

The classes are re-exported where they were first defined (``families.UnsupportedConfig``,
``layout.LayoutError``, ``plan.MappingError``, ``hf_io.CheckpointError``, ``lora.AdapterError``).
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every deliberate mcore-bridge error."""


class UsageError(BridgeError, ValueError):
    """An option, flag or argument out of its range or in conflict with another."""


class ConfigError(BridgeError, ValueError):
    """The model's configuration cannot be converted."""


class UnsupportedConfig(ConfigError):
    """The HF config holds a setting megatron-core cannot express (so a conversion would be wrong)."""


class LayoutError(BridgeError, ValueError):
    """A parallel layout that does not fit the model or the world."""


class MappingError(BridgeError, ValueError):
    """Checkpoint and model disagree: missing, unexpected or mis-shaped tensors, unmapped params."""


class CheckpointError(BridgeError, ValueError):
    """A checkpoint that cannot be read (or written) as asked: missing, truncated, corrupt, unsafe."""


class OutputExists(BridgeError, FileExistsError):
    """The destination exists and is not empty, and overwriting was not asked for."""


class WriteError(BridgeError, OSError):
    """A file could not be written (full disk, permissions, ...): ``cannot write PATH: REASON``."""

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror}"


class PeerFailed(BridgeError, RuntimeError):
    """Another rank failed (its own error is printed by it) while this one took part in a collective."""


class AdapterError(BridgeError, ValueError):
    """An adapter that cannot be represented or does not fit the base model."""


class VerificationError(BridgeError, ValueError):
    """The converted model and the reference disagree in a way the harness cannot measure."""
