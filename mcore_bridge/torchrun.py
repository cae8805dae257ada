"""torchrun (``torch.distributed.run``) for the CLI's own relaunch, with the workers' exit code.

torchrun turns any failed worker into its own exit code 1 and a ``ChildFailedError`` traceback. When
the first worker to fail (torchrun's "root cause") exited with 2 -- a ``BridgeError`` it has already
printed as one line, such as a missing tensor or a full disk -- this launcher exits 2 quietly, so a
multi-process command fails exactly like a single-process one. Any other failure (a crash, a bug, a
signal) is re-raised with torchrun's own summary, as before.

    python -m mcore_bridge.torchrun <torchrun options> -m mcore_bridge.cli ...
"""

from __future__ import annotations

import sys

USER_ERROR = 2  # what cli.main returns for a BridgeError


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if failure.exitcode == USER_ERROR:
            return USER_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
